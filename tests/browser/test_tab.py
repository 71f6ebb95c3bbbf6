"""The Microscope tab in Debian's headless Chromium, driven by Playwright, against a real
TensorBoard serving runs the demo's training wrote.

TensorBoard runs under --path_prefix, so any URL the tab does not build relative to its own
fails here. Screenshots go to build/screenshots/ (or $TB_MICROSCOPE_SCREENSHOTS).
"""

import json
import re
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from playwright.sync_api import expect, sync_playwright
from torch import nn

import tb_microscope
from conftest import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS, http, tensorboard
from tb_microscope.demo.model import SmallCNN
from tb_microscope.demo.train import train
from tb_microscope.execution.cache import RenderKey
from tb_microscope.store.local import RunStore

SIZE, ITERATIONS = 24, 8

WAIT_MS = 120_000

# Every <img> under a selector: whether it decoded, its size, its pixels' spread and hash, how
# many of them show (alpha above 0: an overlay is transparent where it says nothing), and
# whether the image itself is laid out.
IMAGES_JS = """(selector) => [...document.querySelectorAll(selector)].map((img) => {
  if (!img.complete || !img.naturalWidth) return {decoded: false};
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext('2d');
  context.drawImage(img, 0, 0);
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let sum = 0, squares = 0, n = 0, hash = 0, shown = 0;
  for (let i = 0; i < data.length; i += 4) {
    shown += data[i + 3] > 0;
    for (let c = 0; c < 3; c++) {
      sum += data[i + c]; squares += data[i + c] ** 2; n++;
      hash = (hash * 31 + data[i + c]) % 1000000007;
    }
  }
  const mean = sum / n;
  return {decoded: true, width: img.naturalWidth, std: Math.sqrt(squares / n - mean ** 2), hash,
    shown, visible: img.offsetWidth > 0};
})"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """TensorBoard under /tb on two demo runs: 'demo' (30 steps) and 'other' (10 steps)."""
    logdir = tmp_path_factory.mktemp("logdir")
    train(logdir / "demo", steps=30, log=lambda *_: None)
    train(logdir / "other", steps=10, log=lambda *_: None)
    flags = ["--path_prefix", "/tb"]
    flags += ["--microscope_size", str(SIZE), "--microscope_iterations", str(ITERATIONS)]
    flags += ["--microscope_max_iterations", "150"]  # a long render keeps the worker busy below
    with tensorboard(logdir, *flags) as url:
        assert url.endswith("/tb")
        yield url, logdir


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/test.sh installs Debian's chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"the page threw: {errors}"


def steps_of(logdir, run="demo"):
    return tb_microscope.open_run(logdir / run).steps


def tab_url(base, **state) -> str:
    keys = "".join(
        f"&p.tb_microscope.{key}={urllib.parse.quote(str(value))}" for key, value in state.items()
    )
    return f"{base}/#tb_microscope{keys}"


def open_tab(page, base, **state):
    """Open TensorBoard at the tab (with `state` in its URL); the tab's frame."""
    page.goto(tab_url(base, **state))
    page.wait_for_selector("iframe[src*='plugin_entry.html?name=tb_microscope']")
    deadline = time.monotonic() + 60
    while (frame := page.frame(url=re.compile(r"plugin_entry\.html\?name=tb_microscope"))) is None:
        assert time.monotonic() < deadline, "the tab's frame never loaded"
        page.wait_for_timeout(100)  # the <iframe> is in the page before its document
    frame.wait_for_selector("main > section", timeout=WAIT_MS)
    return frame


def url_state(page) -> dict:
    fragment = urllib.parse.urlparse(page.url).fragment
    pairs = [part.split("=", 1) for part in fragment.split("&") if "=" in part]
    prefix = "p.tb_microscope."
    return {k[len(prefix) :]: urllib.parse.unquote(v) for k, v in pairs if k.startswith(prefix)}


def wait_rendered(frame, selector, count):
    """Wait until `count` cells under `selector` are done; their images, decoded."""
    cells = frame.locator(f"{selector} .cell")
    expect(cells).to_have_count(count, timeout=WAIT_MS)
    expect(frame.locator(f"{selector} .cell[data-status='done']")).to_have_count(
        count, timeout=WAIT_MS
    )
    failed = frame.locator(f"{selector} .cell[data-status='failed']")
    assert failed.count() == 0, failed.first.get_attribute("title")
    images = f"{selector} .cell[data-status='done'] img"
    wait_loaded(frame, images)  # a cell is done as its <img> is made, before it decodes
    return frame.evaluate(IMAGES_JS, images)


def wait_loaded(frame, selector):
    """Wait until every <img> under `selector` has loaded (or failed to: then it has no size)."""
    frame.wait_for_function(
        "(selector) => [...document.querySelectorAll(selector)].every((img) => img.complete)",
        arg=selector,
        timeout=WAIT_MS,
    )


def assert_real_images(images, textured=0.75):
    """Decoded renders at the served size, most with texture (a unit that barely responds, such
    as a ReLU's output that is zero on the starting noise, stays nearly flat)."""
    assert images and all(i["decoded"] and i["width"] == SIZE for i in images), images
    count = sum(i["std"] > 2 for i in images)
    assert count >= textured * len(images), f"only {count} of {len(images)} images have texture"


