"""The plugin's routes through TensorBoard's own WSGI app, on a real data provider."""

import argparse
import base64
import io
import json
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard import context
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_provider
from tensorboard.backend.event_processing import plugin_event_multiplexer as event_multiplexer
from tensorboard.plugins import base_plugin
from werkzeug import test as werkzeug_test
from werkzeug import wrappers

import tb_microscope
from tb_microscope.analysis.attribution import HEAT_ALPHA
from tb_microscope.analysis.concepts import concept_attribution_and_notes, render_concepts
from tb_microscope.demo.train import train
from tb_microscope.server.plugin import MicroscopePlugin
from tb_microscope.store.local import RunStore

SIZE, ITERATIONS = 16, 4
BASE = "/data/plugin/tb_microscope"


def make_plugin(logdir, **flags):
    multiplexer = event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    options = dict(
        microscope_device="cpu",
        microscope_size=SIZE,
        microscope_iterations=ITERATIONS,
        microscope_cache_dir="",
        microscope_no_warm_up=True,  # not half a minute of numba compiling beside each test
        microscope_allow_pickle=False,
    )
    context = base_plugin.TBContext(
        logdir=str(logdir),
        data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(logdir)),
        flags=argparse.Namespace(**{**options, **flags}),
    )
    plugin = MicroscopePlugin(context)
    app = application.TensorBoardWSGI([plugin])
    return plugin, werkzeug_test.Client(app, wrappers.Response)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("logdir")
    train(logdir / "demo", steps=10, log=lambda *_: None)
    return logdir


@pytest.fixture
def client(logdir):
    return make_plugin(logdir)


def post(client, path, body):
    return client.post(f"{BASE}/{path}", data=json.dumps(body), content_type="application/json")


