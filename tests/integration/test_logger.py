"""The Logger in-process: schedules, what lands on disk, and what it leaves alone."""

import json
import threading
import time
import warnings

import pytest
import torch
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.compat.proto import summary_pb2
from torch import nn

import tb_microscope
from conftest import FixedSizeViT, train_step
from tb_microscope.optvis.tap import NodesTap
from tb_microscope.store.local import RunStore
from tb_microscope.store.manifest import FORMAT_VERSION, SUMMARY_TAG
from tb_microscope.training.capture import ExportTimeout, time_limit


def test_log_called_sparsely_still_snapshots_each_stretch_of_the_schedule(tmp_path, tiny, example):
    with tb_microscope.Logger(tmp_path, tiny, example) as logger:
        taken = [s for s in range(0, 40, 4) if logger.log(s)]
    # scheduled 0 1 2 3 5 7 10 15 20 30: one snapshot at the first call at or after each stretch
    assert taken == [0, 4, 8, 12, 16, 20, 32]
    assert tb_microscope.open_run(tmp_path).steps == taken


def test_snapshots_hold_the_weights_of_their_step(tmp_path, tiny, example):
    expected = {}
    with tb_microscope.Logger(tmp_path, tiny, example, every=1) as logger:
        for step in range(3):
            logger.log(step)
            expected[step] = {k: v.clone() for k, v in tiny.state_dict().items()}
            train_step(tiny, example)
    run = tb_microscope.open_run(tmp_path)
    assert run.steps == [0, 1, 2]
    for step in run.steps:
        state = run.load_state_dict(step)
        assert state.keys() == expected[step].keys()
        for key, value in expected[step].items():
            assert torch.equal(state[key], value), (step, key)
    assert not torch.equal(run.load_state_dict(0)["conv1.weight"], expected[2]["conv1.weight"])


def test_users_model_is_left_exactly_as_it_was(tmp_path, tiny, example):
    tiny.train()
    tiny.bn.eval()
    tiny.conv1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    modes = {name: m.training for name, m in tiny.named_modules()}
    rng = torch.get_rng_state()
    with tb_microscope.Logger(tmp_path, tiny, example, every=1) as logger:
        logger.log(0)
        logger.log(1)
    assert {name: m.training for name, m in tiny.named_modules()} == modes
    assert [p.requires_grad for p in tiny.parameters()] == [False] + [True] * 7
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.device.type == "cpu" for p in tiny.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.modules())


def test_manifest_records_nodes_edges_and_input_spec(tmp_path, tiny, example):
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    with tb_microscope.Logger(tmp_path, tiny, example, normalize=(mean, std)) as logger:
        logger.log(0)
    run = tb_microscope.open_run(tmp_path)
    nodes = {n.name: n for n in run.nodes}
    assert list(nodes) == ["conv1", "bn", "conv2", "fc"]  # eval-mode dropout passes its input on
    assert (
        "1 module whose output is its input in eval mode (Dropout ×1: drop)"
        in run.manifest.model.architecture.note
    )
    assert (nodes["conv1"].kind, nodes["conv1"].units, nodes["conv1"].shape) == (
        "spatial",
        8,
        (8, 16, 16),
    )
    assert (nodes["conv2"].units, nodes["conv2"].shape) == (16, (16, 8, 8))
    assert (nodes["fc"].kind, nodes["fc"].units, nodes["fc"].shape) == ("vector", 5, (5,))
    # relu and mean are functional: the edges pass through them
    assert set(run.edges) == {
        ("input", "conv1"),
        ("conv1", "bn"),
        ("bn", "conv2"),
        ("conv2", "fc"),
    }
    spec = run.input_spec
    assert spec.shape == [3, 16, 16] and spec.normalize == {"mean": mean, "std": std}
    dims = {d["name"]: d for d in spec.dims}
    assert dims["batch"]["size"] is None and dims["height"]["size"] is None
    assert run.architecture == "export"