def shoot(page, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def post_render(base, **body):
    status, _, answer = http(f"{base}/data/plugin/tb_microscope/render", body)
    assert status == 200, answer
    return json.loads(answer)


def test_the_tab_appears_and_draws_the_model(served, page):
    base, logdir = served
    frame = open_tab(page, base)
    expect(page.get_by_text("Microscope", exact=False).first).to_be_visible()
    run = tb_microscope.open_run(logdir / "demo")
    rows = frame.locator(".nodes .node")
    expect(rows).to_have_count(len(run.nodes) + 1)  # the input, then every node
    expect(rows.nth(3)).to_contain_text("conv2")
    expect(rows.nth(3)).to_contain_text("32 units")
    assert frame.locator(".edges .edge").count() == len(run.edges)
    parameters = sum(p.numel() for p in SmallCNN().parameters())
    expect(frame.locator(".view-head")).to_contain_text(f"{parameters:,} parameters")
    shoot(page, "model")
    frame.locator(".nodes a[data-node='conv1']").click()
    wait_rendered(frame, ".grid", 16)
    assert url_state(page)["node"] == "conv1"


def test_units_show_their_state_then_fill_in_and_the_slider_changes_them(served, page):
    base, logdir = served
    steps = steps_of(logdir)
    frame = open_tab(page, base, run="demo")
    # Keep the render worker busy, so that the grid's units wait in the queue, visibly.
    post_render(
        base, run="demo", step=steps[1], node="conv3", units=list(range(16)), iterations=150
    )
    frame.locator(".nodes a[data-node='conv2']").click()
    expect(frame.locator(".grid .cell[data-status='queued']").first).to_contain_text(
        re.compile(r"queued #\d+"), timeout=WAIT_MS
    )
    shoot(page, "node-queued")
    last = wait_rendered(frame, ".grid", 32)
    assert_real_images(last)
    dream = wait_rendered(frame, "aside", 1)
    assert_real_images(dream)
    shoot(page, "node")

    frame.locator("#step").focus()
    frame.locator("#step").press("Home")
    expect(frame.locator(".step-label")).to_contain_text(f"{steps[0]} (1/{len(steps)})")
    assert url_state(page)["step"] == str(steps[0])
    first = wait_rendered(frame, ".grid", 32)
    assert_real_images(first)
    changed = sum(a["hash"] != b["hash"] for a, b in zip(first, last))
    assert changed >= 24, f"only {changed} of 32 units changed between steps 0 and {steps[-1]}"
    shoot(page, "node-step-0")


def test_the_unit_view_has_a_frame_per_logged_step_that_plays(served, page):
    base, logdir = served
    steps = steps_of(logdir)
    frame = open_tab(page, base, run="demo", node="conv2", unit=3)
    expect(frame.locator(".unit-view .address").first).to_have_text(f"demo@{steps[-1]}/conv2:3")
    frames = wait_rendered(frame, ".filmstrip", len(steps))
    assert_real_images(frames)
    labels = frame.locator(".filmstrip figcaption").all_inner_texts()
    assert labels == [str(s) for s in steps]
    assert_real_images(wait_rendered(frame, ".technique-panel", 1))
    expect(frame.locator(".evolution circle")).not_to_have_count(0, timeout=WAIT_MS)
    shoot(page, "unit")

    seen = set()
    frame.locator("button.play").click()
    for _ in range(12):
        seen.add(frame.locator(".player").get_attribute("src"))
        page.wait_for_timeout(200)
    frame.locator("button.play").click()
    assert len(seen) >= 4, "the animation did not move through the steps"


def test_techniques_examples_and_weights_walk_a_circuit(served, page):
    base, logdir = served
    frame = open_tab(page, base, run="demo", node="conv2", unit=3)
    frame.get_by_role("tab", name="diversity").click()
    assert url_state(page)["technique"] == "diversity"
    diverse = wait_rendered(frame, ".technique-panel", 1)
    assert len(diverse) == 4 and len({i["hash"] for i in diverse}) == 4
    assert_real_images(diverse)

    frame.get_by_role("tab", name="examples").click()
    expect(frame.locator(".example")).to_have_count(12, timeout=WAIT_MS)
    expect(frame.locator(".example .box").first).to_be_visible()

    frame.get_by_role("tab", name="weights").click()
    rows = frame.locator(".connection")
    expect(rows).to_have_count(12, timeout=WAIT_MS)
    assert_real_images(wait_rendered(frame, ".weights-panel", 12))
    shoot(page, "unit-weights")
    target = rows.first.locator("a.address").inner_text()  # e.g. pool1:14
    rows.first.locator("a.address").click()
    node, unit = target.split(":")
    expect(frame.locator(".unit-view .address").first).to_contain_text(f"/{node}:{unit}")
    assert url_state(page)["node"] == node and url_state(page)["unit"] == unit
    page.go_back()
    expect(frame.locator(".unit-view .address").first).to_contain_text("/conv2:3")
    frame.locator("h2").click()
    page.keyboard.press("Escape")  # up to the node: its grid draws channels, not weights
    assert_real_images(wait_rendered(frame, ".grid", 32))
    assert url_state(page)["technique"] == "channel"


def assert_overlays(frame, selector, count, width=32):
    """`count` attribution overlays under `selector`, each decoded at the probe images' size,
    shown, and with pixels that are not transparent."""
    expect(frame.locator(f"{selector} [data-attribution='done']")).to_have_count(
        count, timeout=WAIT_MS
    )
    wait_loaded(frame, f"{selector} img.attribution")
    overlays = frame.evaluate(IMAGES_JS, f"{selector} img.attribution")
    assert len(overlays) == count, overlays
    for overlay in overlays:
        assert overlay["decoded"] and overlay["width"] == width and overlay["visible"], overlay
        assert overlay["shown"] > 0.05 * width * width, overlay
    return overlays


def test_examples_show_attribution_over_each_and_over_training_and_caricatures(served, page):
    base, logdir = served
    steps = steps_of(logdir)
    frame = open_tab(page, base, run="demo", node="conv2", unit=3, technique="examples")
    examples = frame.locator(".example")
    expect(examples).to_have_count(12, timeout=WAIT_MS)
    assert frame.locator(".example img.attribution:visible").count() == 0  # off until asked
    methods = frame.locator("#attribution-method option").all_inner_texts()
    assert methods == ["integrated gradients", "saliency", "guided backprop"]

    frame.locator("#attribution-overlay").check()
    assert_overlays(frame, ".examples", 12)
    strip = frame.locator(".attribution-strip .strip-frame")
    expect(strip).to_have_count(len(steps))
    assert strip.all_inner_texts() == [str(step) for step in steps]
    assert_overlays(frame, ".attribution-strip", len(steps))
    first = examples.first.get_attribute("data-index")
    expect(frame.locator(".attribution-strip h3")).to_contain_text(f"Probe #{first} over training")
    expect(frame.locator(".attribution-strip .strip-frame.current")).to_have_text(str(steps[-1]))

    examples.nth(2).click()  # its attribution over training instead
    picked = examples.nth(2).get_attribute("data-index")
    expect(frame.locator(".attribution-strip h3")).to_contain_text(f"Probe #{picked} over")
    expect(examples.nth(2)).to_have_class(re.compile("selected"))
    assert_overlays(frame, ".attribution-strip", len(steps))
    shoot(page, "unit-examples-attribution")

    frame.locator("#caricatures").check()
    caricatures = wait_rendered(frame, ".examples", 12)  # each example's caricature
    assert_real_images(caricatures)
    shoot(page, "unit-examples-caricatures")

    frame.locator("#attribution-method").select_option("saliency")
    expect(frame.locator(".attribution-strip h3")).to_contain_text("(saliency)")
    assert_overlays(frame, ".examples", 12)
    frame.locator(".attribution-strip .strip-frame").first.click()  # a frame opens its step
    assert url_state(page)["step"] == str(steps[0])
    expect(frame.locator(".example")).to_have_count(12, timeout=WAIT_MS)
    assert frame.locator("#attribution-overlay").is_checked()  # kept across steps
    assert_overlays(frame, ".examples", 12)
    frame.locator("#attribution-overlay").uncheck()
    expect(frame.locator(".attribution-strip")).to_be_hidden()
    assert frame.locator(".example img.attribution:visible").count() == 0


def test_compare_shows_two_steps_side_by_side(served, page):
    base, logdir = served
    steps = steps_of(logdir)
    frame = open_tab(page, base, run="demo", node="conv1", compare=1, step2=steps[0])
    panes = frame.locator(".pane")
    expect(panes).to_have_count(2)
    left = wait_rendered(frame, ".pane.left", 16)
    right = wait_rendered(frame, ".pane.right", 16)
    assert_real_images(left + right)
    assert sum(a["hash"] != b["hash"] for a, b in zip(left, right)) >= 12
    expect(panes.nth(1).locator("h3")).to_have_text(f"demo@{steps[0]}/conv1")
    shoot(page, "compare")

    panes.nth(1).locator("select").select_option("other")
    expect(panes.nth(1).locator("h3")).to_contain_text("other@")
    assert_real_images(wait_rendered(frame, ".pane.right", 16))
    assert url_state(page)["run2"] == "other"


def test_compare_a_unit_in_two_runs(served, page):
    base, _ = served
    frame = open_tab(page, base, run="demo", node="conv2", unit=5, compare=1, run2="other")
    assert_real_images(wait_rendered(frame, ".pane.left", 1))
    assert_real_images(wait_rendered(frame, ".pane.right", 1))


def test_a_deep_link_reopens_the_unit_and_back_and_keys_move_around(served, page):
    base, logdir = served
    steps = steps_of(logdir)
    frame = open_tab(page, base, run="demo", node="conv1", unit=4, step=steps[2])
    expect(frame.locator(".unit-view .address").first).to_have_text(f"demo@{steps[2]}/conv1:4")
    frame.locator("h2").click()  # keys go to the tab once it has the focus
    page.keyboard.press("ArrowDown")
    expect(frame.locator(".unit-view .address").first).to_have_text(f"demo@{steps[2]}/conv1:5")
    page.keyboard.press("ArrowRight")
    expect(frame.locator(".unit-view .address").first).to_have_text(f"demo@{steps[3]}/conv1:5")
    page.go_back()
    expect(frame.locator(".unit-view .address").first).to_have_text(f"demo@{steps[2]}/conv1:5")
    page.go_back()
    expect(frame.locator(".unit-view .address").first).to_have_text(f"demo@{steps[2]}/conv1:4")
    page.keyboard.press("Escape")
    expect(frame.locator(".node-view")).to_be_visible()
    assert "unit" not in url_state(page)


@pytest.mark.parametrize(
    "state, message",
    [
        ({"run": "demo", "node": "nope"}, "node 'nope' is not in run 'demo'; nodes: conv1"),
        ({"run": "demo", "node": "conv1", "unit": 99}, "unit 99 is out of range"),
        ({"run": "gone", "node": "conv1"}, "run 'gone' has no tb_microscope data"),
        ({"run": "demo", "step": 4}, "step 4 is not logged in run 'demo'"),
        (
            {"run": "demo", "node": "conv1", "atlas": 1, "grid": 99},
            "grid '99' is not a number of atlas cells a side from 2 to 50",
        ),
    ],
)
def test_a_deep_link_to_something_missing_says_what(served, page, state, message):
    base, _ = served
    page.goto(tab_url(base, **state))
    frame = page.frame_locator("iframe[src*='tb_microscope']")
    expect(frame.get_by_role("alert")).to_contain_text(message, timeout=WAIT_MS)
    if state.get("node") == "nope":
        shoot(page, "missing-node")
    frame.get_by_text("back to the model of run 'demo'").click()
    expect(frame.locator(".model-view")).to_be_visible()


def wait_for_run(base, name):
    """Until TensorBoard's reload lists a run written after it started."""
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(f"{base}/data/plugin/tb_microscope/runs") as response:
            if name in [r["run"] for r in json.load(response)]:
                return
        assert time.monotonic() < deadline, f"run {name!r} never appeared"
        time.sleep(0.5)


def test_a_failed_render_shows_its_reason_in_each_cell(served, page):
    base, logdir = served
    train(logdir / "worn", steps=3, log=lambda *_: None)
    snapshot = RunStore(logdir / "worn").snapshot_path(2)
    snapshot.write_bytes(snapshot.read_bytes()[:100])
    wait_for_run(base, "worn")
    frame = open_tab(page, base, run="worn", node="conv1", step=2)
    failed = frame.locator(".grid .cell[data-status='failed']")
    expect(failed).to_have_count(16, timeout=WAIT_MS)
    expect(failed.first.locator(".state")).to_have_text("failed: CorruptSnapshotError")
    assert "delete this file" in failed.first.get_attribute("title")
    banner = frame.get_by_role("alert")  # the whole message, once for all 16
    expect(banner).to_have_count(1)
    expect(banner).to_contain_text("16 units failed to render: CorruptSnapshotError")
    expect(banner).to_contain_text("delete this file")
    shoot(page, "node-failed")
    frame.locator("#step").focus()
    frame.locator("#step").press("ArrowRight")  # step 3 is whole: it renders
    wait_rendered(frame, ".grid", 16)


def test_a_broken_run_is_listed_greyed_with_its_error_and_the_others_work(served, page):
    base, logdir = served
    shutil.copytree(logdir / "other", logdir / "damaged")
    manifest = RunStore(logdir / "damaged").manifest_path
    data = json.loads(manifest.read_text())
    del data["nodes"]
    manifest.write_text(json.dumps(data))
    wait_for_run(base, "damaged")
    frame = open_tab(page, base, run="demo")
    option = frame.locator("#run option[value='damaged']")
    expect(option).to_have_text("damaged (cannot be shown)")
    assert "broken" in option.get_attribute("class")
    assert "key 'nodes' is missing" in option.get_attribute("title")
    frame.locator("#run").select_option("damaged")
    expect(frame.get_by_role("alert")).to_contain_text("manifest.json: key 'nodes' is missing")
    shoot(page, "run-broken")
    frame.get_by_text("back to the model of run").click()
    expect(frame.locator(".nodes .node")).to_have_count(7)  # input and the demo's six nodes


def test_a_new_snapshot_reaches_an_open_tab(served, page):
    base, logdir = served
    with tb_microscope.Logger(logdir / "later", SmallCNN(), torch.rand(2, 3, 32, 32)) as logger:
        logger.log(0)
    wait_for_run(base, "later")
    frame = open_tab(page, base, run="later", node="conv1")
    expect(frame.locator(".step-label")).to_have_text("0 (1/1)")
    with tb_microscope.Logger(logdir / "later", SmallCNN(), torch.rand(2, 3, 32, 32)) as logger:
        logger.log(5, force=True)
    expect(frame.locator(".step-label")).to_have_text("0 (1/2)", timeout=30_000)
    frame.locator("#step").focus()
    frame.locator("#step").press("End")
    assert_real_images(wait_rendered(frame, ".grid", 16))
    assert url_state(page)["step"] == "5"


def test_the_tab_follows_tensorboards_dark_mode(served, browser):
    base, _ = served
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="dark")
    page = context.new_page()
    try:
        frame = open_tab(page, base, run="demo", node="conv1")
        assert frame.evaluate("document.documentElement.classList.contains('dark')")
        assert (
            frame.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(48, 48, 48)"
        )
        wait_rendered(frame, ".grid", 16)
        shoot(page, "dark")
        page.get_by_label("Menu for changing light or dark theme").click()
        page.get_by_role("menuitem", name="Light").click()
        frame.wait_for_function("!document.documentElement.classList.contains('dark')")
        assert (
            frame.evaluate("getComputedStyle(document.body).backgroundColor")
            == "rgb(255, 255, 255)"
        )
    finally:
        context.close()


