"""Rebuild a logged run in a process that cannot import the training script, and compare.

Usage: python check_run.py RUN_DIR REFERENCE_FILE [--allow-pickle]

For every logged step: load the model with tb_microscope.open_run, then check each reference
node's activation, and the gradient of its most active unit with respect to the input, against
the eager model's (recorded by train_and_reference.py). Exits non-zero on any mismatch.
"""

import argparse
import importlib.util
import sys

import torch

import tb_microscope


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("reference_file")
    parser.add_argument("--allow-pickle", action="store_true")
    args = parser.parse_args()
    assert importlib.util.find_spec("train_and_reference") is None, "training script importable"

    ref = torch.load(args.reference_file, weights_only=True)
    run = tb_microscope.open_run(args.run_dir, allow_pickle=args.allow_pickle)
    assert run.steps == sorted(ref["steps"]), (run.steps, sorted(ref["steps"]))
    worst = 0.0
    for step, nodes in ref["steps"].items():
        model = run.load_model(step)
        for name, expected in nodes.items():
            captured = {}
            model.get_submodule(name).register_forward_hook(
                lambda m, i, o, c=captured: c.__setitem__("out", o)
            )
            x = ref["input"].clone().requires_grad_(True)
            model(x)
            act = captured["out"]
            act[:, int(expected["unit"])].mean().backward()
            for what, got, want in (
                ("activation", act.detach(), expected["activation"]),
                ("grad", x.grad, expected["grad"]),
            ):
                assert want.abs().sum() > 0, f"step {step} {name}: reference {what} is all zero"
                err = ((got - want).norm() / want.norm()).item()
                worst = max(worst, err)
                if not err < 1e-5:
                    print(f"MISMATCH step {step} node {name} {what}: relative error {err:.2e}")
                    return 1
        print(f"step {step}: {len(nodes)} nodes match")
    print(f"ok: architecture={run.architecture} steps={run.steps} worst relative error {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
