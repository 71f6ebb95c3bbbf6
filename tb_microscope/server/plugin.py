"""The TensorBoard plugin: routes under /data/plugin/tb_microscope/ and the Microscope tab.

Runs come from the data provider (runs with our snapshot summaries); our files are read from
`<logdir>/<run>/plugins/tb_microscope/`. Each route is a thin handler over a tested `*_impl`.
"""

from __future__ import annotations

import json
import os
from importlib import resources

from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from ..errors import (
    CorruptSnapshotError,
    MicroscopeError,
    NodeNotFoundError,
    PickleNotAllowedError,
    StepNotFoundError,
)
from ..rendering import RenderKey, get_technique
from ..rendering.engine import UnitIndexError, check_units
from ..runstore import PLUGIN_NAME
from .service import DONE, Group, RenderService

_MAX_INT = 2**62


def _int(args, name: str, default: int | None = None, lo: int = 0, hi: int = _MAX_INT) -> int:
    raw = args.get(name)
    if raw is None:
        if default is None:
            raise errors.InvalidArgumentError(f"missing query parameter {name!r}")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise errors.InvalidArgumentError(f"{name} must be a whole number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise errors.InvalidArgumentError(f"{name} must be from {lo} to {hi}, got {value}")
    return value


class MicroscopePlugin(base_plugin.TBPlugin):
    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        self._provider = context.data_provider
        self._logdir = context.logdir or ""
        flags = context.flags
        self._size = getattr(flags, "microscope_size", 128)
        self._iterations = getattr(flags, "microscope_iterations", 512)
        self.service = RenderService(
            device=getattr(flags, "microscope_device", None) or None,
            cache_dir=getattr(flags, "microscope_cache_dir", None) or None,
            allow_pickle=getattr(flags, "microscope_allow_pickle", False),
        )

    def get_plugin_apps(self):
        return {
            "/index.js": self._serve_static,
            "/runs": self._serve_runs,
            "/nodes": self._serve_nodes,
            "/image": self._serve_image,
        }

    def is_active(self) -> bool:
        return False  # the data provider's run list decides, through data_plugin_names

    def data_plugin_names(self):
        return (PLUGIN_NAME,)

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Microscope")

    # --- impls -------------------------------------------------------------------------------
    def _run_dir(self, ctx, experiment: str, name: str) -> str:
        """The directory of a run the data provider knows, refusing anything else."""
        runs = self._provider.list_tensors(ctx, experiment_id=experiment, plugin_name=PLUGIN_NAME)
        if name not in runs:
            raise errors.NotFoundError(
                f"run {name!r} has no tb_microscope data; runs: {', '.join(sorted(runs)) or 'none'}"
            )
        path = os.path.normpath(os.path.join(self._logdir, name))
        root = os.path.normpath(self._logdir)
        if path != root and not path.startswith(root + os.sep):
            raise errors.InvalidArgumentError(f"run {name!r} is outside the log directory")
        return path

    def runs_impl(self, ctx, experiment: str) -> list[dict]:
        runs = self._provider.list_tensors(ctx, experiment_id=experiment, plugin_name=PLUGIN_NAME)
        out = []
        for name in sorted(runs):
            try:
                run = self.service.run(self._run_dir(ctx, experiment, name))
            except MicroscopeError as e:
                out.append({"run": name, "error": str(e)})
                continue
            model = run.manifest["model"]
            out.append(
                {
                    "run": name,
                    "steps": run.steps,
                    "model": {
                        "class": model["class"],
                        "parameters": model["parameters"],
                        "architecture": model["architecture"]["kind"],
                    },
                    "nodes": len(run.nodes),
                    "input": run.input_spec,
                }
            )
        return out

    def nodes_impl(self, ctx, experiment: str, run_name: str) -> dict:
        run = self._open(ctx, experiment, run_name)
        return {
            "run": run_name,
            "nodes": [n.to_json() for n in run.nodes],
            "edges": [list(e) for e in run.edges],
        }

    def _open(self, ctx, experiment, run_name):
        try:
            return self.service.run(self._run_dir(ctx, experiment, run_name))
        except MicroscopeError as e:
            raise errors.NotFoundError(str(e)) from e

    def image_impl(self, ctx, experiment: str, args) -> tuple[int, bytes | dict]:
        """(200, PNG bytes) when rendered, else (202, status) while the service works on it."""
        run = self._open(ctx, experiment, args.get("run", ""))
        step = _int(args, "step")
        if step not in run.steps:
            raise errors.NotFoundError(run.store.missing_step_message(step))
        try:
            node = run.node(args.get("node", ""))
            technique = get_technique(args.get("technique", "channel"))
        except (NodeNotFoundError, ValueError) as e:
            raise errors.NotFoundError(str(e)) from e
        if technique.objective is None:
            raise errors.InvalidArgumentError(f"technique {technique.name!r} has no image")
        unit = _int(args, "unit", 0 if technique.whole_node else None)
        try:
            check_units(node, [unit])
        except UnitIndexError as e:
            raise errors.InvalidArgumentError(str(e)) from e
        group = Group(
            str(run.path),
            step,
            node.name,
            technique.name,
            _int(args, "size", self._size, 8, 1024),
            _int(args, "iterations", self._iterations, 1, 100_000),
            _int(args, "seed", 0),
        )
        status = self.service.request(group, unit)
        if status["status"] == DONE:
            key = RenderKey(
                step, node.name, unit, technique.name, group.size, group.iterations, group.seed
            )
            return 200, self.service.cache(run).path(key).read_bytes()
        if status["status"] == "failed":
            raise errors.InvalidArgumentError(f"render failed: {status['error']}")
        return 202, status

    # --- handlers ----------------------------------------------------------------------------
    @wrappers.Request.application
    def _serve_static(self, request):
        data = resources.files("tb_microscope.static").joinpath("index.js").read_bytes()
        return http_util.Respond(request, data, "text/javascript")

    @wrappers.Request.application
    def _serve_runs(self, request):
        ctx, eid = plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)
        return http_util.Respond(request, self.runs_impl(ctx, eid), "application/json")

    @wrappers.Request.application
    def _serve_nodes(self, request):
        ctx, eid = plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)
        body = self.nodes_impl(ctx, eid, request.args.get("run", ""))
        return http_util.Respond(request, body, "application/json")

    @wrappers.Request.application
    def _serve_image(self, request):
        ctx, eid = plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)
        try:
            code, body = self.image_impl(ctx, eid, request.args)
        except (CorruptSnapshotError, PickleNotAllowedError, StepNotFoundError) as e:
            raise errors.InvalidArgumentError(str(e)) from e
        if code == 200:
            return http_util.Respond(request, body, "image/png")
        return http_util.Respond(request, json.dumps(body), "application/json", code=code)


class MicroscopeLoader(base_plugin.TBLoader):
    """Registers the plugin and its `--microscope_*` flags (see `tensorboard --helpfull`)."""

    def define_flags(self, parser):
        group = parser.add_argument_group("tb_microscope")
        group.add_argument(
            "--microscope_device",
            default="",
            help="device for renders: cuda, cuda:1, cpu (default: cuda if present)",
        )
        group.add_argument(
            "--microscope_cache_dir",
            default="",
            help="where rendered images go (default: in each run, else ~/.cache/tb_microscope)",
        )
        group.add_argument(
            "--microscope_size",
            type=int,
            default=128,
            help="rendered image size in px (default 128)",
        )
        group.add_argument(
            "--microscope_iterations",
            type=int,
            default=512,
            help="optimization steps per render (default 512)",
        )
        group.add_argument(
            "--microscope_allow_pickle",
            action="store_true",
            help="load pickled architectures; this runs code from the log "
            "directory, so only for log directories you trust",
        )

    def load(self, context):
        return MicroscopePlugin(context)