def test_a_model_of_many_nodes_is_grouped_collapsible_and_filtered(served, page):
    from torchvision.models.resnet import BasicBlock, ResNet

    base, logdir = served
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=5)
    with tb_microscope.Logger(logdir / "resnet", model, torch.rand(2, 3, 32, 32)) as logger:
        logger.log(0)
    wait_for_run(base, "resnet")
    nodes = tb_microscope.open_run(logdir / "resnet").nodes
    frame = open_tab(page, base, run="resnet")
    rows = frame.locator(".nodes .node")
    expect(frame.locator(".model-tools")).to_contain_text(f"{len(nodes)} nodes")
    assert rows.count() < len(nodes)  # deep groups start collapsed
    group = frame.locator(".nodes .node", has=frame.locator("a[data-node='layer3']"))
    toggle = group.locator("button.toggle")
    before = rows.count()
    toggle.click()  # open or close layer3's group: its blocks appear or go
    expect(rows).not_to_have_count(before)
    toggle.click()
    expect(rows).to_have_count(before)

    frame.locator("#node-filter").fill("layer3.1.conv")
    matching = [n.name for n in nodes if "layer3.1.conv" in n.name]
    expect(frame.locator(".model-tools")).to_contain_text(
        f"{len(matching)} of {len(nodes)} nodes match"
    )
    for name in matching:  # with the groups that hold them, open
        expect(frame.locator(f".nodes a[data-node='{name}']")).to_be_visible()
    conv = frame.locator(".nodes .node", has=frame.locator("a[data-node='layer3.1.conv2']"))
    expect(conv).to_contain_text("C×H×W")
    expect(conv).to_contain_text(f"{model.layer3[1].conv2.out_channels} units")
    shoot(page, "model-filtered")
    conv.click()
    expect(frame.locator(".grid .cell")).to_have_count(model.layer3[1].conv2.out_channels)
    assert url_state(page)["node"] == "layer3.1.conv2"


