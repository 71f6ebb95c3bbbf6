"""Dynamics over training and unit matching across runs, on the demo CNN trained on its data."""

import csv
import io
import json

import numpy as np
import pytest
import torch

import tb_microscope
from tb_microscope.analysis.dynamics import FORMED, formation_step, linear_cka
from tb_microscope.cli import main
from tb_microscope.demo.data import CLASSES, MEAN, STD, make_images, normalize
from tb_microscope.demo.train import train

STEPS = 50  # the default schedule logs 0, 1, 2, 3, 5, 7, 10, 15, 20, 30, 50


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "demo"
    train(run_dir, steps=STEPS, log=lambda *_: None)
    return tb_microscope.open_run(run_dir)


@pytest.fixture(scope="module")
def twin(trained, tmp_path_factory):
    """The trained model at its last step with conv2's channels permuted (conv3's inputs
    permuted to match): the same function, its conv2 and pool2 units in another order."""
    model = trained.load_model(STEPS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(3))
    state["conv2.weight"] = state["conv2.weight"][perm]
    state["conv2.bias"] = state["conv2.bias"][perm]
    state["conv3.weight"] = state["conv3.weight"][:, perm]
    from tb_microscope.demo.model import SmallCNN

    net = SmallCNN()
    net.load_state_dict(state)
    images, _ = make_images(64, 32, seed=5)
    x = normalize(images)
    run_dir = tmp_path_factory.mktemp("runs") / "twin"
    with tb_microscope.Logger(run_dir, net, x[:8], probe=x, normalize=(MEAN, STD)) as logger:
        logger.log(0)
    with torch.no_grad():  # the twin computes what the original does
        torch.testing.assert_close(net(x), model(x), rtol=1e-4, atol=1e-4)
    return tb_microscope.open_run(run_dir), perm


def test_align_units_recovers_a_permutation_and_the_identity_elsewhere(trained, twin):
    run_b, perm = twin
    inverse = torch.argsort(perm).numpy()
    for node in ("conv2", "pool2"):
        found = tb_microscope.align_units(trained, STEPS, run_b, 0, node)
        np.testing.assert_array_equal(found.unit_b, inverse)
        assert np.nanmin(found.correlation) > 0.999
        assert np.nanmean(found.same_unit) < 0.5  # unit for unit, the twin's differ
    for node in ("conv1", "conv3", "fc"):
        found = tb_microscope.align_units(trained, STEPS, run_b, 0, node)
        live = ~np.isnan(found.correlation)
        assert live.sum() >= 0.5 * len(found.unit_b)
        np.testing.assert_array_equal(found.unit_b[live], np.arange(len(found.unit_b))[live])
        assert np.nanmin(found.correlation) > 0.999
    as_json = json.loads(json.dumps(found.to_dict()))
    assert as_json["b"] == {"run": "twin", "step": 0} and len(as_json["unit_b"]) == len(CLASSES)


def test_cka_is_one_for_a_representation_and_its_rotation_and_lower_for_another():
    torch.manual_seed(0)
    x = torch.randn(50, 20)
    rotation, _ = torch.linalg.qr(torch.randn(20, 20))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3 * x @ rotation) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(50, 20)) < 0.6
    assert np.isnan(linear_cka(x, torch.ones(50, 20)))


def test_formation_is_the_first_step_from_which_correlation_stays_high():
    steps = [0, 10, 20, 30, 40]
    assert formation_step([0.2, 0.95, 0.5, 0.92, 1.0], steps) == 30
    assert formation_step([0.95, 0.95, 0.95, 0.95, 1.0], steps) == 0
    assert formation_step([0.1, 0.2, 0.3, 0.4, float("nan")], steps) is None


