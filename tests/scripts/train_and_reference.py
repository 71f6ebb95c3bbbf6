"""A training script as a user would write one: trains a model for a few steps with the Logger.

Usage: python train_and_reference.py MODEL RUN_DIR REFERENCE_FILE [--steps N] [--size PX]

MODEL is a torchvision model name, `custom` (a CNN defined here, in __main__) or `branchy` (a
model with data-dependent control flow, which torch.export cannot capture). At every logged step
it also records, from the eager model, a few nodes' activations on a fixed input and the gradient
of one unit with respect to that input, so that another process can check the rebuilt model.
"""

import argparse

import torch
import torchvision
from torch import nn

import tb_microscope


class CustomCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.side = nn.Conv2d(16, 32, 1, stride=2)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.block(x) + self.side(x))
        return self.head(x.mean((2, 3)))


class Branchy(nn.Module):
    """Picks a branch from the data: torch.export cannot trace this."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bright = nn.Conv2d(8, 8, 3, padding=1)
        self.dark = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = self.bright(h) if h.mean() > 0.1 else self.dark(h)
        return self.fc(torch.relu(h).mean((2, 3)))


def build(name: str) -> nn.Module:
    if name == "custom":
        return CustomCNN()
    if name == "branchy":
        return Branchy()
    kwargs = {"num_classes": 10}
    if name == "googlenet":
        kwargs.update(aux_logits=False, init_weights=True)
    return getattr(torchvision.models, name)(**kwargs)


def reference(model: nn.Module, nodes: list[str], x: torch.Tensor) -> dict:
    """Each node's activation on x and the input gradient of its most active unit, in eval mode."""
    out = {}
    was_training = model.training
    model.eval()
    for name in nodes:
        captured = {}
        handle = model.get_submodule(name).register_forward_hook(
            lambda m, i, o, c=captured: c.__setitem__("out", o)
        )
        xi = x.clone().requires_grad_(True)
        model(xi)
        handle.remove()
        act = captured["out"]
        unit = (
            int(act.flatten(2).mean(-1).mean(0).argmax())
            if act.dim() == 4
            else int(act.mean(0).argmax())
        )
        act[:, unit].mean().backward()
        out[name] = {
            "activation": act.detach().clone(),
            "grad": xi.grad.detach().clone(),
            "unit": torch.tensor(unit),
        }
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("run_dir")
    parser.add_argument("reference_file")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build(args.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = torch.rand(8, 3, args.size, args.size)
    labels = torch.randint(0, 10, (8,))
    probe_input = torch.rand(2, 3, args.size, args.size)
    references = {}
    with tb_microscope.Logger(args.run_dir, model, images[:4], probe=images) as logger:
        spatial = [n.name for n in logger.nodes if n.kind == "spatial"]
        vector = [n.name for n in logger.nodes if n.kind == "vector"]
        checked = [spatial[len(spatial) // 2], spatial[-1]] + vector[-1:]
        for step in range(args.steps):
            if logger.log(step):
                references[step] = reference(model, checked, probe_input)
            model.train()
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.save({"input": probe_input, "steps": references}, args.reference_file)
    print(f"logged steps {sorted(references)}; checked nodes {checked}")


if __name__ == "__main__":
    main()