def test_a_multispectral_run_shows_the_bands_picked(served, page):
    base, logdir = served
    model = torch.nn.Sequential(
        torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)
    )
    with tb_microscope.Logger(logdir / "bands", model, torch.rand(2, 6, 32, 32)) as logger:
        logger.log(0)
    wait_for_run(base, "bands")
    frame = open_tab(page, base, run="bands", node="0")
    first = wait_rendered(frame, ".grid", 8)
    assert_real_images(first)
    pickers = frame.locator(".bands select")
    expect(pickers).to_have_count(3)
    pickers.nth(0).select_option("5")  # band 5 shown as red
    page.wait_for_function("() => location.hash.includes('bands=5%2C1%2C2')")
    again = wait_rendered(frame, ".grid", 8)
    shoot(page, "bands")
    assert [i["hash"] for i in again] != [i["hash"] for i in first]


def test_previews_show_first_marked_then_the_full_renders_replace_them(served, page):
    _, logdir = served
    flags = ["--microscope_size", "32", "--microscope_iterations", "300"]
    flags += ["--microscope_preview_size", "16", "--microscope_preview_iterations", "4"]
    with tensorboard(logdir, *flags) as base:
        frame = open_tab(page, base, run="other", node="conv1", step=5)
        cells = frame.locator(".grid .cell")
        expect(cells).to_have_count(16)
        previews = frame.locator(".grid .cell[data-quality='preview']")
        expect(previews.first).to_be_visible(timeout=WAIT_MS)
        expect(previews.first).to_contain_text("preview")
        shoot(page, "node-preview")
        expect(frame.locator(".grid .cell[data-quality='full']")).to_have_count(16, timeout=WAIT_MS)
        assert frame.locator(".grid .cell[data-previewed='true']").count() == 16
        images = frame.evaluate(IMAGES_JS, ".grid .cell img")
        assert all(i["decoded"] and i["width"] == 32 for i in images), images