def test_resnet_edges_follow_the_residual_connections(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=4)
    with tb_microscope.Logger(tmp_path, model, torch.rand(2, 3, 64, 64)) as logger:
        logger.log(0)
    edges = set(tb_microscope.open_run(tmp_path).edges)
    assert ("maxpool", "layer1.0.conv1") in edges
    assert ("maxpool", "layer1.0.relu") in edges  # the skip connection into the block's last relu
    assert ("layer1.0.bn2", "layer1.0.relu") in edges
    assert ("layer1.1.relu", "layer2.0.downsample.0") in edges
    assert ("avgpool", "fc") in edges  # through torch.flatten


def test_nodes_narrow_the_list_and_unknown_names_are_listed(tmp_path, tiny, example):
    with tb_microscope.Logger(tmp_path / "a", tiny, example, nodes=["conv2", "fc"]) as logger:
        assert [n.name for n in logger.nodes] == ["conv2", "fc"]
        logger.log(0)
    assert set(tb_microscope.open_run(tmp_path / "a").edges) == {
        ("input", "conv2"),
        ("conv2", "fc"),
    }
    with pytest.raises(tb_microscope.NodeNotFoundError) as err:
        tb_microscope.Logger(tmp_path / "b", tiny, example, nodes=["conv9"])
    assert "'conv9'" in str(err.value) and "nodes: conv1, bn, conv2, fc" in str(err.value)
    with pytest.raises(
        tb_microscope.NodeNotFoundError,
        match="'drop' is left out, as 1 module whose output is its input",
    ):
        tb_microscope.Logger(tmp_path / "b", tiny, example, nodes=["drop"])
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "bad, error, words",
    [
        (torch.rand(4, 1, 16, 16), ValueError, "does not fit the model"),
        (torch.rand(4, 3), ValueError, "does not fit the model"),
        (torch.zeros(4, 3, 16, 16, dtype=torch.long), ValueError, "floating-point"),
        ([[0.0]], TypeError, "must be a torch.Tensor"),
    ],
)
def test_wrong_example_input_fails_at_once_with_what_to_pass(tmp_path, tiny, bad, error, words):
    with pytest.raises(error) as err:
        tb_microscope.Logger(tmp_path, tiny, bad)
    assert words in str(err.value)
    assert not tmp_path.joinpath("plugins").exists()


def test_logging_a_step_twice_is_harmless(tmp_path, tiny, example):
    with tb_microscope.Logger(tmp_path, tiny, example) as logger:
        assert logger.log(3, force=True)
        logger.flush()
        path = RunStore(tmp_path).snapshot_path(3)
        stamp = path.stat().st_mtime_ns
        train_step(tiny, example)
        assert not logger.log(3, force=True)
        assert not logger.log(3)
    assert path.stat().st_mtime_ns == stamp
    assert tb_microscope.open_run(tmp_path).steps == [3]


def test_resumed_training_appends_to_the_same_run(tmp_path, tiny, example):
    with tb_microscope.Logger(tmp_path, tiny, example) as logger:
        for step in range(4):
            logger.log(step)
    architecture = RunStore(tmp_path).root / "model.pt2"
    stamp = architecture.stat().st_mtime_ns
    with tb_microscope.Logger(tmp_path, tiny, example) as logger:
        assert not logger.log(3)  # already on disk
        taken = [s for s in range(3, 12) if logger.log(s)]
    assert taken == [5, 7, 10]
    assert tb_microscope.open_run(tmp_path).steps == [0, 1, 2, 3, 5, 7, 10]
    assert architecture.stat().st_mtime_ns == stamp


