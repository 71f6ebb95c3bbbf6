"""The Hugging Face Trainer callback, run for real: a real `transformers.Trainer` training a small
ViT (random weights, built from its config) on generated images, into a log directory and into a
real `mlflow server`."""

import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import (
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

import tb_microscope
from tb_microscope.integrations.transformers import MicroscopeCallback
from tb_microscope.store.paths import plugin_dir


def vit(dropout: float = 0.0) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        hidden_dropout_prob=dropout,
    )
    return ViTForImageClassification(config)


class Images(torch.utils.data.Dataset):
    """Generated 32 px images and labels, as a Hugging Face image data set gives them; `flip`
    flips at random with torch's global generator, as an augmentation would."""

    def __init__(self, count: int = 24, flip: bool = False):
        generator = torch.Generator().manual_seed(1)
        self.images = torch.rand(count, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, 3, (count,), generator=generator)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = self.images[i]
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"pixel_values": image, "labels": self.labels[i]}


def trainer(tmp_path: Path, model, data, callbacks, report_to=(), **options) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=list(report_to),
        save_strategy="no",
        logging_steps=2,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        **options,
    )
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def test_the_callback_logs_the_trainers_model_beside_its_tensorboard_scalars(tmp_path):
    callback = MicroscopeCallback(steps=[0, 3, 6])
    model = vit()
    trainer(tmp_path, model, Images(), [callback], report_to=["tensorboard"]).train()

    runs = sorted((tmp_path / "out" / "runs").iterdir())
    assert len(runs) == 1, runs  # one run: the Trainer's scalars and the snapshots
    logdir = runs[0]
    scalars = [p for p in logdir.glob("events.out.tfevents.*") if "tb_microscope" not in p.name]
    assert scalars and callback.logger.store.run_dir == logdir
    assert (plugin_dir(logdir) / "manifest.json").is_file()
    assert sorted(p.name for p in (plugin_dir(logdir) / "snapshots").iterdir()) == [
        f"step-{s:09d}.safetensors" for s in (0, 3, 6)
    ]

    run = tb_microscope.open_run(logdir)
    assert run.steps == [0, 3, 6]
    assert run.manifest.model.cls.endswith("ViTForImageClassification")
    assert run.manifest.input.shape == [3, 32, 32]  # pixel_values, from the training set
    assert "vit.layers.1.mlp.fc1" in {n.name for n in run.nodes}
    # the architecture captured is the model: at step 6 it computes the trained model's logits
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(pixel_values=x).logits
        (got,) = run.load_model(6)(x)  # the program returns the output's tensors: the logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    picture = tb_microscope.render(run, 6, "vit.layers.1.mlp.fc1", [0], size=32, iterations=4)
    assert picture.images.shape == (1, 32, 32, 3)


def test_without_tensorboard_the_run_gets_a_directory_named_as_the_trainer_names_its_runs(
    tmp_path,
):
    # a data set that augments at random and a model with dropout: the callback's example batch,
    # read from the training set, uses none of the training's random numbers
    reference = vit(dropout=0.2)
    trainer(tmp_path / "plain", reference, Images(flip=True), []).train()
    after = torch.get_rng_state()
    model, callback = vit(dropout=0.2), MicroscopeCallback()
    trainer(tmp_path, model, Images(flip=True), [callback]).train()
    assert torch.equal(torch.get_rng_state(), after)
    for name, weight in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], weight), name

    (logdir,) = (tmp_path / "out" / "runs").iterdir()
    assert logdir.name.endswith("_" + socket.gethostname())
    assert callback.logger.store.run_dir == logdir
    assert tb_microscope.open_run(logdir).steps == [0, 1, 2, 3, 5]  # the default schedule