def canvas_cell(canvas, row, column) -> dict:
    """Where cell (row, column) of a heatmap canvas is, for a click."""
    data = canvas.evaluate(
        "(c) => ({w: Number(c.dataset.cellWidth), h: Number(c.dataset.cellHeight)})"
    )
    return {"x": column * data["w"] + data["w"] / 2, "y": row * data["h"] + data["h"] / 2}


def test_dynamics_heatmaps_open_a_node_then_a_unit_at_a_step(served, page):
    base, logdir = served
    run = tb_microscope.open_run(logdir / "demo")
    steps = run.steps
    for _ in range(600):  # conv1's first units rendered at the last step: its row's thumbnails
        units = post_render(base, run="demo", step=steps[-1], node="conv1", units=[0, 1, 2, 3])
        if all(s["status"] == "done" for s in units["units"].values()):
            break
        time.sleep(0.2)
    frame = open_tab(page, base, run="demo")
    rows = frame.locator(".model-dynamics .dyn-row[data-node]")
    expect(rows).to_have_count(len(run.nodes), timeout=WAIT_MS)
    thumbs = frame.locator(".dyn-row[data-node='conv1'] img.dyn-thumb")
    expect(thumbs).to_have_count(4)
    frame.wait_for_function(
        "() => [...document.querySelectorAll('.dyn-row[data-node=conv1] img')]"
        ".every((i) => i.complete && i.naturalWidth > 0)",
        timeout=WAIT_MS,
    )
    shoot(page, "dynamics_model")
    conv2 = frame.locator(".dyn-row[data-node='conv2'] canvas")
    conv2.click(position=canvas_cell(conv2, 0, 2))
    expect(frame.locator(".node-view")).to_be_visible()
    assert url_state(page)["node"] == "conv2" and url_state(page)["step"] == str(steps[2])

    dynamics = tb_microscope.node_dynamics(run, "conv2", cache_dir=logdir / "dynamics-check")
    heat = frame.locator(".node-dynamics canvas.units-heat")
    expect(heat).to_have_attribute("data-rows", "32", timeout=WAIT_MS)
    expect(heat).to_have_attribute("data-order", ",".join(map(str, range(32))))
    frame.locator("#dynamics-sort").select_option("formed")
    never = steps[-1] + 1
    formed = sorted(
        range(32),
        key=lambda u: (never if dynamics.formed_step[u] is None else dynamics.formed_step[u], u),
    )
    expect(heat).to_have_attribute("data-order", ",".join(map(str, formed)))
    assert url_state(page)["sort"] == "formed"
    shoot(page, "dynamics_node")
    heat.click(position=canvas_cell(heat, 3, 1))
    expect(frame.locator(".unit-view")).to_be_visible()
    state = url_state(page)
    assert state["unit"] == str(formed[3]) and state["step"] == str(steps[1])
    expect(frame.locator(".unit-view .address").first).to_have_text(
        f"demo@{steps[1]}/conv2:{formed[3]}"
    )


def test_aligned_compare_pairs_each_unit_with_its_match_in_the_other_run(served, page):
    base, logdir = served
    demo, other = (tb_microscope.open_run(logdir / name) for name in ("demo", "other"))
    step, step2 = demo.steps[-1], other.steps[-1]
    found = tb_microscope.align_units(demo, step, other, step2, "conv1")
    frame = open_tab(
        page,
        base,
        run="demo",
        step=step,
        node="conv1",
        compare=1,
        run2="other",
        step2=step2,
        align=1,
    )
    expect(frame.locator(".align-info[data-ready='true']")).to_contain_text(
        "best matched first", timeout=WAIT_MS
    )
    best = max(range(16), key=lambda u: (found.correlation[u], -u))
    left = frame.locator(".pane.left .cell").first
    right = frame.locator(".pane.right .cell").first
    expect(left).to_have_attribute("data-unit", str(best))
    expect(right).to_have_attribute("data-unit", str(found.unit_b[best]))
    expect(right.locator("figcaption")).to_contain_text(f"r {found.correlation[best]:.2f}")
    wait_rendered(frame, ".pane.left", 16)
    wait_rendered(frame, ".pane.right", 16)
    shoot(page, "compare_aligned")
    frame.locator("#align").click()  # off: units in their own order again
    expect(frame.locator(".pane.right .cell").first).to_have_attribute("data-unit", "0")
    assert "align" not in url_state(page)


def test_the_model_view_says_which_modules_the_capture_left_out_and_why(served, page):
    base, logdir = served
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(8 * 14 * 14, 4)
    )
    with tb_microscope.Logger(logdir / "dropout", model, torch.rand(2, 3, 16, 16)) as logger:
        logger.log(0)
    wait_for_run(base, "dropout")
    frame = open_tab(page, base, run="dropout")
    expect(frame.locator(".nodes a[data-node='2']")).to_have_count(0)
    note = frame.locator("details.capture-note")
    note.locator("summary").click()
    expect(note).to_contain_text("1 module whose output is its input in eval mode (Dropout ×1: 2)")
    shoot(page, "model-capture-note")