def test_a_different_model_in_an_existing_run_is_refused(tmp_path, tiny, example):
    with tb_microscope.Logger(tmp_path, tiny, example) as logger:
        logger.log(0)
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    other(example)
    with pytest.raises(tb_microscope.IncompatibleRunError) as err:
        tb_microscope.Logger(tmp_path, other, example)
    assert "different model" in str(err.value) and "new run directory" in str(err.value)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(16, 16)
        self.decode = nn.Linear(16, 16)
        self.decode.weight = self.encode.weight

    def forward(self, x):
        return self.decode(torch.relu(self.encode(x)))


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model = Tied()
    with tb_microscope.Logger(tmp_path, model, torch.rand(4, 16)) as logger:
        logger.log(0)
    run = tb_microscope.open_run(tmp_path)
    state = run.load_state_dict(0)
    assert state["decode.weight"] is state["encode.weight"]
    assert RunStore(tmp_path).snapshot_path(0).stat().st_size < 2 * 16 * 16 * 4
    rebuilt = run.load_model(0)
    assert rebuilt.get_submodule("decode").weight is rebuilt.get_submodule("encode").weight
    x = torch.rand(3, 16)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_two_rebuilt_steps_do_not_share_weights(tmp_path, tiny, example):
    with tb_microscope.Logger(tmp_path, tiny, example, every=1) as logger:
        logger.log(0)
        train_step(tiny, example)
        logger.log(1)
    run = tb_microscope.open_run(tmp_path)
    first, second = run.load_model(0), run.load_model(1)
    weight = first.get_submodule("conv1").weight
    assert not torch.equal(weight, second.get_submodule("conv1").weight)
    assert torch.equal(weight, run.load_state_dict(0)["conv1.weight"])


@pytest.mark.parametrize("wrap", ["DataParallel", "compile"])
def test_wrappers_are_unwrapped(tmp_path, tiny, example, wrap):
    wrapped = nn.DataParallel(tiny) if wrap == "DataParallel" else torch.compile(tiny)
    with tb_microscope.Logger(tmp_path, wrapped, example) as logger:
        logger.log(0)
    run = tb_microscope.open_run(tmp_path)
    assert set(run.load_state_dict(0)) == set(tiny.state_dict())
    assert [n.name for n in run.nodes][0] == "conv1"


def test_distributed_data_parallel_is_unwrapped(tmp_path, tiny, example):
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with tb_microscope.Logger(
            tmp_path / "run", nn.parallel.DistributedDataParallel(tiny), example
        ) as logger:
            logger.log(0)
    finally:
        torch.distributed.destroy_process_group()
    assert set(tb_microscope.open_run(tmp_path / "run").load_state_dict(0)) == set(
        tiny.state_dict()
    )


def test_each_snapshot_adds_a_plugin_summary_to_the_event_file(tmp_path, tiny, example):
    with tb_microscope.Logger(tmp_path, tiny, example) as logger:
        for step in range(4):
            logger.log(step)
    files = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = [
        e for e in event_file_loader.EventFileLoader(str(files[0])).Load() if e.HasField("summary")
    ]
    assert [e.step for e in events] == [0, 1, 2, 3]
    value = events[0].summary.value[0]
    assert value.tag == SUMMARY_TAG
    assert value.metadata.plugin_data.plugin_name == "tb_microscope"
    assert value.metadata.data_class == summary_pb2.DATA_CLASS_TENSOR
    assert json.loads(value.metadata.plugin_data.content) == {"version": FORMAT_VERSION}


def test_probe_images_are_stored_once_as_uint8_in_image_space(tmp_path, tiny):
    images = torch.rand(6, 3, 16, 16)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.2, 0.25]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    normalized = (images - m) / s
    with tb_microscope.Logger(
        tmp_path, tiny, normalized[:2], probe=normalized, normalize=(mean, std)
    ) as logger:
        logger.log(0)
        logger.log(1)
    probe = tb_microscope.open_run(tmp_path).probe_images()
    assert probe.dtype == torch.uint8 and probe.shape == (6, 3, 16, 16)
    assert (probe.float() / 255 - images).abs().max() <= 0.5 / 255 + 1e-6
    probe = tb_microscope.open_run(tmp_path).manifest.probe
    assert (probe.count, probe.shape) == (6, [3, 16, 16])


def test_probe_of_the_wrong_shape_is_refused(tmp_path, tiny, example):
    with pytest.raises(ValueError, match="probe must be a tensor shaped like example_input"):
        tb_microscope.Logger(tmp_path, tiny, example, probe=torch.rand(5, 1, 16, 16))


