"""Every node of many architectures, logged and rendered: what a user's own model would meet.

    python benchmarks/model_sweep.py                       # the list below, one process each
    python benchmarks/model_sweep.py --models tv_googlenet timm_dla34 --timeout 600

Each model (random weights) is logged by the Logger at two steps in a fresh process, read back
with open_run, and then every node it lists is rendered (one unit, one iteration, 16 px: can it
be tapped at all?), and the middle and last nodes properly (two units, 16 iterations, 32 px):
the std of their pixels tells a picture from the grey it started as. Prints one line per model:
how it was captured (and the capture's note), its nodes by layout, the nodes that failed with
the first error, and the grey pictures. Not a test: it takes about a minute per model on two
cores, and says what breaks on models no test names.
"""

import argparse
import json
import subprocess
import sys

MODELS = {
    "tv_googlenet": ("torchvision.models.googlenet(weights=None, init_weights=True)", 64),
    "tv_mobilenet_v2": ("torchvision.models.mobilenet_v2(weights=None)", 64),
    "tv_efficientnet_v2_s": ("torchvision.models.efficientnet_v2_s(weights=None)", 64),
    "tv_swin_v2_t": ("torchvision.models.swin_v2_t(weights=None)", 64),
    "tv_densenet121": ("torchvision.models.densenet121(weights=None)", 64),
    "timm_deit_tiny": (
        "timm.create_model('deit_tiny_patch16_224', img_size=64, patch_size=8, depth=2)",
        64,
    ),
    "timm_coat_lite_tiny": ("timm.create_model('coat_lite_tiny', img_size=64)", 64),
    "timm_dla34": ("timm.create_model('dla34')", 64),
    "timm_hrnet_w18_small": ("timm.create_model('hrnet_w18_small')", 64),
    "timm_levit_128s": ("timm.create_model('levit_128s')", 224),
    "timm_pvt_v2_b0": ("timm.create_model('pvt_v2_b0')", 64),
    "hf_beit": (
        "transformers.BeitForImageClassification(transformers.BeitConfig(image_size=64, "
        "hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))",
        64,
    ),
    "hf_mobilenet_v1": (
        "transformers.MobileNetV1ForImageClassification(transformers.MobileNetV1Config("
        "image_size=64))",
        64,
    ),
    "hf_cvt": ("transformers.CvtForImageClassification(transformers.CvtConfig())", 64),
}

CHILD = """
import collections, json, sys, tempfile
import torch, torchvision, timm, transformers
import tb_microscope
from tb_microscope.rendering import render

torch.manual_seed(0)
model, size = eval(sys.argv[1]), int(sys.argv[2])
example = torch.rand(2, 3, size, size)
out = {}
with tempfile.TemporaryDirectory() as root:
    with tb_microscope.Logger(root, model, example, steps=[0, 1]) as logger:
        logger.log(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        logger.log(1)
    run = tb_microscope.open_run(root)
    out["capture"] = run.architecture
    out["note"] = run.manifest.model.architecture.note
    out["layouts"] = dict(collections.Counter(n.layout for n in run.nodes))
    loaded = run.load_model(1)
    failed = []
    for node in run.nodes:
        try:
            render(run, 1, node.name, [0], size=16, iterations=1, model=loaded)
        except Exception as e:
            failed.append(f"{node.name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    out["failed"] = failed
    grey = []
    for node in {run.nodes[len(run.nodes) // 2].name, run.nodes[-1].name}:
        units = sorted({0, run.node(node).units - 1})
        result = render(run, 1, node, units, size=32, iterations=16, model=loaded)
        grey += [f"{node}#{u}" for u, i in zip(units, result.images) if i.std() < 2]
    out["grey"] = grey
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model")
    args = parser.parse_args()
    for name in args.models:
        expression, size = MODELS[name]
        try:
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, expression, str(size)],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
        except subprocess.TimeoutExpired:
            print(f"{name}: over {args.timeout:.0f} s", flush=True)
            continue
        lines = proc.stdout.strip().splitlines()
        if proc.returncode or not lines:
            print(f"{name}: failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        found = json.loads(lines[-1])
        nodes = sum(found["layouts"].values())
        layouts = ", ".join(f"{k} {v}" for k, v in found["layouts"].items())
        print(f"{name}: {found['capture']}, {nodes} nodes ({layouts})", flush=True)
        if found["note"]:
            print(f"  note: {found['note']}")
        print(f"  nodes that cannot be rendered: {len(found['failed'])}")
        for line in found["failed"][:3]:
            print(f"    {line}")
        print(f"  grey pictures: {' '.join(found['grey']) or 'none'}", flush=True)


if __name__ == "__main__":
    main()
