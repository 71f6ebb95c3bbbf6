"""Every architecture people train: tiny torchvision, timm and Hugging Face models (random
weights) and 1- and 6-channel CNNs, logged by a script in another process, then opened here
(without that script): block nodes with the right layout and unit count, units rendered."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tb_microscope
from conftest import SCRIPTS
from tb_microscope.nodes import CHANNELS_FIRST, CHANNELS_LAST, TOKENS, VECTOR
from tb_microscope.optvis.param import canvas_for

CF, CL = CHANNELS_FIRST, CHANNELS_LAST

# family -> nodes that must be listed: name (or alternatives, as library versions name them)
# -> (layout, units, leading tokens)
FAMILIES = {
    "tv_resnet": {"layer1.0": (CF, 64, 0), "layer4.0": (CF, 512, 0), "fc": (VECTOR, 5, 0)},
    "tv_convnext": {"features.1.0": (CF, 16, 0), "features.1.0.block.3": (CL, 64, 0)},
    "tv_swin": {
        "features.1.0": (CL, 16, 0),
        "features.1.0.mlp.0": (CL, 64, 0),
        "features.3.0": (CL, 32, 0),
    },
    "tv_vit": {
        "encoder.layers.encoder_layer_0": (TOKENS, 32, 1),
        "encoder.layers.encoder_layer_0.self_attention": (TOKENS, 32, 1),
        "encoder.layers.encoder_layer_0.mlp.0": (TOKENS, 64, 1),
    },
    "timm_vit": {
        "blocks.0": (TOKENS, 32, 1),
        "blocks.0.attn": (TOKENS, 32, 1),
        "blocks.0.mlp.fc1": (TOKENS, 128, 1),
    },
    "timm_convnext": {"stages.0.blocks.0": (CF, 16, 0), "stages.1.blocks.0": (CF, 24, 0)},
    "timm_efficientnet": {"blocks.0.0": (CF, 16, 0), "blocks.1.0": (CF, 24, 0)},
    "hf_vit": {
        ("vit.layers.0", "vit.encoder.layer.0"): (TOKENS, 32, 1),
        ("vit.layers.0.attention", "vit.encoder.layer.0.attention"): (TOKENS, 32, 1),
        ("vit.layers.0.mlp.fc1", "vit.encoder.layer.0.intermediate.dense"): (TOKENS, 64, 1),
    },
    "hf_convnext": {
        "convnext.encoder.stages.0.layers.0": (CF, 16, 0),
        "convnext.encoder.stages.0.layers.0.pwconv1": (CL, 64, 0),
    },
    "hf_swin": {
        "swin.encoder.layers.0.blocks.0": (TOKENS, 16, 0),
        "swin.encoder.layers.1.blocks.0": (TOKENS, 32, 0),
    },
    "hf_dinov2": {
        ("dinov2.encoder.layer.0", "dinov2.layers.0"): (TOKENS, 32, 1),
        ("dinov2.encoder.layer.0.mlp.fc1", "dinov2.layers.0.mlp.fc1"): (TOKENS, 64, 1),
    },
    "hf_resnet": {
        "resnet.encoder.stages.0.layers.0": (CF, 16, 0),
        "resnet.encoder.stages.1.layers.0": (CF, 32, 0),
    },
    "gray_cnn": {"0": (CF, 8, 0), "2": (CF, 16, 0)},
    "six_band_cnn": {"0": (CF, 8, 0), "2": (CF, 16, 0)},
}
PER_HEAD = {"timm_vit": ["blocks.0.attn.q_norm", "blocks.0.attn.k_norm"]}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Every family logged by training scripts in other processes (two side by side, half the
    families each: the export budget counts CPU time, so what is captured does not change); the
    families' timings."""
    logdir = tmp_path_factory.mktemp("families")
    # Swin's dynamic export takes minutes; one thread each, as two scripts share the machine
    env = {**os.environ, "TB_MICROSCOPE_EXPORT_BUDGET": "3", "OMP_NUM_THREADS": "1"}
    output = tmp_path_factory.mktemp("family-output")
    names, scripts = list(FAMILIES), []
    for half in (0, 1):
        command = [sys.executable, SCRIPTS / "log_family.py", logdir, *names[half::2]]
        with open(output / f"{half}.out", "w") as out, open(output / f"{half}.err", "w") as err:
            scripts.append(subprocess.Popen(command, stdout=out, stderr=err, env=env))
    timings = {}
    for half, proc in enumerate(scripts):
        proc.wait(timeout=900)
        err = (output / f"{half}.err").read_text()
        assert proc.returncode == 0, f"log_family.py exited {proc.returncode}\n{err}"
        lines = (output / f"{half}.out").read_text().splitlines()
        timings.update((t["family"], t) for t in map(json.loads, lines))
    assert set(timings) == set(names)
    return logdir, timings