def atlas_of(frame, step, node):
    """The atlas route's answer, as the tab got it (from the cache by now)."""
    layout = frame.locator(".atlas-board").get_attribute("data-layout-step")
    query = f"atlas?run=demo&step={step}&node={node}&grid=20&quality=full&layout_step={layout}"
    return frame.evaluate(f"async () => (await fetch('{query}')).json()")


def test_the_atlas_view_keeps_its_layout_over_steps_and_opens_a_cells_units(served, browser):
    base, logdir = served
    steps = steps_of(logdir)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    frame = open_tab(page, base, run="demo", node="conv2")
    frame.locator("#view-atlas").click()  # the node's units / atlas switch
    assert url_state(page)["atlas"] == "1"
    board = frame.locator(".atlas-board")
    expect(board).to_have_attribute("data-state", "done", timeout=4 * WAIT_MS)
    expect(board).to_have_attribute("data-step", str(steps[-1]))
    expect(board).to_have_attribute("data-layout-step", str(steps[-1]))
    atlas = atlas_of(frame, steps[-1], "conv2")
    assert board.get_attribute("data-cells") == str(len(atlas["cells"])) != "0"
    (last,) = frame.evaluate(IMAGES_JS, ".atlas-picture")
    assert last["decoded"] and last["width"] == 20 * SIZE and last["std"] > 10
    # it fills most of a 1400 x 900 screen beside its panel, and is square
    shape = board.bounding_box()
    assert shape["width"] == pytest.approx(shape["height"], abs=1) and shape["width"] >= 600
    panel = frame.locator(".atlas-panel").bounding_box()
    assert panel["x"] >= shape["x"] + shape["width"] and panel["x"] + panel["width"] <= 1400

    # pointing at the fullest cell: its count and its probe images
    cell = max(atlas["cells"], key=lambda c: c["count"])
    where = (
        shape["x"] + (cell["col"] + 0.5) * shape["width"] / 20,
        shape["y"] + (cell["row"] + 0.5) * shape["height"] / 20,
    )
    page.mouse.move(*where)
    expect(frame.locator(".atlas-panel")).to_have_attribute(
        "data-cell", f"{cell['row']},{cell['col']}"
    )
    total = len(atlas["coords"])
    expect(frame.locator(".atlas-count")).to_contain_text(f"{cell['count']} of {total} activations")
    examples = frame.locator(".atlas-example")
    expect(examples).to_have_count(min(8, len(cell["examples"])))
    expect(examples.first).to_have_attribute("alt", f"probe image {cell['examples'][0]}")
    frame.wait_for_function(
        "() => [...document.querySelectorAll('.atlas-example')]"
        ".every((img) => img.complete && img.naturalWidth)"
    )
    shown = frame.evaluate(IMAGES_JS, ".atlas-example")
    assert all(image["decoded"] and image["width"] == 32 for image in shown), shown

    # a click pins it and draws the units its direction stands out on, each a link
    page.mouse.click(*where)
    units = frame.locator(".atlas-units .cell")
    expect(units).to_have_count(len(cell["units"]))
    assert [int(u.get_attribute("data-unit")) for u in units.all()] == cell["units"]
    assert_real_images(wait_rendered(frame, ".atlas-units", len(cell["units"])), textured=0.6)
    page.mouse.move(shape["x"] + shape["width"] + 200, shape["y"] + 40)  # off the atlas: pinned
    expect(frame.locator(".atlas-panel h3")).to_contain_text("pinned")
    shoot(page, "node-atlas")

    # an earlier step: the same layout and cells, other pictures; the pinned cell stays
    frame.locator("#step").focus()
    frame.locator("#step").press("Home")
    expect(board).to_have_attribute("data-step", str(steps[0]), timeout=WAIT_MS)
    expect(board).to_have_attribute("data-state", "done", timeout=4 * WAIT_MS)
    early = atlas_of(frame, steps[0], "conv2")
    assert (early["coords"], early["sources"]) == (atlas["coords"], atlas["sources"])
    assert [(c["row"], c["col"]) for c in early["cells"]] == [
        (c["row"], c["col"]) for c in atlas["cells"]
    ]
    (first,) = frame.evaluate(IMAGES_JS, ".atlas-picture")
    assert first["decoded"] and first["hash"] != last["hash"]
    expect(frame.locator(".atlas-panel")).to_have_attribute(
        "data-cell", f"{cell['row']},{cell['col']}"
    )
    (then,) = [c for c in early["cells"] if (c["row"], c["col"]) == (cell["row"], cell["col"])]
    wait_rendered(frame, ".atlas-units", len(then["units"]))  # the units it stands out on then
    assert [int(u.get_attribute("data-unit")) for u in units.all()] == then["units"]
    shoot(page, "node-atlas-step-0")

    # a unit opens; Escape comes back to the atlas, then to the node's units
    frame.locator(".atlas-units .cell").first.click()
    expect(frame.locator(".unit-view")).to_be_visible()
    assert url_state(page)["unit"] == str(then["units"][0]) and url_state(page)["atlas"] == "1"
    page.keyboard.press("Escape")
    expect(board).to_be_visible()
    page.keyboard.press("Escape")
    expect(frame.locator(".node-view")).to_be_visible()
    assert "atlas" not in url_state(page)
    context.close()
    assert not errors, f"the page threw: {errors}"


def concepts_of(frame, step, node, count, method, reference):
    """The concepts route's answer, as the tab got it (from the cache by now)."""
    query = (
        f"concepts?run=demo&step={step}&node={node}&count={count}&method={method}"
        f"&reference_step={reference}&quality=full"
    )
    return frame.evaluate(f"async () => (await fetch('{query}')).json()")


def concept_attribution(frame, step, concept, image, reference):
    """The integrated gradients of probe image `image` for concept `concept` of pool2's 8 nmf
    concepts matched to step `reference`, as the tab got it (from the cache by now)."""
    query = (
        f"concepts?run=demo&step={step}&node=pool2&count=8&method=nmf&reference_step={reference}"
        f"&view=attribution&concept={concept}&image={image}&attribution=integrated_gradients"
    )
    status, body = frame.evaluate(
        f"async () => {{ const r = await fetch('{query}'); return [r.status, await r.json()]; }}"
    )
    assert status == 200, body
    return body


