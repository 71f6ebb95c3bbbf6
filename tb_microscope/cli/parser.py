"""`tb-microscope`: the command line.

tb-microscope info LOGDIR       runs, steps and nodes (LOGDIR may be runs:/<MLflow run id>)
tb-microscope render LOGDIR     render feature visualizations ahead of time into the cache
tb-microscope dynamics RUN      how nodes and units changed over training
tb-microscope align A@S B@S     match a node's units across two runs or steps
tb-microscope atlas RUN         an activation atlas of a node at a step, as a PNG
tb-microscope concepts RUN      a node's concepts (dictionary features) at a step, as a PNG
"""

from __future__ import annotations

import argparse
import sys

from ..errors import MicroscopeError
from .align import cmd_align
from .atlas import cmd_atlas
from .concepts import cmd_concepts
from .demo import cmd_demo
from .dynamics import cmd_dynamics
from .info import cmd_info
from .render import cmd_render

# The command modules import what they use (torch among it, 4 s here) inside their functions,
# when a command runs, so that `--help` and a mistyped command answer at once.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tb-microscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="list the runs, steps and nodes under a log directory")
    info.add_argument(
        "logdir",
        help="a TensorBoard log directory, one run directory (either may be a URL: s3://, gs://), "
        "or runs:/<MLflow run id>",
    )
    info.add_argument("--all-nodes", action="store_true", help="list every node")
    info.add_argument(
        "--allow-pickle",
        action="store_true",
        help="trust the log directory (see render --allow-pickle)",
    )
    info.set_defaults(func=cmd_info)

    render = sub.add_parser(
        "render",
        help="render feature visualizations ahead of time into the runs' caches",
        description="Render units into the same cache the TensorBoard tab reads. Resumable: "
        "cached units are skipped; Ctrl-C leaves no half-written file.",
    )
    render.add_argument(
        "logdir",
        help="a log directory, a run directory (either may be a URL: s3://, gs://) or "
        "runs:/<MLflow run id>",
    )
    render.add_argument("--runs", nargs="+", help="run names (default: all runs)")
    render.add_argument("--steps", default="all", help="e.g. 0-1000,5000 or 2000- (default: all)")
    render.add_argument("--nodes", nargs="+", help="node names (default: every node)")
    render.add_argument(
        "--units",
        default="all",
        help="e.g. 0-15,32 or 64- (default: all); for caricature, probe image indexes",
    )
    render.add_argument(
        "--technique",
        default="channel",
        help="channel, neuron, negative_channel, negative_neuron, diversity, "
        "deepdream, caricature (of probe images: --units are their indexes; default: channel)",
    )
    render.add_argument(
        "--quality",
        choices=["preview", "full"],
        default="full",
        help="full: 128 px, 512 iterations; preview: 32 px, 24 iterations, a first look in "
        "about 1/150 of the time (the tab shows previews until the full render is "
        "there); --size and --iterations override either (default full)",
    )
    render.add_argument("--size", type=int, help="image size in px (default: the quality's)")
    render.add_argument("--iterations", type=int, help="default: the quality's")
    render.add_argument("--seed", type=int, default=0)
    render.add_argument(
        "--bands",
        help="for models of more than three input channels: the three shown as RGB, e.g. "
        "3,2,1 (default: the first three)",
    )
    render.add_argument(
        "--device",
        help="cuda, cuda:1, cpu, or several at once: cuda:0,cuda:1 (default: every CUDA "
        "device, else the CPU)",
    )
    render.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per optimization (default: as many as half the device's free memory "
        "holds, at most 32 on CUDA and 16 on the CPU)",
    )
    render.add_argument("--cache-dir", help="cache root (default: in each run, else ~/.cache)")
    render.add_argument(
        "--ray",
        metavar="local|auto|ADDRESS",
        help="render on a Ray cluster (extra tb-microscope[ray]): local starts one on this "
        "machine for the command, auto joins the one in RAY_ADDRESS, else its address; one "
        "actor per GPU, else per CPU. The files written are the same as without --ray (this "
        "process writes them); the cluster's machines must reach the runs",
    )
    render.add_argument(
        "--ray-workers",
        type=int,
        help="with --ray: how many actors (default: one per GPU, else CPU)",
    )
    render.add_argument(
        "--log-to-mlflow",
        action="store_true",
        help="for runs:/<id>: log each picture into that MLflow run (key microscope/<node>/"
        "unit_<n>, at its step) and one grid per node and step",
    )
    render.add_argument(
        "--allow-pickle",
        action="store_true",
        help="trust the log directory: load pickled architectures and architecture files as "
        "they are (this can run code from the log directory)",
    )
    render.set_defaults(func=cmd_render)

    def output_options(command) -> None:
        command.add_argument(
            "--format",
            choices=["table", "csv", "json"],
            help="default: from --output's suffix, else a table",
        )
        command.add_argument("--output", "-o", help="write to this file instead of stdout")
        command.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
        command.add_argument(
            "--allow-pickle",
            action="store_true",
            help="trust the log directory (see render --allow-pickle)",
        )

    dynamics = sub.add_parser(
        "dynamics",
        help="how nodes and units changed over training (CKA, unit correlations, formation)",
        description="From the run's snapshots and probe images: per step, each node's linear "
        "CKA to its last logged form; with --node, also each unit's correlation with its final "
        "form and the step it formed (from which that stays >= 0.9). Cached with the run's "
        "renders: asking again after new snapshots computes only those.",
    )
    dynamics.add_argument("run", help="a run directory (or a log directory with one run)")
    dynamics.add_argument("--node", help="one node's units (default: every node's CKA)")
    dynamics.add_argument("--steps", default="all", help="e.g. 0-1000,5000 or 2000- (default: all)")
    dynamics.add_argument("--cache-dir", help="cache root (default: in the run, else ~/.cache)")
    output_options(dynamics)
    dynamics.set_defaults(func=cmd_dynamics)

    align = sub.add_parser(
        "align",
        help="match the units of a node across two runs (or two steps) one to one",
        description="Pairs every unit of NODE in A with a unit of the same node in B: the "
        "one-to-one assignment with the largest total correlation of their activations on A's "
        "probe images. Prints each pair's correlation and each unit's correlation with the "
        "unit of the same number (for two steps of one run: how much it changed).",
    )
    align.add_argument("a", metavar="RUN_A@STEP")
    align.add_argument("b", metavar="RUN_B@STEP")
    align.add_argument("--node", required=True)
    output_options(align)
    align.set_defaults(func=cmd_align)

    atlas = sub.add_parser(
        "atlas",
        help="an activation atlas of a node at a step (Carter et al., 2019), as a PNG",
        description="Samples the node's activations on the run's probe images, lays them out "
        "in 2-D (UMAP with the [atlas] extra, else PCA) at --layout-step (default: the last "
        "logged step; keep it to compare steps: the same patches stay in the same cells), and "
        "renders each cell's mean direction. Cached with the run's renders.",
    )
    atlas.add_argument(
        "run", help="a run directory or URL (or a log directory with one run), or runs:/<id>"
    )
    atlas.add_argument("--step", type=int, required=True, help="a logged step")
    atlas.add_argument("--node", required=True)
    atlas.add_argument("--grid", type=int, default=20, help="cells per side, 2 to 50 (default 20)")
    atlas.add_argument(
        "--size", type=int, help="each cell's picture, px (default 64; 32 with --preview)"
    )
    atlas.add_argument("--iterations", type=int, help="default 128; 24 with --preview")
    atlas.add_argument(
        "--preview", action="store_true", help="a quick first look: small pictures, few iterations"
    )
    atlas.add_argument(
        "--layout-step", type=int, help="the step whose activations fix the layout (default: last)"
    )
    atlas.add_argument(
        "--layout",
        choices=["auto", "umap", "pca"],
        default="auto",
        help="auto: UMAP where umap-learn is installed (the [atlas] extra), else PCA",
    )
    atlas.add_argument("--seed", type=int, default=0)
    atlas.add_argument("--cache-dir", help="cache root (default: in the run, else ~/.cache)")
    atlas.add_argument("--output", "-o", required=True, help="the PNG to write")
    atlas.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    atlas.add_argument(
        "--allow-pickle",
        action="store_true",
        help="trust the log directory (see render --allow-pickle)",
    )
    atlas.set_defaults(func=cmd_atlas)

    concepts = sub.add_parser(
        "concepts",
        help="a node's concepts (a dictionary of its directions) at a step, as a PNG grid",
        description="Samples the node's activations on the run's probe images as an atlas "
        "does, fits a dictionary of --count concepts (nmf: non-negative factorization, with "
        "scikit-learn; sae: a TopK sparse autoencoder, with Overcomplete; pca: principal axes), "
        "matches them to --reference-step's (default: the last logged step) by their codes, "
        "and renders each concept's whitened direction. Prints the variance explained and each "
        "concept's similarity to its match and strongest probe images. Cached with the run's "
        "renders. The [concepts] extra brings scikit-learn and Overcomplete.",
    )
    concepts.add_argument("run", help="a run directory (or a log directory with one run)")
    concepts.add_argument("--step", type=int, required=True, help="a logged step")
    concepts.add_argument("--node", required=True)
    concepts.add_argument("--count", type=int, default=16, help="concepts, 1 to 256 (default 16)")
    concepts.add_argument("--method", choices=["nmf", "sae", "pca"], default="nmf")
    concepts.add_argument(
        "--reference-step", type=int, help="the step whose concepts set the order (default: last)"
    )
    concepts.add_argument(
        "--size", type=int, help="each concept's picture, px (default 64; 32 with --preview)"
    )
    concepts.add_argument("--iterations", type=int, help="default 128; 24 with --preview")
    concepts.add_argument(
        "--preview", action="store_true", help="a quick first look: small pictures, few iterations"
    )
    concepts.add_argument("--seed", type=int, default=0)
    concepts.add_argument("--cache-dir", help="cache root (default: in the run, else ~/.cache)")
    concepts.add_argument("--output", "-o", required=True, help="the PNG to write")
    concepts.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    concepts.add_argument(
        "--allow-pickle",
        action="store_true",
        help="trust the log directory (see render --allow-pickle)",
    )
    concepts.set_defaults(func=cmd_concepts)

    demo = sub.add_parser(
        "demo",
        help="train a small CNN on generated images, render it, serve the tab",
        description="Generates an image data set (stripes, checkerboards, colour blobs, discs), "
        "trains a small CNN with the Logger (about half a minute on a 2-core CPU), renders its "
        "first nodes ahead of time and starts TensorBoard with the Microscope tab.",
    )
    demo.add_argument("--logdir", default="runs", help="where the demo run goes (default runs)")
    demo.add_argument("--port", type=int, default=6006)
    demo.add_argument("--host", default="localhost")
    demo.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    demo.add_argument(
        "--iterations",
        type=int,
        default=128,
        help="render iterations, ahead of time and in the tab (default 128)",
    )
    demo.add_argument("--no-serve", action="store_true", help="stop before starting TensorBoard")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (MicroscopeError, ValueError) as e:
        print(f"tb-microscope: {e}", file=sys.stderr)
        return 2