def _find(run, names):
    names = (names,) if isinstance(names, str) else names
    listed = {n.name: n for n in run.nodes}
    found = [listed[name] for name in names if name in listed]
    assert found, f"none of {names} among {[n.name for n in run.nodes]}"
    return found[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_lists_its_blocks_with_their_layouts_and_renders(logged, family):
    logdir, timings = logged
    assert timings[family]["first_log_s"] < 30  # log() does not wait for the capture
    run = tb_microscope.open_run(logdir / family)
    assert run.architecture == "export" and run.problem() is None
    for names, (layout, units, prefix) in FAMILIES[family].items():
        node = _find(run, names)
        assert (node.layout, node.units, node.prefix) == (layout, units, prefix), node
    listed = {n.name for n in run.nodes}
    assert not listed & set(PER_HEAD.get(family, [])), "per-head internals listed as nodes"

    node = _find(run, next(iter(FAMILIES[family])))
    result = tb_microscope.render(run, 1, node.name, [0, 1], size=16, iterations=6, device="cpu")
    assert result.images.shape == (2, 16, 16, 3)
    assert all(image.std() > 0 for image in result.images)
    assert not np.array_equal(result.images[0], result.images[1])
    if family == "gray_cnn":
        assert (result.images == result.images[..., :1]).all()  # grey: R = G = B
    if family == "six_band_cnn":
        other = tb_microscope.render(
            run, 1, node.name, [0], size=16, iterations=6, device="cpu", bands=(3, 4, 5)
        )
        assert not np.array_equal(other.images[0], result.images[0])
        with pytest.raises(ValueError, match="bands must be three channel indexes from 0 to 5"):
            tb_microscope.render(run, 1, node.name, [0], size=16, iterations=1, bands=(0, 1, 6))


@pytest.mark.parametrize("family", ["timm_vit", "hf_vit", "hf_dinov2"])
def test_a_model_that_takes_only_a_small_input_is_rendered_on_most_of_it(logged, family):
    run = tb_microscope.open_run(logged[0] / family)
    assert run.input_spec.dim("height")["size"] == 32  # these ViTs take 32 px and no other
    canvas = canvas_for(run, 128)
    # lucid's pad (12 px of a 128 px image) in proportion: 26 px of image inside 3 px of border
    # (lucid's own pad would leave 8 px of image), and jitters of at most 1.2 px within it
    assert (canvas.input, canvas.image, canvas.strength) == ((32, 32), 26, 26 / 128)
    node = _find(run, next(iter(FAMILIES[family])))
    result = tb_microscope.render(run, 1, node.name, [0], size=64, iterations=4, device="cpu")
    assert result.images.shape == (1, 64, 64, 3) and result.images.std() > 0


@pytest.mark.parametrize("family", ["tv_vit", "timm_vit", "hf_vit"])
def test_token_nodes_have_neuron_and_class_token_views(logged, family):
    logdir, _ = logged
    run = tb_microscope.open_run(logdir / family)
    node = _find(run, next(iter(FAMILIES[family])))
    for technique in ("neuron", "class_token"):
        result = tb_microscope.render(
            run, 1, node.name, [3], technique, size=16, iterations=6, device="cpu"
        )
        assert result.images[0].std() > 0
    conv = _find(run, [n.name for n in run.nodes if n.layout == CF])
    with pytest.raises(tb_microscope.MicroscopeError, match="needs a node of tokens"):
        tb_microscope.render(run, 1, conv.name, [0], "class_token", size=16, iterations=1)