def test_a_model_trained_in_mixed_precision_is_captured_with_its_nodes(tmp_path):
    # bf16: accelerate wraps the model's forward in autocast, which would hide every node
    callback = MicroscopeCallback(tmp_path / "run", steps=[6])
    model = vit()
    trainer(tmp_path, model, Images(), [callback], bf16=True).train()
    run = tb_microscope.open_run(tmp_path / "run")
    assert {"vit.layers.0.mlp.fc1", "vit.layers.1.attention.q_proj"} <= {n.name for n in run.nodes}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()._original_forward(pixel_values=x).logits  # without autocast
        (got,) = run.load_model(6)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture
def tracking_uri(mlflow_server, monkeypatch):
    """MLflow's process-wide tracking URI pointed at the test's server, and put back after:
    `mlflow.set_tracking_uri` (which the Trainer's MLflow callback calls) outranks the
    environment, so a URI another test left set would otherwise win."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    yield mlflow_server.url
    mlflow.set_tracking_uri(None)


def test_the_callback_logs_into_the_trainers_mlflow_run(
    mlflow_server, tracking_uri, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "trainer")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    callback = MicroscopeCallback(steps=[0, 6])
    trainer(tmp_path, vit(), Images(), [callback], report_to=["mlflow"]).train()

    client = mlflow.MlflowClient(mlflow_server.url)
    (trained,) = client.search_runs([client.get_experiment_by_name("trainer").experiment_id])
    assert callback.logger.mlflow_run_id == trained.info.run_id
    assert trained.data.params["hidden_size"] == "32"  # the Trainer's own run: its parameters
    artifacts = {a.path for a in client.list_artifacts(trained.info.run_id, "tb_microscope")}
    assert {"tb_microscope/manifest.json", "tb_microscope/snapshots"} <= artifacts
    assert not (tmp_path / "out" / "runs").exists()

    run = tb_microscope.open_run(f"runs:/{trained.info.run_id}")
    assert run.steps == [0, 6]
    picture = tb_microscope.render(run, 0, "vit.layers.0.mlp.fc1", [1], size=32, iterations=4)
    assert picture.images.shape == (1, 32, 32, 3)


def begin(callback, tmp_path, model, state=None, **kwargs):
    """The Trainer's on_train_begin event, with its own arguments and state."""
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    state = state or TrainerState()
    callback.on_train_begin(args, state, TrainerControl(), model=model, **kwargs)


def test_without_an_example_input_or_a_training_set_the_callback_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="pass example_input="):
        begin(MicroscopeCallback(), tmp_path, vit(), train_dataloader=None)


def test_an_example_batch_without_the_models_first_argument_is_refused(tmp_path):
    callback = MicroscopeCallback(example_input={"images": torch.rand(2, 3, 32, 32)})
    with pytest.raises(ValueError, match="'pixel_values'.*Pass example_input="):
        begin(callback, tmp_path, vit())


def test_inputs_the_capture_leaves_out_are_named(tmp_path):
    x = torch.rand(2, 3, 32, 32)
    callback = MicroscopeCallback(
        tmp_path / "run", example_input={"pixel_values": x, "labels": None, "pixel_mask": x}
    )
    with pytest.warns(RuntimeWarning, match="'pixel_values' alone; the batch's pixel_mask"):
        begin(callback, tmp_path, vit())
    callback.logger.close()
    assert tb_microscope.open_run(tmp_path / "run").steps == [0]


def test_other_processes_log_nothing(tmp_path):
    callback = MicroscopeCallback(tmp_path / "run", example_input=torch.rand(2, 3, 32, 32))
    begin(callback, tmp_path, vit(), TrainerState(is_world_process_zero=False))
    callback.on_step_end(None, TrainerState(global_step=1), TrainerControl())
    callback.on_train_end(None, TrainerState(), TrainerControl())
    assert callback.logger is None and not (tmp_path / "run").exists()


def test_without_transformers_the_error_names_the_extra():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "import tb_microscope.integrations.transformers\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "pip install 'tb-microscope[transformers]'" in proc.stderr


def test_importing_tb_microscope_does_not_import_transformers():
    code = "import sys, tb_microscope\nprint('transformers' in sys.modules)\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert out.strip() == "False"
