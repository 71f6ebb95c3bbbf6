"""Train a small CNN for a few hundred steps on generated images and log it for the Microscope tab.

    python examples/quickstart.py --logdir runs
    tb-microscope info runs

Nothing is downloaded: the data set is made here (oriented stripes and colour blobs, in classes).
"""

import argparse
import math
import time

import torch
from torch import nn

import tb_microscope


def make_images(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes: horizontal stripes, vertical stripes, a red blob, a blue blob; with noise."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.rand(n, 3, size, size, generator=generator) * 0.2
    for i, label in enumerate(labels.tolist()):
        period = 4 + 4 * torch.rand(1, generator=generator).item()
        if label < 2:
            coord = ys if label == 0 else xs
            images[i] += 0.5 + 0.5 * torch.sin(2 * math.pi * coord / period)
        else:
            cy, cx = (torch.rand(2, generator=generator) * size).tolist()
            blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * (size / 6) ** 2))
            images[i, 0 if label == 2 else 2] += blob
    return images.clamp(0, 1), labels


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--run", default="quickstart")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images, labels = make_images(2048, 32, generator)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    normalized = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    start = time.time()
    with tb_microscope.Logger(
        f"{args.logdir}/{args.run}",
        model,
        normalized[:8],
        probe=normalized[:64],
        normalize=(mean, std),
    ) as logger:
        for step in range(args.steps + 1):
            logger.log(step)
            batch = torch.randint(0, len(images), (64,), generator=generator)
            loss = nn.functional.cross_entropy(model(normalized[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 50 == 0:
                print(f"step {step:4d}  loss {loss.item():.3f}")
    print(
        f"trained {args.steps} steps in {time.time() - start:.0f}s; logged steps "
        f"{logger.logged_steps} to {args.logdir}/{args.run}"
    )


if __name__ == "__main__":
    main()
