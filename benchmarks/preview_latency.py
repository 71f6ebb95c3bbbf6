"""How soon the tab's first pictures come: previews of the units on screen after a node opens.

    python benchmarks/preview_latency.py                      # ResNet-50 layer3.2, 48 units
    python benchmarks/preview_latency.py --units 64 --node layer4.0 --device cuda
    python benchmarks/preview_latency.py --look 0     # the node opened the moment the run shows

A ResNet-50 (random weights) is logged with the Logger; then the plugin (TensorBoard's own WSGI
app on a real data provider, no network) is asked, as the tab asks, for the units a 1280 x 900
window shows (about 48 of `layer3.2`'s 1024) at the default qualities, the way the tab asks: the
run's nodes first (its graph is drawn, and the plugin starts loading the model), then, `--look`
seconds later (a person choosing a node), the node's units. Prints the time from the node's
opening, and from the run's, to the first preview and to every visible unit's preview (the
model's loading included), and, for comparison, how long the first batch of full renders
takes (4 iterations measured, scaled to the full count).
"""

import argparse
import json
import tempfile
import time

import torch
import torchvision
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_provider
from tensorboard.backend.event_processing import plugin_event_multiplexer as event_multiplexer
from tensorboard.plugins import base_plugin
from werkzeug import test as werkzeug_test
from werkzeug import wrappers

import tb_microscope
from tb_microscope.optvis.engine import QUALITIES
from tb_microscope.server.plugin import MicroscopePlugin

BASE = "/data/plugin/tb_microscope"
POLL_S = 0.5  # how often the tab asks after the units it shows (frontend/api.js: POLL_MS)


def plugin_client(logdir: str, device: str):
    multiplexer = event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    flags = argparse.Namespace(microscope_device=device, microscope_cache_dir="")
    context = base_plugin.TBContext(
        logdir=logdir,
        data_provider=data_provider.MultiplexerDataProvider(multiplexer, logdir),
        flags=flags,
    )
    plugin = MicroscopePlugin(context)
    app = application.TensorBoardWSGI([plugin])
    return plugin, werkzeug_test.Client(app, wrappers.Response)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", default="layer3.2")
    parser.add_argument("--units", type=int, default=48, help="units on screen")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--look", type=float, default=5.0, help="seconds between the run's graph and the node"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as logdir:
        torch.manual_seed(0)
        x = torch.rand(2, 3, args.input_size, args.input_size)
        net = torchvision.models.resnet50()
        with tb_microscope.Logger(f"{logdir}/run", net, x, nodes=[args.node], steps=[0]) as lg:
            lg.log(0)
        plugin, http = plugin_client(logdir, args.device)
        body = {"run": "run", "step": 0, "node": args.node, "units": list(range(args.units))}
        shown_run = time.perf_counter()
        assert http.get(f"{BASE}/nodes?run=run").status_code == 200
        time.sleep(args.look)
        start = time.perf_counter()
        first = None
        while True:
            response = http.post(
                f"{BASE}/render", data=json.dumps(body), content_type="application/json"
            )
            statuses = json.loads(response.data)["units"].values()
            shown = sum(s.get("preview", False) or s["status"] == "done" for s in statuses)
            if shown and first is None:
                first = time.perf_counter() - start
            if shown == args.units:
                break
            time.sleep(POLL_S)
        every = time.perf_counter() - start
        http.post(f"{BASE}/cancel", data=json.dumps(body), content_type="application/json")
        run = tb_microscope.open_run(f"{logdir}/run")
        full = QUALITIES["full"]
        model = run.load_model(0, args.device)
        batch = min(16, args.units)  # the engine's batch on a CPU
        begin = time.perf_counter()
        tb_microscope.render(
            run,
            0,
            args.node,
            list(range(batch)),
            size=full.size,
            iterations=4,
            device=args.device,
            model=model,
            batch_size=batch,
        )
        per_iteration = (time.perf_counter() - begin) / 4
    preview = QUALITIES["preview"]
    print(
        f"resnet50 {args.node}, {args.units} units on screen, {args.device}; preview "
        f"{preview.size} px / {preview.iterations} iterations, full {full.size} px / "
        f"{full.iterations} iterations"
    )
    print(
        f"node opened {args.look:.0f} s after the run's graph: first preview after {first:.1f} s,"
        f" every visible unit's preview after {every:.1f} s (from the run's graph: "
        f"{first + start - shown_run:.1f} s and {every + start - shown_run:.1f} s)"
    )
    print(
        f"full quality: {per_iteration:.2f} s per iteration of a batch of {batch}, so about "
        f"{per_iteration * full.iterations:.0f} s before the first full pictures"
    )


if __name__ == "__main__":
    main()
