"""Train a small CNN for a few hundred steps on generated images and log it for the Microscope tab.

    python examples/quickstart.py --logdir runs
    tb-microscope info runs

Nothing is downloaded: the data set is generated (stripes and colour blobs, in classes). See
tb_microscope/demo/train.py for the training loop, which is an ordinary one plus the Logger.
"""

import argparse

from tb_microscope.demo.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--run", default="quickstart")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    train(f"{args.logdir}/{args.run}", steps=args.steps)


if __name__ == "__main__":
    main()