def test_the_concepts_view_keeps_concept_k_over_steps_and_opens_a_concepts_page(served, browser):
    base, logdir = served
    steps = steps_of(logdir)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    frame = open_tab(page, base, run="demo", node="pool2")
    frame.locator("#view-concepts").click()  # the node's units / atlas / concepts switch
    assert url_state(page)["concepts"] == "1"
    grid = frame.locator(".concepts-grid")
    expect(grid).to_have_attribute("data-state", "done", timeout=4 * WAIT_MS)
    expect(grid).to_have_attribute("data-step", str(steps[-1]))
    expect(grid).to_have_attribute("data-reference-step", str(steps[-1]))
    expect(grid).to_have_attribute("data-method", "nmf")
    expect(frame.locator(".concept")).to_have_count(16)  # the default count
    assert frame.locator(".concepts-note").is_hidden()  # pool2 is after a ReLU: nmf fits

    # fewer concepts: the count picker
    frame.locator("#concepts-count").select_option("8")
    assert url_state(page)["count"] == "8"
    expect(frame.locator(".concept")).to_have_count(8)
    expect(grid).to_have_attribute("data-state", "done", timeout=4 * WAIT_MS)
    found = concepts_of(frame, steps[-1], "pool2", 8, "nmf", steps[-1])
    pictures = frame.evaluate(IMAGES_JS, ".concept-picture")
    assert len(pictures) == 8 and all(p["decoded"] and p["width"] == SIZE for p in pictures)
    assert sum(p["std"] > 2 for p in pictures) >= 6, pictures
    explained = frame.locator(".concepts-explained")
    expect(explained).to_contain_text(f"R² {found['explained']:.2f}")
    expect(explained).to_contain_text(
        f"reconstructs {round(100 * found['explained'])}% of the activations' variance"
    )
    cell = frame.locator(".concept[data-concept='2']")
    expect(cell.locator("figcaption")).to_contain_text("concept 2")
    expect(cell.locator(".concept-similarity")).to_have_text("1.00")  # the reference step itself
    units = cell.locator(".concept-units a")
    assert [int(u.inner_text()) for u in units.all()] == found["units"][2]
    shoot(page, "node-concepts")

    # an earlier step: concept 2 stays in its element, its picture the new step's
    handle = cell.element_handle()
    frame.locator("#step").focus()
    frame.locator("#step").press("Home")
    expect(grid).to_have_attribute("data-step", str(steps[0]), timeout=WAIT_MS)
    expect(grid).to_have_attribute("data-state", "done", timeout=4 * WAIT_MS)
    assert handle.evaluate("(el) => el.isConnected && el.dataset.concept") == "2"
    src = handle.evaluate("(el) => el.querySelector('img').src")
    assert f"step={steps[0]}&" in src and f"reference_step={steps[-1]}&" in src, src
    assert "concept=2" in src
    early = concepts_of(frame, steps[0], "pool2", 8, "nmf", steps[-1])
    expect(cell.locator(".concept-similarity")).to_have_text(f"{early['similarity'][2]:.2f}")
    first = frame.evaluate(IMAGES_JS, ".concept-picture")
    assert all(p["decoded"] for p in first) and first[2]["hash"] != pictures[2]["hash"]
    shoot(page, "node-concepts-step-0")

    # concept 2's page: its picture, its examples, a frame per logged step and its similarity
    frame.locator("#step").press("End")
    expect(grid).to_have_attribute("data-step", str(steps[-1]), timeout=WAIT_MS)
    cell.locator(".concept-frame").click()
    assert url_state(page)["concept"] == "2" and url_state(page)["count"] == "8"
    expect(frame.locator(".concept-view h2")).to_have_text("pool2 · concept 2")
    expect(frame.locator(".crumbs")).to_contain_text("model › pool2 › concepts › concept 2")
    big = frame.locator(".concept-big")
    expect(big).to_have_attribute("data-step", str(steps[-1]), timeout=4 * WAIT_MS)
    (shown,) = frame.evaluate(IMAGES_JS, ".concept-big")
    assert shown["decoded"] and shown["hash"] == pictures[2]["hash"]
    examples = frame.locator(".concept-example")
    expect(examples).to_have_count(8, timeout=WAIT_MS)
    top = [int(e.get_attribute("data-index")) for e in examples.all()]
    assert top == found["top"][2][:8]
    expect(examples.first).to_contain_text(f"probe #{top[0]} · code ")
    frame.wait_for_function(
        "() => [...document.querySelectorAll('.concept-crop')]"
        ".every((img) => img.complete && img.naturalWidth)"
    )
    frames = wait_rendered(frame, ".concept-filmstrip", len(steps))
    assert all(f["decoded"] and f["width"] == SIZE for f in frames)
    labels = frame.locator(".concept-filmstrip figcaption").all_inner_texts()
    assert labels == [str(s) for s in steps]
    expect(frame.locator(".concept-chart")).to_have_attribute("data-values", str(len(steps)))
    expect(frame.locator(".concept-chart circle")).to_have_count(len(steps))
    shoot(page, "concept")

    # its examples' attribution: which pixels drive the concept, each as the route has it
    assert frame.locator(".concept-example img.attribution:visible").count() == 0  # off until asked
    methods = frame.locator("#attribution-method option").all_inner_texts()
    assert methods == ["integrated gradients", "saliency", "guided backprop"]
    frame.locator("#attribution-overlay").check()
    assert_overlays(frame, ".concept-examples", 8)
    attribution = concept_attribution(frame, steps[-1], 2, top[0], steps[-1])
    assert (attribution["unit"], attribution["image"]) == (2, top[0])
    overlay = examples.first.locator("img.attribution")
    assert overlay.get_attribute("src") == attribution["overlay"]
    expect(examples.first.locator(".example-image")).to_have_attribute(
        "title", re.compile(r"^integrated gradients: from ")
    )
    shoot(page, "concept-attribution")
    # an earlier step: the overlay stays on, each example's heat map the new step's
    frame.locator("#step").focus()
    frame.locator("#step").press("Home")
    expect(frame.locator(".concept-examples")).to_have_attribute(
        "data-step", str(steps[0]), timeout=WAIT_MS
    )
    assert frame.locator("#attribution-overlay").is_checked()
    assert_overlays(frame, ".concept-examples", 8)
    early = int(examples.first.get_attribute("data-index"))
    attribution = concept_attribution(frame, steps[0], 2, early, steps[-1])
    assert examples.first.locator("img.attribution").get_attribute("src") == attribution["overlay"]
    frame.locator("#attribution-overlay").uncheck()
    assert frame.locator(".concept-example img.attribution:visible").count() == 0

    # Escape (from the page, not a control): back to the concepts, then to the node's units
    frame.locator(".concept-view h2").click()
    page.keyboard.press("Escape")
    expect(grid).to_be_visible()
    assert "concept" not in url_state(page) and url_state(page)["concepts"] == "1"
    page.keyboard.press("Escape")
    expect(frame.locator(".node-view")).to_be_visible()
    assert "concepts" not in url_state(page) and "count" not in url_state(page)
    context.close()
    assert not errors, f"the page threw: {errors}"