def test_export_falls_back_to_a_pickle_with_a_warning(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            h = self.a(x)
            return self.b(h) if h.sum() > 0 else -self.b(h)

    model = Branchy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tb_microscope.Logger(tmp_path, model, torch.rand(2, 3, 8, 8)) as logger:
            logger.log(0)
    message = " ".join(str(w.message) for w in caught)
    assert "could not capture Branchy" in message and "allow_pickle=True" in message
    with pytest.raises(tb_microscope.PickleNotAllowedError):
        tb_microscope.open_run(tmp_path).load_model(0)
    rebuilt = tb_microscope.open_run(tmp_path, allow_pickle=True).load_model(0)
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(rebuilt(x), model(x))


class Funnel(nn.Module):
    """Four stride-2 convolutions: 1 x 1 at 16 px, where export would guard the size to <= 16.
    With `most`, the model itself refuses inputs larger than that many pixels."""

    def __init__(self, most: int | None = None):
        super().__init__()
        self.most = most
        self.convs = nn.Sequential(*(nn.Conv2d(3 if i == 0 else 6, 6, 3, 2, 1) for i in range(4)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        if self.most is not None:
            torch._check(x.shape[-1] <= self.most)
        return self.fc(self.pool(torch.relu(self.convs(x))).flatten(1))


@pytest.mark.parametrize("most", [None, 20])
def test_a_model_whose_last_map_is_one_pixel_at_the_example_still_takes_larger_inputs(
    tmp_path, most
):
    torch.manual_seed(0)
    model = Funnel(most).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tb_microscope.Logger(tmp_path, model, torch.rand(2, 3, 16, 16)) as logger:
            logger.log(0)
    said = " ".join(str(w.message) for w in caught)
    run = tb_microscope.open_run(tmp_path)
    height, width = run.input_spec.dim("height"), run.input_spec.dim("width")
    assert run.architecture == "export" and height["size"] is None
    assert height["min"] <= 16 and width["min"] <= 16
    rebuilt = run.load_model(0)
    sizes = (16, 12) if most else (16, 12, 64, 96)
    for size in sizes:
        x = torch.rand(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), model(x), rtol=1e-5, atol=1e-6)
    if most is None:
        assert (height["max"], width["max"]) == (None, None)
        assert "captured" not in said
    else:  # the model refuses twice the size: the first program's bound is kept, and said
        assert (height["max"], width["max"]) == (16, 16)
        assert "at most" in said and "rendered within that size" in said, said


class Block(nn.Module):
    def __init__(self, shared: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.shared = shared  # the same module in every block (CoaT's position encodings)
        self.scale = nn.Identity()  # a layer scale switched off

    def forward(self, x):
        return self.shared(x) + self.scale(torch.relu(self.conv(x)))


class Pool(nn.Module):
    def forward(self, x):  # like a Hugging Face backbone: the hidden state, and its pooled form
        return x, x.mean((2, 3))


class Shared(nn.Module):
    """A shared module called from two blocks, modules without operations in eval mode, and one
    returning what the model uses only part of."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.norm_pre = nn.Identity()
        self.position = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.blocks = nn.Sequential(Block(self.position), Block(self.position))
        self.drop_path = StochasticDepth(0.1, "row")
        self.pool = Pool()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.blocks(self.norm_pre(self.stem(x)))
        return self.fc(self.pool(self.drop_path(x))[1])


def test_every_listed_node_of_an_exported_program_can_be_tapped(tmp_path):
    """The program has nothing to call for a module without operations (its output is its input:
    left out), one copy of a shared module per path it is called from (listed under the path of
    its last call, what the node shows), and a module returning only what the rest reads (a
    node whose tensor it does not return is left out)."""
    torch.manual_seed(0)
    model = Shared()
    with warnings.catch_warnings(record=True):
        with tb_microscope.Logger(tmp_path, model, torch.rand(2, 3, 16, 16)) as logger:
            logger.log(0)
    run = tb_microscope.open_run(tmp_path)
    assert run.architecture == "export"
    names = [n.name for n in run.nodes]
    assert names == [
        "stem",
        "blocks",
        "blocks.0",
        "blocks.0.conv",
        "blocks.1",
        "blocks.1.shared",
        "blocks.1.conv",
        "fc",
    ]
    assert run.node("blocks.1.shared").calls == 1
    note = run.manifest.model.architecture.note
    assert "4 modules whose output is their input in eval mode" in note, note
    assert (
        "(Identity ×3, StochasticDepth ×1: norm_pre, blocks.0.scale, blocks.1.scale, drop_path)"
        in note
    )
    assert "position as blocks.1.shared" in note
    assert "1 node whose output the program does not keep left out (pool)" in note
    assert ("blocks.0.conv", "blocks.1.shared") not in run.edges
    assert ("blocks.0", "blocks.1.shared") in run.edges, run.edges
    rebuilt = run.load_model(0)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        want = model.blocks[0](model.stem(x))  # what the shared module's last call took
        want = model.position(want)
    found = NodesTap(rebuilt, run.nodes)(x)
    torch.testing.assert_close(found["blocks.1.shared"].maps, want, rtol=1e-5, atol=1e-6)


def test_the_export_budget_counts_the_exporting_threads_cpu_time_not_the_clock(tiny, example):
    """A machine busy with training slows the export's clock, not its CPU time: the budget does
    not run out while the thread waits, and does when it has worked past it."""
    dims = ({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},)
    torch.export.export(tiny.eval(), (example,), dynamic_shapes=dims)  # first-time imports
    start = time.thread_time()
    torch.export.export(tiny.eval(), (example,), dynamic_shapes=dims)
    budget = 3 * (time.thread_time() - start) + 0.5  # ample for the export itself
    with time_limit(budget):
        time.sleep(budget + 0.5)  # the clock passes the budget; the thread's CPU time does not
        program = torch.export.export(tiny.eval(), (example,), dynamic_shapes=dims)
    assert program.module()(example).shape == (4, 5)
    with pytest.raises(ExportTimeout), time_limit(budget):
        start = time.thread_time()
        while time.thread_time() - start < budget + 0.1:  # work past the budget
            pass
        torch.export.export(tiny.eval(), (example,), dynamic_shapes=dims)


def test_open_run_on_a_directory_without_our_data_says_what_to_do(tmp_path):
    with pytest.raises(tb_microscope.RunNotFoundError) as err:
        tb_microscope.open_run(tmp_path)
    assert "holds no tb_microscope data" in str(err.value)


def test_missing_steps_and_nodes_are_named_with_what_exists(tmp_path, tiny, example):
    with tb_microscope.Logger(tmp_path, tiny, example) as logger:
        for step in range(3):
            logger.log(step)
    run = tb_microscope.open_run(tmp_path)
    with pytest.raises(tb_microscope.StepNotFoundError, match=r"step 7 is not logged .* 0, 1, 2"):
        run.load_model(7)
    with pytest.raises(tb_microscope.NodeNotFoundError, match="nodes: conv1, bn, conv2, fc"):
        run.node("layer9")


def test_logger_cannot_log_after_close(tmp_path, tiny, example):
    logger = tb_microscope.Logger(tmp_path, tiny, example)
    logger.close()
    logger.close()
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(0)


def test_unfinished_snapshots_are_flushed_at_interpreter_exit(tmp_path):
    from conftest import run_python

    script = (
        "import torch, tb_microscope\n"
        "m = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))\n"
        f"lg = tb_microscope.Logger({str(tmp_path)!r}, m, torch.rand(2, 512), every=1)\n"
        "for s in range(5): lg.log(s)\n"
    )
    run_python("-c", script)
    assert tb_microscope.open_run(tmp_path).steps == [0, 1, 2, 3, 4]


def test_the_training_thread_keeps_its_convolution_backends_during_capture(tmp_path):
    """torch.export switches oneDNN and NNPACK off for its whole process while it traces; the
    capture runs in a child process, so the training loop's convolutions never lose them."""
    from torchvision.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)
    logger = tb_microscope.Logger(tmp_path, model, torch.rand(2, 3, 32, 32))
    logger.log(0)
    flusher = threading.Thread(target=logger.flush)  # returns once the capture is written
    flusher.start()
    seen = set()
    samples = 0
    while flusher.is_alive():
        seen.add((torch._C._get_mkldnn_enabled(), torch._C._get_nnpack_enabled()))
        samples += 1
    logger.close()
    assert samples > 1000  # the capture took a while, and was watched throughout
    assert seen == {(True, True)}
    assert tb_microscope.open_run(tmp_path).architecture == "export"


def test_a_capture_process_that_does_not_answer_in_time_is_replaced_by_an_in_process_capture(
    tmp_path, tiny, example, monkeypatch
):
    monkeypatch.setenv("TB_MICROSCOPE_CAPTURE_TIMEOUT", "0")  # the child is given no time
    with pytest.warns(RuntimeWarning, match="capture process gave no answer in 0 s; capturing"):
        with tb_microscope.Logger(tmp_path / "run", tiny, example) as logger:
            logger.log(0)
    run = tb_microscope.open_run(tmp_path / "run")
    assert run.architecture == "export"
    x = torch.rand(2, 3, 16, 16)
    tiny.eval()
    torch.testing.assert_close(run.load_model(0)(x), tiny(x))


@pytest.mark.parametrize("imagenet", [True, False])
def test_unnormalized_float_probe_images_are_read_as_images_with_one_warning(
    tmp_path, tiny, imagenet
):
    images = torch.rand(6, 3, 16, 16)
    imagenet_stats = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    mean, std = imagenet_stats if imagenet else ([0.5] * 3, [0.5] * 3)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    example = (images[:2] - m) / s
    expected = r"probe= holds float images in \[0, 1\] that look not normalized"
    with pytest.warns(RuntimeWarning, match=expected) as w:
        logger = tb_microscope.Logger(tmp_path, tiny, example, probe=images, normalize=(mean, std))
    assert sum("probe=" in str(x.message) for x in w) == 1
    with logger:
        logger.log(0)
    probe = tb_microscope.open_run(tmp_path).probe_images()
    assert (probe.float() / 255 - images).abs().max() <= 0.5 / 255 + 1e-6


def test_probe_values_outside_the_value_range_are_named_in_a_warning(tmp_path, tiny, example):
    normalized = (torch.rand(4, 3, 16, 16) - 0.45) / 0.22  # normalized, but normalize= not given
    with pytest.warns(RuntimeWarning, match=r"lie outside value_range \[0, 1\].*normalize="):
        tb_microscope.Logger(tmp_path, tiny, example, probe=normalized).close()


def test_normalized_probe_images_raise_no_warning(tmp_path, tiny):
    images = torch.rand(6, 3, 16, 16)
    normalized = (images - 0.5) / 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger = tb_microscope.Logger(
            tmp_path, tiny, normalized[:2], probe=normalized, normalize=([0.5] * 3, [0.25] * 3)
        )
    logger.close()


class Locked(nn.Module):
    """A model whose forward takes a lock: held by another thread when the capture forks, it
    stays held in the child for ever."""

    lock = threading.Lock()

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        with self.lock:
            return self.conv(x)


def test_a_capture_process_stuck_on_a_lock_is_replaced_by_a_capture_here(tmp_path, monkeypatch):
    monkeypatch.setenv("TB_MICROSCOPE_CAPTURE_STALL", "2")
    model = Locked()
    logger = tb_microscope.Logger(tmp_path, model, torch.rand(2, 3, 16, 16))
    held, release = threading.Event(), threading.Event()

    def hold():
        with Locked.lock:
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.log(0)  # forks while the lock is held
        release.set()
        holder.join()
        logger.close()
    said = [str(w.message) for w in caught]
    assert any("capture process used no CPU for 2 s (stuck)" in s for s in said), said
    assert tb_microscope.open_run(tmp_path).architecture == "export"


def test_the_logged_run_lists_every_node_and_notes_the_rest(tmp_path):
    model, x = FixedSizeViT(1), torch.rand(2, 3, 32, 32)
    with tb_microscope.Logger(tmp_path, model, x, every=1) as logger:
        logger.log(0)
    run = tb_microscope.open_run(tmp_path)
    assert [n.name for n in run.nodes] == ["patch", "attn", "attn.qkv", "attn.proj", "head"]
    note = run.manifest.model.architecture.note
    assert "pos_drop, attn.attn_drop, norm" in note and "attn.softmax" in note