def test_node_dynamics_of_a_training_run(trained, tmp_path):
    steps = trained.steps
    dynamics = tb_microscope.node_dynamics(trained, "conv3", cache_dir=tmp_path)
    assert dynamics.steps == steps
    assert dynamics.cka_to_final[-1] == pytest.approx(1.0)
    assert np.isnan(dynamics.cka_to_previous[0])
    assert 0 <= dynamics.cka_to_final[0] < 0.99  # training changed the representation
    live = ~np.isnan(dynamics.unit_correlation[:, -1])
    np.testing.assert_allclose(dynamics.unit_correlation[live, -1], 1.0, atol=1e-9)
    for row, formed in zip(dynamics.unit_correlation, dynamics.formed_step):
        if formed is None:
            assert not row[-1] >= FORMED
            continue
        index = steps.index(formed)
        assert (row[index:] >= FORMED).all()
        assert index == 0 or not row[index - 1] >= FORMED
    whole = tb_microscope.model_dynamics(trained, cache_dir=tmp_path)
    row = whole.nodes.index("conv3")
    np.testing.assert_allclose(whole.cka_to_final[row], dynamics.cka_to_final)
    np.testing.assert_allclose(whole.cka_to_previous[row][1:], dynamics.cka_to_previous[1:])
    assert json.loads(json.dumps(dynamics.to_dict()))["formed_step"] == dynamics.formed_step


def test_dynamics_extend_to_new_snapshots_computing_only_those(trained, tmp_path):
    steps = trained.steps
    first = tb_microscope.node_dynamics(trained, "conv2", steps=steps[:3], cache_dir=tmp_path)
    stored = sorted(tmp_path.rglob("*.npz"))
    assert len(stored) == 3
    written = {p: p.stat().st_mtime_ns for p in stored}
    later = tb_microscope.node_dynamics(trained, "conv2", cache_dir=tmp_path)
    assert len(list(tmp_path.rglob("*.npz"))) == len(steps)
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())  # not computed again
    # the same figures as computed from scratch
    fresh = tb_microscope.node_dynamics(trained, "conv2", cache_dir=tmp_path / "fresh")
    np.testing.assert_allclose(later.unit_correlation, fresh.unit_correlation)
    assert first.steps == steps[:3] and later.steps == steps


def test_dynamics_without_probe_images_say_how_to_get_them(tmp_path, tiny):
    x = torch.rand(4, 3, 16, 16)
    with tb_microscope.Logger(tmp_path / "run", tiny, x, steps=[0]) as logger:
        logger.log(0)
    with pytest.raises(tb_microscope.MicroscopeError, match="probe="):
        tb_microscope.node_dynamics(tmp_path / "run", tiny_node(tmp_path / "run"))


def tiny_node(path):
    return tb_microscope.open_run(path).nodes[0].name


def test_dynamics_and_align_commands(trained, twin, tmp_path, capsys):
    def command(*argv) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    run_dir = str(trained.path)
    code, out, _ = command("dynamics", run_dir, "--node", "conv3")
    assert code == 0 and "CKA to final" in out and "formed" in out
    saved = tmp_path / "conv3.csv"
    assert command("dynamics", run_dir, "--node", "conv3", "--output", str(saved))[0] == 0
    rows = list(csv.DictReader(io.StringIO(saved.read_text())))
    formed = [r for r in rows if r["measure"] == "formed_step"]
    assert len(formed) == 64
    dynamics = tb_microscope.node_dynamics(trained, "conv3")
    assert [r["value"] for r in formed] == [
        "" if s is None else str(s) for s in dynamics.formed_step
    ]
    code, out, _ = command("dynamics", run_dir, "--format", "json")
    assert json.loads(out)["nodes"] == [n.name for n in trained.nodes]
    run_b, perm = twin
    code, out, _ = command(
        "align", f"{run_dir}@{STEPS}", f"{run_b.path}@0", "--node", "conv2", "--format", "json"
    )
    assert json.loads(out)["unit_b"] == torch.argsort(perm).tolist()
    code, _, err = command("align", run_dir, f"{run_b.path}@0", "--node", "conv2")
    assert code == 2 and "RUN@STEP" in err