def test_concepts_of_a_signed_node_fall_back_from_nmf_to_sae_unless_nmf_is_asked_for(served, page):
    base, _ = served
    frame = open_tab(page, base, run="demo", node="conv2", concepts=1, count=4)
    grid = frame.locator(".concepts-grid")
    expect(grid).to_have_attribute("data-state", "done", timeout=4 * WAIT_MS)
    expect(grid).to_have_attribute("data-method", "sae")
    note = frame.locator(".concepts-note")
    expect(note).to_be_visible()
    expect(note).to_contain_text("sparse autoencoder (sae)")
    expect(frame.locator("#concepts-method")).to_have_value("sae")
    assert "method" not in url_state(page)
    shoot(page, "node-concepts-fallback")
    # nmf picked: its error, as the server says it
    frame.locator("#concepts-method").select_option("nmf")
    assert url_state(page)["method"] == "nmf"
    expect(grid).to_have_attribute("data-state", "failed", timeout=4 * WAIT_MS)
    expect(frame.locator(".concepts-view .error")).to_contain_text("method='sae'")
    assert frame.locator(".concepts-note").is_hidden()


def test_polling_backs_off_and_stops_when_the_server_cannot_serve_what_it_calls_done(
    served, page, read_only
):
    """The tab polls every 500 ms for 5 s after a change, then backs off to 2 s while nothing
    changes (the server drops work nobody asked about for 5 s); it gives up after an hour
    without progress, and at once, pointing at the server's log, when the server keeps calling
    a result done but cannot serve it (here: a cached result emptied in a folder where it
    cannot be deleted)."""
    base, logdir = served
    frame = open_tab(page, base, run="demo")
    backoff = frame.evaluate(
        """async () => {
          const {Backoff} = await import('./static/api.js');
          const backoff = new Backoff(0);
          const delays = [];
          for (let t = 0; t <= 10; t++) delays.push(backoff.next('queued #1', t * 1000));
          delays.push(backoff.next('running 10%', 11000));
          let stopped = null;
          try {
            backoff.next('running 10%', 11000 + 60 * 60 * 1000);
          } catch (error) {
            stopped = error.message;
          }
          return {delays, stopped};
        }"""
    )
    brisk, slower = [500] * 5, [750, 1125, 1687.5, 2000, 2000, 2000]
    assert backoff["delays"] == brisk + slower + [500]
    assert "no progress on this for 60 minutes" in backoff["stopped"]

    params = {"run": "demo", "step": steps_of(logdir)[-1], "node": "conv2", "unit": 3, "count": 3}
    fetch = """async (params) => {
      const {getResult} = await import('./static/api.js');
      const times = [];
      const original = window.fetch;
      window.fetch = (url, ...rest) => {
        if (String(url).includes('/examples?')) times.push(performance.now());
        return original(url, ...rest);
      };
      try {
        return {result: await getResult('examples', params), times};
      } catch (error) {
        return {error: error.message, times};
      } finally {
        window.fetch = original;
      }
    }"""
    first = frame.evaluate(fetch, params)["result"]
    results = RunStore(logdir / "demo").root / "cache" / "results"
    (cached,) = [p for p in results.glob("*.json") if json.loads(p.read_bytes() or b"0") == first]
    cached.write_bytes(b"")
    read_only(results)  # the server deletes an unreadable file: here it cannot
    answer = frame.evaluate(fetch, params)
    assert "cannot serve it; see the server's log" in answer["error"]
    gaps = [b - a for a, b in zip(answer["times"], answer["times"][1:])]
    assert len(answer["times"]) == 5 and all(gap > 450 for gap in gaps), gaps  # never faster

    # the same for a unit's picture: the cell fails, saying where to look
    run, step = tb_microscope.open_run(logdir / "demo"), steps_of(logdir)[-1]
    query = f"run=demo&step={step}&node=conv1&unit=6"
    deadline = time.monotonic() + 120
    while http(f"{base}/data/plugin/tb_microscope/image?{query}")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    key = RenderKey(step, run.snapshot_version(step), "conv1", 6, "channel", SIZE, ITERATIONS, 0)
    picture = run.store.root / "cache" / f"step-{step}" / f"{key.digest(run.id)}.png"
    picture.write_bytes(b"")
    read_only(picture.parent)
    states = frame.evaluate(
        """async (group) => {
          const {watchUnits} = await import('./static/api.js');
          const states = [];
          await watchUnits(group, [6], 1, (unit, state) => states.push(state),
            new AbortController().signal);
          return states;
        }""",
        {"run": "demo", "step": step, "node": "conv1", "technique": "channel"},
    )
    assert states[-1]["status"] == "failed", states
    assert "cannot serve it; see the server's log" in states[-1]["error"]
    assert len(states) == 5  # four times asked for again, then given up
