"""The server's `--microscope_*` flags (see `tensorboard --helpfull`) and their defaults."""

from __future__ import annotations

from ..optvis.engine import QUALITIES

DEFAULT_CACHE_MB = 2048
DEFAULT_MEMORY_MB = 2048
DEFAULT_MAX_GRID = 40  # the tab's grid picker goes to 40
DEFAULT_MAX_COUNT = 64


def define_flags(parser) -> None:
    """Add the `tb_microscope` group of flags to TensorBoard's argument parser."""
    group = parser.add_argument_group("tb_microscope")
    group.add_argument(
        "--microscope_device",
        default="",
        help="device for renders: cuda, cuda:1, cpu (default: a worker per "
        "CUDA device if there are any, else the CPU)",
    )
    group.add_argument(
        "--microscope_cache_dir",
        default="",
        help="where rendered images go (default: in each run, else ~/.cache/tb_microscope)",
    )
    group.add_argument(
        "--microscope_size",
        type=int,
        default=QUALITIES["full"].size,
        help=f"rendered image size in px (default {QUALITIES['full'].size})",
    )
    group.add_argument(
        "--microscope_iterations",
        type=int,
        default=QUALITIES["full"].iterations,
        help=f"optimization steps per render (default {QUALITIES['full'].iterations})",
    )
    group.add_argument(
        "--microscope_preview_size",
        type=int,
        default=QUALITIES["preview"].size,
        help="size in px of the preview drawn before each full render "
        f"(default {QUALITIES['preview'].size}; 0: no previews)",
    )
    group.add_argument(
        "--microscope_preview_iterations",
        type=int,
        default=QUALITIES["preview"].iterations,
        help="optimization steps of a preview "
        f"(default {QUALITIES['preview'].iterations}; 0: no previews)",
    )
    group.add_argument(
        "--microscope_max_size",
        type=int,
        default=0,
        help="the largest image size in px a request may ask for (default 0: "
        "--microscope_size); a request for more is refused",
    )
    group.add_argument(
        "--microscope_max_iterations",
        type=int,
        default=0,
        help="the most optimization steps a request may ask for (default 0: "
        "--microscope_iterations); a request for more is refused",
    )
    group.add_argument(
        "--microscope_max_grid",
        type=int,
        default=DEFAULT_MAX_GRID,
        help=f"the most cells per side an activation atlas may be asked for (default "
        f"{DEFAULT_MAX_GRID})",
    )
    group.add_argument(
        "--microscope_max_count",
        type=int,
        default=DEFAULT_MAX_COUNT,
        help="the most dataset examples or strongest weights one request may ask for "
        f"(default {DEFAULT_MAX_COUNT})",
    )
    group.add_argument(
        "--microscope_workers",
        type=int,
        default=0,
        help="render workers in this process (default 0: one per CUDA device, else one); "
        "more for a CPU server with many cores. Each loads its own copy of a model",
    )
    group.add_argument(
        "--microscope_cache_max_mb",
        type=float,
        default=DEFAULT_CACHE_MB,
        help="the most the render caches may hold on disk, in MB; the least recently "
        f"used images go first (default {DEFAULT_CACHE_MB}; 0: no limit)",
    )
    group.add_argument(
        "--microscope_memory_mb",
        type=float,
        default=DEFAULT_MEMORY_MB,
        help="the most loaded models and programs may take in memory, in MB "
        f"(default {DEFAULT_MEMORY_MB})",
    )
    group.add_argument(
        "--microscope_allow_pickle",
        action="store_true",
        help="trust the log directory: load pickled architectures and architecture files "
        "as they are; this can run code from the log directory, so only for log "
        "directories you trust",
    )
    group.add_argument(
        "--microscope_no_warm_up",
        action="store_true",
        help="do not compile UMAP (umap-learn's numba functions, about half a minute on a "
        "CPU) and import the concepts' libraries in the background when a run with probe "
        "images is first listed; the first atlas or concepts then waits for them",
    )
    group.add_argument(
        "--microscope_ray_address",
        default="",
        help="render the tab's pictures on this Ray cluster (extra tb-microscope[ray]): "
        "an address, auto (RAY_ADDRESS) or local (a cluster on this machine); one actor per "
        "GPU, else per CPU. Its machines must reach the log directory's runs",
    )
    group.add_argument(
        "--microscope_mlflow_tracking_uri",
        default="",
        help="also list the runs of this MLflow tracking server that hold tb_microscope "
        "data (logged with tb_microscope.Logger('mlflow', ...)), as mlflow:<experiment>/<run>",
    )
    group.add_argument(
        "--microscope_mlflow_experiments",
        default="",
        help="with --microscope_mlflow_tracking_uri: only these experiments (comma-separated "
        "names or ids; default all)",
    )