def wait_for_json(client, path, seconds=120):
    """The route's result once a worker has computed it (202 until then)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        response = client.get(f"{BASE}/{path}")
        if response.status_code == 200:
            return json.loads(response.data)
        assert response.status_code == 202, response.data
        assert json.loads(response.data)["status"] in ("queued", "running")
        time.sleep(0.05)
    pytest.fail(f"no result for {path}")


def assert_refused(http, route, cases):
    """Each of `cases` ((query, status code, words in the answer)) asked of `route`: refused with
    that code, saying those words."""
    for query, code, words in cases:
        response = http.get(f"{BASE}/{route}?{query}")
        assert response.status_code == code and words in response.data, (query, response.data)


def wait_until_idle(plugin, seconds=60):
    deadline = time.monotonic() + seconds
    while not plugin.service.idle():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def wait_for_png(client, query, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        response = client.get(f"{BASE}/image?{query}")
        if response.status_code == 200:
            return np.asarray(Image.open(io.BytesIO(response.data)).convert("RGB"))
        assert response.status_code == 202, response.data
        time.sleep(0.05)
    pytest.fail(f"no image for {query}")


def test_runs_and_nodes_describe_the_logged_run(client):
    plugin, http = client
    runs = json.loads(http.get(f"{BASE}/runs").data)
    assert [r["run"] for r in runs] == ["demo"]
    assert runs[0]["steps"] == [0, 1, 2, 3, 5, 7, 10]
    assert runs[0]["model"]["architecture"] == "export"
    nodes = json.loads(http.get(f"{BASE}/nodes?run=demo").data)
    names = [n["name"] for n in nodes["nodes"]]
    assert names == ["conv1", "pool1", "conv2", "pool2", "conv3", "fc"]
    assert ["conv3", "fc"] in nodes["edges"]
    assert plugin.nodes_impl(context.RequestContext(), "", "demo") == nodes


def test_the_tabs_files_are_served_and_nothing_else(client):
    _, http = client
    for path, kind in [
        ("index.js", "text/javascript"),
        ("unit.js", "text/javascript"),
        ("style.css", "text/css"),
    ]:
        response = http.get(f"{BASE}/static/{path}")
        assert response.status_code == 200 and response.mimetype == kind, path
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    for path in [
        "__init__.py",
        "../server/plugin.py",
        "%2e%2e/server/plugin.py",
        "x/../../runstore.py",
        "/etc/passwd",
        ".",
        "missing.js",
    ]:
        response = http.get(f"{BASE}/static/{path}")
        assert response.status_code == 404, (path, response.data)
        assert b"no such file of the tab" in response.data


def test_techniques_say_which_draw_images_and_how_many(client):
    _, http = client
    techniques = {t["name"]: t for t in json.loads(http.get(f"{BASE}/techniques").data)}
    assert techniques["diversity"]["images_per_unit"] == 4 and techniques["diversity"]["image"]
    assert techniques["deepdream"]["whole_node"] and not techniques["weights"]["image"]
    assert techniques["caricature"]["probe_images"] and techniques["caricature"]["image"]
    assert not any(t["probe_images"] for name, t in techniques.items() if name != "caricature")


def test_each_diversity_image_is_served(client):
    _, http = client
    query = "run=demo&step=10&node=conv2&unit=1&technique=diversity"
    images = [wait_for_png(http, f"{query}&image={i}") for i in range(4)]
    assert len({image.tobytes() for image in images}) == 4  # four distinct images
    response = http.get(f"{BASE}/image?{query}&image=4")
    assert response.status_code == 400 and b"image must be from 0 to 3" in response.data


def test_a_whole_node_queued_in_one_post_is_one_optimization(client):
    plugin, http = client
    body = {"run": "demo", "step": 10, "node": "conv1", "units": "all"}
    response = post(http, "render", body)
    assert response.status_code == 200
    statuses = json.loads(response.data)["units"]
    assert len(statuses) == 16 and {s["status"] for s in statuses.values()} <= {"queued", "running"}
    images = [wait_for_png(http, f"run=demo&step=10&node=conv1&unit={u}") for u in range(16)]
    wait_until_idle(plugin)  # the images are on disk a moment before the render is counted
    assert plugin.service.stats["renders"] == 1, (plugin.service.stats, list(plugin.service.recent))
    assert plugin.service.stats["units_rendered"] == 16
    run = tb_microscope.open_run(plugin._logdir + "/demo")
    engine = tb_microscope.render(
        run, 10, "conv1", [0, 15], size=SIZE, iterations=ITERATIONS, device="cpu"
    )
    np.testing.assert_array_equal(images[0], engine.images[0])
    np.testing.assert_array_equal(images[15], engine.images[1])


def test_identical_concurrent_requests_share_one_render(client):
    plugin, http = client
    query = "run=demo&step=7&node=conv2&unit=9"
    codes = []

    def ask():
        codes.append(http.get(f"{BASE}/image?{query}").status_code)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(codes) == {202}
    wait_for_png(http, query)
    wait_until_idle(plugin)
    assert plugin.service.stats["renders"] == 1, (plugin.service.stats, list(plugin.service.recent))


def test_examples_weights_and_history_routes(client):
    plugin, http = client
    examples = wait_for_json(http, "examples?run=demo&step=10&node=conv2&unit=3&count=3")
    assert len(examples["examples"]) == 3
    assert examples["examples"][0]["crop"].startswith("data:image/png;base64,")
    weights = wait_for_json(http, "weights?run=demo&step=10&node=conv2&unit=3")
    assert weights["source"] == "pool1" and len(weights["connections"]) == 8
    history = wait_for_json(http, "history?run=demo&node=conv2&unit=3")
    assert [h["step"] for h in history["history"]] == [0, 1, 2, 3, 5, 7, 10]
    wait_until_idle(plugin)
    assert plugin.service.stats["analyses"] == 3  # each computed once, on a worker
    again = http.get(f"{BASE}/weights?run=demo&step=10&node=conv2&unit=3")
    assert again.status_code == 200 and json.loads(again.data) == weights  # from the cache
    assert plugin.service.stats["analyses"] == 3


def decode_png(data_url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :]))))


def test_attribution_is_computed_on_a_worker_and_is_the_librarys(client, logdir):
    plugin, http = client
    query = "attribution?run=demo&step=10&node=conv2&unit=3&image=5"
    first = http.get(f"{BASE}/{query}")
    assert first.status_code == 202 and json.loads(first.data)["status"] in ("queued", "running")
    result = wait_for_json(http, query)
    run = tb_microscope.open_run(logdir / "demo")
    direct = tb_microscope.attribution(run, 10, "conv2", 3, 5, device="cpu")
    values = np.array(result["values"])
    assert values.shape == direct.shape == tuple(run.probe_images().shape[2:])  # 32 x 32
    assert (result["method"], result["image"], result["step"]) == ("integrated_gradients", 5, 10)
    np.testing.assert_allclose(values, direct, rtol=1e-3)  # four significant digits
    assert result["sum"] == pytest.approx(float(direct.sum()), rel=1e-4)
    assert abs(values.sum() - direct.sum()) <= 1e-3 * np.abs(direct).sum()
    assert (result["min"], result["max"]) == pytest.approx((direct.min(), direct.max()))
    overlay = decode_png(result["overlay"])  # RGBA: red raises the unit, blue lowers it
    assert overlay.shape == (*direct.shape, 4)
    png = http.get(f"{BASE}/{query}&format=png")  # the heat map alone, as a PNG
    assert png.status_code == 200 and png.headers["Content-Type"] == "image/png"
    assert (np.asarray(Image.open(io.BytesIO(png.data))) == overlay).all()
    strong = np.abs(direct) >= np.quantile(np.abs(direct), 0.99)
    assert (overlay[..., 3][strong] == round(255 * HEAT_ALPHA)).all()  # the most opaque
    assert (overlay[..., 3][direct == 0] == 0).all()
    assert (overlay[..., 0][strong & (direct > 0)] > overlay[..., 2][strong & (direct > 0)]).all()
    assert (overlay[..., 2][strong & (direct < 0)] > overlay[..., 0][strong & (direct < 0)]).all()
    # the demo's ReLUs are functions: guided backprop is the gradient, and the result says so
    guided = wait_for_json(http, query + "&method=guided_backprop")
    assert guided["method"] == "guided_backprop"
    assert any("no nn.ReLU module runs before it" in note for note in guided["notes"])
    wait_until_idle(plugin)
    analyses = plugin.service.stats["analyses"]
    assert json.loads(http.get(f"{BASE}/{query}").data) == result  # from the cache
    assert plugin.service.stats["analyses"] == analyses


def test_a_bad_attribution_request_says_what_was_wrong(client):
    plugin, http = client
    good = "run=demo&step=10&node=conv2&unit=3"
    assert_refused(
        http,
        "attribution",
        [
            (f"{good}&image=0&method=lime", 400, b"integrated_gradients, saliency, guided_"),
            (f"{good}&image=128", 400, b"probe image 128 is out of range for run 'demo'"),
            (f"{good}", 400, b"image"),
            ("run=demo&step=10&node=conv2&unit=32&image=0", 400, b"unit 32 is out of range"),
            ("run=demo&step=10&node=nope&unit=0&image=0", 404, b"nope"),
            ("run=demo&step=4&node=conv2&unit=0&image=0", 404, b"4"),
            ("run=nope&step=10&node=conv2&unit=0&image=0", 404, b"nope"),
        ],
    )
    assert plugin.service.idle()  # nothing refused was queued


def test_attribution_without_captum_names_the_extra_to_install(client, monkeypatch):
    plugin, http = client
    monkeypatch.setitem(sys.modules, "captum", None)  # what an environment without it imports
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    response = http.get(f"{BASE}/attribution?run=demo&step=10&node=conv2&unit=3&image=0")
    assert response.status_code == 400, response.data
    assert b"pip install 'tb-microscope[attribution]'" in response.data
    assert plugin.service.idle()


def test_a_caricature_through_the_image_route_is_the_engines(client, logdir):
    _, http = client
    query = "run=demo&step=10&node=conv2&technique=caricature"
    picture = wait_for_png(http, f"{query}&image=7")
    run = tb_microscope.open_run(logdir / "demo")
    engine = tb_microscope.render(
        run, 10, "conv2", [], "caricature", image=7, size=SIZE, iterations=ITERATIONS, device="cpu"
    )
    np.testing.assert_array_equal(picture, engine.images[0])
    # the render route names a caricature's probe images as its units, and unit= may say so too
    body = {"run": "demo", "step": 10, "node": "conv2", "technique": "caricature", "units": [7]}
    assert json.loads(post(http, "render", body).data)["units"] == {"7": {"status": "done"}}
    np.testing.assert_array_equal(wait_for_png(http, f"{query}&unit=7"), picture)
    for bad, words in [
        ("&image=128", b"probe image 128 is out of range"),
        ("&image=7&unit=3", b"got image=7 and unit=3"),
        ("", b"pass image="),
    ]:
        response = http.get(f"{BASE}/image?{query}{bad}")
        assert response.status_code == 400 and words in response.data, (bad, response.data)
    response = post(http, "render", {**body, "units": [128]})
    assert response.status_code == 400 and b"probe image 128" in response.data


def read_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_an_atlas_through_the_route_is_the_librarys(client, logdir, tmp_path):
    plugin, http = client
    query = "atlas?run=demo&step=3&node=conv2&grid=6"
    first = http.get(f"{BASE}/{query}")
    assert first.status_code == 202 and json.loads(first.data)["status"] in ("queued", "running")
    result = wait_for_json(http, query)
    run = tb_microscope.open_run(logdir / "demo")
    direct = tb_microscope.activation_atlas(
        run, 3, "conv2", grid=6, size=SIZE, iterations=ITERATIONS, device="cpu", cache_dir=tmp_path
    )
    assert result == {**direct.to_dict(), "picture": f"{query}&format=png"}
    assert (result["step"], result["layout_step"], result["grid"]) == (3, 10, 6)  # the last step
    assert all(len(cell["units"]) == 3 and cell["examples"] for cell in result["cells"])
    picture = http.get(f"{BASE}/{result['picture']}")
    assert picture.status_code == 200 and picture.headers["Content-Type"] == "image/png"
    rgba = read_png(picture.data)  # the cells opaque, the empty ones transparent
    assert rgba.shape == (6 * SIZE, 6 * SIZE, 4)
    np.testing.assert_array_equal(rgba[..., :3], direct.image)
    filled = np.zeros((6, 6), bool)
    filled[[c["row"] for c in result["cells"]], [c["col"] for c in result["cells"]]] = True
    alpha = rgba[..., 3].reshape(6, SIZE, 6, SIZE)
    assert (alpha.transpose(0, 2, 1, 3)[filled] == 255).all()
    assert (alpha.transpose(0, 2, 1, 3)[~filled] == 0).all()
    # another step of the slider: the same layout and cells, other pictures
    other = wait_for_json(http, "atlas?run=demo&step=10&node=conv2&grid=6")
    assert (other["coords"], other["sources"]) == (result["coords"], result["sources"])
    assert [(c["row"], c["col"]) for c in other["cells"]] == [
        (c["row"], c["col"]) for c in result["cells"]
    ]
    later = read_png(http.get(f"{BASE}/{other['picture']}").data)
    assert not np.array_equal(later, rgba)
    wait_until_idle(plugin)
    analyses = plugin.service.stats["analyses"]
    assert json.loads(http.get(f"{BASE}/{query}").data) == result  # from the cache
    assert plugin.service.stats["analyses"] == analyses
    good = "run=demo&step=3&node=conv2"
    assert_refused(
        http,
        "atlas",
        [
            (f"{good}&grid=1", 400, b"grid must be from 2 to 50"),
            (f"{good}&grid=6&quality=best", 400, b"quality must be one of full, preview"),
            (f"{good}&grid=6&layout_step=4", 404, b"4"),
            ("run=demo&step=3&node=nope", 404, b"nope"),
        ],
    )
    assert plugin.service.stats["analyses"] == analyses  # nothing refused was queued


def test_concepts_through_the_route_are_the_librarys(client, logdir, tmp_path):
    plugin, http = client
    query = "concepts?run=demo&step=3&node=pool2&count=4"  # nmf, the default, after a ReLU
    first = http.get(f"{BASE}/{query}")
    assert first.status_code == 202 and json.loads(first.data)["status"] in ("queued", "running")
    result = wait_for_json(http, query)
    run = tb_microscope.open_run(logdir / "demo")
    direct = tb_microscope.concepts(run, 3, "pool2", count=4, device="cpu", cache_dir=tmp_path)
    pictures = render_concepts(
        run, direct, size=SIZE, iterations=ITERATIONS, device="cpu", cache_dir=tmp_path
    )
    urls = [f"{query}&format=png&concept={k}" for k in range(4)]
    assert result == {**direct.to_dict(), "size": SIZE, "pictures": urls}
    assert (result["method"], result["reference_step"], result["count"]) == ("nmf", 10, 4)
    for k, url in enumerate(urls):
        picture = http.get(f"{BASE}/{url}")
        assert picture.status_code == 200 and picture.headers["Content-Type"] == "image/png"
        np.testing.assert_array_equal(read_png(picture.data), pictures[k])
    strip = read_png(http.get(f"{BASE}/{query}&format=png").data)  # all of them in a row
    np.testing.assert_array_equal(strip, np.concatenate(list(pictures), axis=1))
    # a concept's examples: its strongest probe images, strongest first
    examples = wait_for_json(http, f"{query}&view=examples&concept=1&examples=3")
    assert examples["unit"] == 1
    assert [e["index"] for e in examples["examples"]] == result["top"][1][:3]
    codes = [e["activation"] for e in examples["examples"]]
    assert codes == sorted(codes, reverse=True) and codes[0] > 0
    assert all(e["crop"].startswith("data:image/png;base64,") for e in examples["examples"])
    # which pixels of a probe image drive a concept: its direction's projection as the objective
    image = result["top"][1][0]
    found = wait_for_json(http, f"{query}&view=attribution&concept=1&image={image}")
    values, notes = concept_attribution_and_notes(run, direct, 1, image, device="cpu")
    assert (found["unit"], found["image"], found["method"]) == (1, image, "integrated_gradients")
    np.testing.assert_allclose(np.array(found["values"]), values, rtol=1e-3, atol=1e-6)
    assert found["notes"] == notes and found["overlay"].startswith("data:image/png;base64,")
    # the reference step itself: each concept is its own counterpart
    last = wait_for_json(http, "concepts?run=demo&step=10&node=pool2&count=4")
    assert last["similarity"] == [1.0] * 4 and last["step"] == last["reference_step"] == 10
    signed = wait_for_json(http, "concepts?run=demo&step=3&node=conv2&count=4&method=sae")
    assert signed["method"] == "sae" and 0 < signed["explained"] <= 1
    wait_until_idle(plugin)
    analyses = plugin.service.stats["analyses"]
    assert json.loads(http.get(f"{BASE}/{query}").data) == result  # from the cache
    assert plugin.service.stats["analyses"] == analyses
    good = "run=demo&step=3&node=pool2"
    assert_refused(
        http,
        "concepts",
        [
            (f"{good}&method=ica", 400, b"method 'ica' is not known; methods: nmf, sae, pca"),
            (f"{good}&count=0", 400, b"count must be from 1"),
            (f"{good}&count=33", 400, b"at most the 32 units of node 'pool2'"),
            (f"{good}&count=65&method=sae", 400, b"--microscope_max_count 64"),
            (f"{good}&reference_step=4", 404, b"4"),
            (f"{good}&quality=best", 400, b"quality must be one of full"),
            (f"{good}&view=examples", 400, b"missing query parameter 'concept'"),
            (f"{good}&view=examples&count=4&concept=4", 400, b"concept must be from 0 to 3"),
            (f"{good}&view=units", 400, b"view must be concepts, examples or attribution"),
            (f"{good}&view=attribution&concept=0", 400, b"missing query parameter 'image'"),
            (f"{good}&view=attribution&concept=0&image=0&attribution=x", 400, b"attribution must"),
            (f"{good}&view=attribution&concept=0&image=100000", 400, b"image"),
            (f"{query[9:]}&format=png&concept=9", 400, b"concept must be from 0 to 3"),
            ("run=demo&step=3&node=nope", 404, b"nope"),
        ],
    )
    assert plugin.service.stats["analyses"] == analyses  # nothing refused was queued
    # NMF on a node with negative activations fails after its fit, saying what to use instead
    refused = "concepts?run=demo&step=3&node=conv2&count=4"
    deadline = time.monotonic() + 120
    while (response := http.get(f"{BASE}/{refused}")).status_code == 202:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert response.status_code == 400 and b"method='sae'" in response.data, response.data


def test_an_atlas_preview_is_cheaper_and_never_beyond_the_servers_settings():
    from tb_microscope.optvis.engine import Quality
    from tb_microscope.server.previews import atlas_qualities

    assert atlas_qualities(Quality(128, 512)) == {
        "full": Quality(64, 128),
        "preview": Quality(32, 24),
    }
    assert atlas_qualities(Quality(48, 64)) == {"full": Quality(48, 64), "preview": Quality(32, 24)}
    assert atlas_qualities(Quality(24, 8)) == {"full": Quality(24, 8), "preview": None}


def test_the_probe_route_serves_a_probe_image(client, logdir):
    _, http = client
    images = tb_microscope.open_run(logdir / "demo").probe_images()
    response = http.get(f"{BASE}/probe?run=demo&image=5")
    assert response.status_code == 200 and response.headers["Content-Type"] == "image/png"
    np.testing.assert_array_equal(read_png(response.data), images[5].permute(1, 2, 0).numpy())
    assert_refused(
        http,
        "probe",
        [
            ("run=demo&image=128", 400, b"probe image 128 is out of range for run 'demo'"),
            ("run=demo", 400, b"image"),
            ("run=nope&image=0", 404, b"nope"),
        ],
    )


def test_dynamics_and_align_routes_compute_on_a_worker_once(client, logdir):
    plugin, http = client
    whole = wait_for_json(http, "dynamics?run=demo")
    run = tb_microscope.open_run(logdir / "demo")
    assert whole["nodes"] == [n.name for n in run.nodes] and whole["steps"] == run.steps
    assert all(row[-1] == pytest.approx(1.0) for row in whole["cka_to_final"])
    node = wait_for_json(http, "dynamics?run=demo&node=conv2")
    assert len(node["unit_correlation"]) == 32 and len(node["formed_step"]) == 32
    assert node["cka_to_final"] == whole["cka_to_final"][whole["nodes"].index("conv2")]
    aligned = wait_for_json(http, "align?run=demo&step=10&node=conv2&run2=demo&step2=10")
    assert aligned["unit_b"] == list(range(32))  # a step matched with itself: the identity
    assert min(c for c in aligned["correlation"] if c is not None) > 0.9999
    changed = wait_for_json(http, "align?run=demo&step=0&node=conv2&run2=demo&step2=10")
    assert changed["b"] == {"run": "demo", "step": 10} and len(changed["same_unit"]) == 32
    wait_until_idle(plugin)
    assert plugin.service.stats["analyses"] == 4
    assert http.get(f"{BASE}/dynamics?run=demo&node=conv2").status_code == 200  # cached
    for bad, code in [
        ("dynamics?run=demo&node=nope", 404),
        ("align?run=demo&step=10&node=conv2&run2=demo&step2=4", 404),
        ("align?run=demo&step=10&node=conv2&run2=demo", 400),
        ("align?run=demo&step=10&node=conv2&run2=other&step2=0", 404),
    ]:
        response = http.get(f"{BASE}/{bad}")
        assert response.status_code == code, (bad, response.data)
    assert plugin.service.stats["analyses"] == 4


def test_dynamics_of_a_run_without_probe_images_say_how_to_get_them(tmp_path, tiny):
    with tb_microscope.Logger(tmp_path / "plain", tiny, torch.rand(2, 3, 16, 16)) as logger:
        logger.log(0)
    plugin, http = make_plugin(tmp_path)
    node = tb_microscope.open_run(tmp_path / "plain").nodes[0].name
    for path in (
        "dynamics?run=plain",
        f"align?run=plain&step=0&node={node}&run2=plain&step2=0",
        f"attribution?run=plain&step=0&node={node}&unit=0&image=0",
        f"image?run=plain&step=0&node={node}&technique=caricature&image=0",
        f"atlas?run=plain&step=0&node={node}",
        "probe?run=plain&image=0",
    ):
        response = http.get(f"{BASE}/{path}")
        assert response.status_code == 400 and b"probe=" in response.data, response.data
    body = {"run": "plain", "step": 0, "node": node, "technique": "caricature", "units": [0]}
    response = post(http, "render", body)
    assert response.status_code == 400 and b"has no probe images" in response.data
    assert plugin.service.idle()


def test_thumbnails_name_the_latest_step_whose_first_units_are_cached(logdir, tmp_path):
    plugin, http = make_plugin(logdir, microscope_cache_dir=str(tmp_path))
    assert json.loads(http.get(f"{BASE}/thumbnails?run=demo").data) == {}
    wait_for_png(http, "run=demo&step=3&node=conv1&unit=0")
    assert json.loads(http.get(f"{BASE}/thumbnails?run=demo&count=1").data) == {
        "conv1": {"step": 3, "quality": "full", "units": [0]}
    }
    for unit in (0, 1):
        wait_for_png(http, f"run=demo&step=7&node=conv1&unit={unit}")
    found = json.loads(http.get(f"{BASE}/thumbnails?run=demo&count=2").data)
    assert found == {"conv1": {"step": 7, "quality": "full", "units": [0, 1]}}
    wait_until_idle(plugin)
    renders = plugin.service.stats["renders"]
    http.get(f"{BASE}/thumbnails?run=demo&count=16")
    assert plugin.service.idle() and plugin.service.stats["renders"] == renders  # none asked


def test_a_failed_render_reports_its_error_and_the_worker_goes_on(logdir, tmp_path):
    broken = tmp_path / "logdir"
    train(broken / "demo", steps=3, log=lambda *_: None)
    snapshot = RunStore(broken / "demo").snapshot_path(2)
    snapshot.write_bytes(snapshot.read_bytes()[:100])
    plugin, http = make_plugin(broken)
    query = "run=demo&step=2&node=conv1&unit=0"
    deadline = time.monotonic() + 60
    while (response := http.get(f"{BASE}/image?{query}")).status_code == 202:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert response.status_code == 400  # found from its header, before anything is queued
    assert b"is corrupt or truncated" in response.data and b"its header claims" in response.data
    assert b"delete this file" in response.data
    assert wait_for_png(http, "run=demo&step=3&node=conv1&unit=0").shape == (SIZE, SIZE, 3)


def test_a_pickled_architecture_needs_the_flag(tmp_path):
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            h = self.conv(x)
            return h if h.mean() > 0 else -h

    with pytest.warns(RuntimeWarning, match="could not capture"):
        with tb_microscope.Logger(tmp_path / "run", Branchy(), torch.rand(2, 3, 16, 16)) as lg:
            lg.log(0)
    _, http = make_plugin(tmp_path)
    response = http.get(f"{BASE}/image?run=run&step=0&node=conv&unit=0")
    assert response.status_code == 400 and b"--microscope_allow_pickle" in response.data
    _, trusting = make_plugin(tmp_path, microscope_allow_pickle=True)
    assert wait_for_png(trusting, "run=run&step=0&node=conv&unit=0").shape == (SIZE, SIZE, 3)


def test_a_full_queue_answers_503(client):
    plugin, http = client
    plugin.service.max_queued = 0
    response = http.get(f"{BASE}/image?run=demo&step=5&node=conv3&unit=1")
    assert response.status_code == 503 and b"render queue is full" in response.data


GOOD = '{"run": "demo", "step": 10, "node": "conv1", "units": [0]}'
JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    "method, path, body, headers, code",
    [
        ("get", "/render", None, {}, 400),
        ("post", "/render", "not json", JSON, 400),
        (
            "post",
            "/render",
            '{"run": "demo", "step": 10, "node": "conv1", "units": [99]}',
            JSON,
            400,
        ),
        ("post", "/render", '{"run": "demo", "step": 10, "node": "conv1", "units": 5}', JSON, 400),
        ("post", "/render", '{"run": "demo", "step": true, "node": "conv1"}', JSON, 400),
        ("post", "/render", GOOD, {"Content-Type": "text/plain"}, 415),
        ("post", "/render", GOOD, {}, 415),
        ("post", "/cancel", GOOD, {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ("post", "/render", GOOD, {**JSON, "Origin": "http://evil.example"}, 403),
        ("post", "/cancel", GOOD, {**JSON, "Origin": "null"}, 403),
        ("post", "/render", GOOD, {**JSON, "Sec-Fetch-Site": "cross-site"}, 403),
        ("post", "/render", GOOD[:-1] + ", " + " " * (1 << 20) + "}", JSON, 413),
        ("get", "/nodes?run=%2e%2e%2f%2e%2e", None, {}, 404),
        ("get", "/examples?run=demo&step=10&node=conv2", None, {}, 400),
        ("get", "/weights?run=demo&step=10&node=conv1&unit=0", None, {}, 400),
        ("get", "/weights?run=demo&step=10&node=conv2&unit=0&source=nope", None, {}, 404),
        ("get", "/history?run=demo&node=nope&unit=0", None, {}, 404),
        ("get", "/image?run=demo&step=10&node=conv1&unit=0&technique=examples", None, {}, 400),
    ],
)
def test_bad_requests_get_a_message(client, method, path, body, headers, code):
    plugin, http = client
    response = getattr(http, method)(BASE + path, data=body, headers=headers)
    assert response.status_code == code, response.data
    assert len(response.data) > 10
    assert http.get(f"{BASE}/runs").status_code == 200
    assert plugin.service.idle()  # nothing refused was queued


def test_a_same_origin_json_post_is_taken(client):
    _, http = client
    headers = {**JSON, "Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}
    response = http.post(f"{BASE}/render", data=GOOD, headers=headers)
    assert response.status_code == 200, response.data
    cancelled = http.post(f"{BASE}/cancel", data=GOOD, headers=headers)
    assert cancelled.status_code == 200 and json.loads(cancelled.data)["cancelled"] in (0, 1)


def test_a_preview_comes_first_and_the_full_render_replaces_it(logdir):
    plugin, http = make_plugin(
        logdir,
        microscope_size=32,
        microscope_iterations=400,
        microscope_preview_size=16,
        microscope_preview_iterations=2,
    )
    settings = json.loads(http.get(f"{BASE}/settings").data)
    assert settings == {
        "size": 32,
        "iterations": 400,
        "preview": {"size": 16, "iterations": 2},
        "attribution_methods": ["integrated_gradients", "saliency", "guided_backprop"],
        "atlas": {  # an atlas's cells: never larger or longer than a unit's render
            "full": {"size": 32, "iterations": 128},
            "preview": {"size": 32, "iterations": 24},
        },
        "limits": {"size": 32, "iterations": 400, "grid": 40, "count": 64},  # the flags' defaults
    }
    body = {"run": "demo", "step": 5, "node": "conv1", "units": [0, 1, 2, 3]}
    deadline = time.monotonic() + 120
    while True:  # the previews arrive while the full render is still to come
        statuses = json.loads(post(http, "render", body).data)["units"]
        assert {s["status"] for s in statuses.values()} <= {"queued", "running"}, statuses
        if all(s.get("preview") for s in statuses.values()):
            break
        assert time.monotonic() < deadline, statuses
        time.sleep(0.05)
    preview = http.get(f"{BASE}/image?run=demo&step=5&node=conv1&unit=2&quality=preview")
    assert preview.status_code == 200
    assert Image.open(io.BytesIO(preview.data)).size == (16, 16)
    full = wait_for_png(http, "run=demo&step=5&node=conv1&unit=2")
    assert full.shape == (32, 32, 3)
    wait_until_idle(plugin)
    done = [(work.preview, units) for work, units, _ in plugin.service.recent]
    assert done[0] == (True, [0, 1, 2, 3])  # the preview went first, in one optimization
    assert (False, [0, 1, 2, 3]) in done
    bad = http.get(f"{BASE}/image?run=demo&step=5&node=conv1&unit=2&quality=best")
    assert bad.status_code == 400 and b"quality must be one of full, preview" in bad.data
