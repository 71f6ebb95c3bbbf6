"""Trains the tests' TinyCNN inside an MLflow run with Logger("mlflow", ...).

    mlflow_train.py EXPERIMENT RUN_NAME STEPS OUT [--run-id ID] [--pause S] [--progress FILE]

Logs at each of STEPS (comma list; the training runs to the last), saving the weights it logged
at each step into OUT/step-N.pt for the test to compare, and prints the MLflow run id. With
--run-id it goes on in that run (a second training session); with --pause it sleeps that long
after each step, writing the step reached to --progress.
"""

import argparse
import sys
import time
from pathlib import Path

import mlflow
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
import tb_microscope  # noqa: E402
from conftest import TinyCNN, train_step  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("experiment")
parser.add_argument("run_name")
parser.add_argument("steps")
parser.add_argument("out", type=Path)
parser.add_argument("--run-id")
parser.add_argument("--pause", type=float, default=0.0)
parser.add_argument("--progress", type=Path)
args = parser.parse_args()
steps = [int(s) for s in args.steps.split(",")]
args.out.mkdir(parents=True, exist_ok=True)

torch.manual_seed(0)
model = TinyCNN()
if args.run_id:  # the second session goes on from the first one's last weights
    model.load_state_dict(torch.load(args.out / "last.pt"))
mlflow.set_experiment(args.experiment)
data = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
with mlflow.start_run(run_id=args.run_id, run_name=None if args.run_id else args.run_name) as run:
    print(run.info.run_id, flush=True)
    with tb_microscope.Logger("mlflow", model, data[:4], steps=steps, probe=data) as logger:
        for step in range(steps[-1] + 1):
            if logger.log(step):
                torch.save(model.state_dict(), args.out / f"step-{step}.pt")
            train_step(model, data)
            if args.progress:
                args.progress.write_text(str(step))
            time.sleep(args.pause)
    torch.save(model.state_dict(), args.out / "last.pt")
print("done", flush=True)
