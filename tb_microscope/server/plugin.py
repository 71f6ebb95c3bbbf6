"""The TensorBoard plugin: routes under /data/plugin/tb_microscope/ and the Microscope tab.

Runs come from the data provider (runs with our snapshot summaries); our files are read from
`<logdir>/<run>/plugins/tb_microscope/`. Each route is a thin handler over a tested `*_impl`;
errors are TensorBoard's own, so users get a 400 or 404 with the message.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import posixpath
from importlib import resources

import numpy as np
from PIL import Image
from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from ..errors import MicroscopeError, NodeNotFoundError, RunNotFoundError, StepNotFoundError
from ..rendering import TECHNIQUES, dataset_examples, get_technique, unit_history, unit_weights
from ..rendering.engine import check_units
from ..runstore import PLUGIN_NAME
from .service import DONE, FAILED, Group, QueueFullError, RenderService

_MAX_INT = 2**62
# What the tab's static files may be, and how they are served.
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css"}


class UnavailableError(errors.PublicError):
    """The render queue is full: 503, try again shortly."""

    error_code = "Unavailable"
    http_code = 503

    def __init__(self, details):
        super().__init__(f"Unavailable: {details}")


@contextlib.contextmanager
def _public_errors():
    """Our errors as TensorBoard's: what is missing is a 404, anything else wrong a 400."""
    try:
        yield
    except (NodeNotFoundError, StepNotFoundError, RunNotFoundError) as e:
        raise errors.NotFoundError(str(e)) from e
    except (MicroscopeError, ValueError) as e:
        raise errors.InvalidArgumentError(str(e)) from e


def _int(args, name: str, default: int | None = None, lo: int = 0, hi: int = _MAX_INT) -> int:
    raw = args.get(name)
    if raw is None:
        if default is None:
            raise errors.InvalidArgumentError(f"missing query parameter {name!r}")
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise errors.InvalidArgumentError(f"{name} must be a whole number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise errors.InvalidArgumentError(f"{name} must be from {lo} to {hi}, got {value}")
    return value


def _png_data_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class MicroscopePlugin(base_plugin.TBPlugin):
    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        self._provider = context.data_provider
        self._logdir = os.path.normpath(context.logdir or ".")
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
            "/static/*": self._serve_static,
            "/runs": self._serve_runs,
            "/techniques": self._serve_techniques,
            "/nodes": self._serve_nodes,
            "/image": self._serve_image,
            "/render": self._serve_render,
            "/examples": self._serve_examples,
            "/weights": self._serve_weights,
            "/history": self._serve_history,
            "/status": self._serve_status,
        }

    def is_active(self) -> bool:
        return False  # the data provider's run list decides, through data_plugin_names

    def data_plugin_names(self):
        return (PLUGIN_NAME,)

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata(
            es_module_path="/static/index.js", tab_name="Microscope"
        )

    # --- impls -------------------------------------------------------------------------------
    def _run_names(self, ctx, experiment: str) -> list[str]:
        runs = self._provider.list_tensors(ctx, experiment_id=experiment, plugin_name=PLUGIN_NAME)
        return sorted(runs)

    def _run(self, ctx, experiment: str, name: str, names: list[str] | None = None):
        """A run the data provider lists; any other name, a path included, is a 404."""
        names = self._run_names(ctx, experiment) if names is None else names
        if name not in names:
            raise errors.NotFoundError(
                f"run {name!r} has no tb_microscope data; runs: {', '.join(names) or 'none'}"
            )
        path = os.path.normpath(os.path.join(self._logdir, name))
        if path != self._logdir and not path.startswith(self._logdir + os.sep):
            raise errors.NotFoundError(f"run {name!r} is outside the log directory")
        with _public_errors():
            return self.service.run(path)

    def _unit_args(self, ctx, experiment: str, args):
        run = self._run(ctx, experiment, args.get("run", ""))
        step = _int(args, "step")
        with _public_errors():
            if step not in run.steps:
                raise StepNotFoundError(run.store.missing_step_message(step))
            node = run.node(args.get("node", ""))
        if run.architecture == "pickle" and not self.service.allow_pickle:
            raise errors.InvalidArgumentError(
                f"run {run.name!r} stores a pickled architecture (torch.export could not capture "
                "its model); loading it runs code from the log directory, so it needs "
                "tensorboard --microscope_allow_pickle, for log directories you trust"
            )
        return run, step, node

    def runs_impl(self, ctx, experiment: str) -> list[dict]:
        out = []
        names = self._run_names(ctx, experiment)
        for name in names:
            try:
                run = self._run(ctx, experiment, name, names)
            except errors.PublicError as e:
                out.append({"run": name, "error": str(e)})
                continue
            model = run.manifest.model
            probe = run.manifest.probe
            out.append(
                {
                    "run": name,
                    "steps": run.steps,
                    "model": {
                        "class": model.cls,
                        "parameters": model.parameters,
                        "architecture": model.architecture.kind,
                    },
                    "nodes": len(run.nodes),
                    "input": run.input_spec.to_json(),
                    "probe": None if probe is None else dataclasses.asdict(probe),
                }
            )
        return out

    @staticmethod
    def techniques_impl() -> list[dict]:
        """The techniques, so that the tab knows which draw images and how many per unit."""
        return [
            {
                "name": t.name,
                "image": t.objective is not None,
                "images_per_unit": t.images_per_unit,
                "whole_node": t.whole_node,
            }
            for t in TECHNIQUES.values()
        ]

    @staticmethod
    def static_impl(path: str) -> tuple[bytes, str]:
        """A file of the tab (`index.js`, `node.js`, `style.css`) and its content type."""
        name = posixpath.normpath(path)
        kind = _STATIC_TYPES.get(posixpath.splitext(name)[1])
        if kind is None or name.startswith(("/", "..")) or "\\" in name:
            raise errors.NotFoundError(f"no such file of the tab: {path!r}")
        try:
            return resources.files("tb_microscope.static").joinpath(name).read_bytes(), kind
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise errors.NotFoundError(f"no such file of the tab: {path!r}") from None

    def nodes_impl(self, ctx, experiment: str, run_name: str) -> dict:
        run = self._run(ctx, experiment, run_name)
        return {
            "run": run_name,
            "nodes": [n.to_json() for n in run.nodes],
            "edges": [list(e) for e in run.edges],
        }

    def _group(self, run, step, node, args) -> Group:
        with _public_errors():
            technique = get_technique(args.get("technique", "channel"))
        if technique.objective is None:
            raise errors.InvalidArgumentError(
                f"technique {technique.name!r} is not an image: use the {technique.name} route"
            )
        return Group(
            str(run.path),
            step,
            node.name,
            technique.name,
            _int(args, "size", self._size, 8, 1024),
            _int(args, "iterations", self._iterations, 1, 100_000),
            _int(args, "seed", 0),
        )

    def _request(self, group: Group, units: list[int]) -> dict[int, dict]:
        try:
            return self.service.request(group, units)
        except QueueFullError as e:
            raise UnavailableError(str(e)) from e

    def image_impl(self, ctx, experiment: str, args) -> tuple[int, bytes | dict]:
        """(200, PNG bytes) when rendered, else (202, status) while the service works on it.

        `image` picks one of a unit's images where a technique draws several (diversity)."""
        run, step, node = self._unit_args(ctx, experiment, args)
        group = self._group(run, step, node, args)
        technique = get_technique(group.technique)
        unit = _int(args, "unit", 0 if technique.whole_node else None)
        image = _int(args, "image", 0, 0, technique.images_per_unit - 1)
        with _public_errors():
            check_units(node, [unit])
        status = self._request(group, [unit])[unit]
        if status["status"] == DONE:
            return 200, self.service.cache(run).path(group.key(unit, image)).read_bytes()
        if status["status"] == FAILED:
            raise errors.InvalidArgumentError(f"the render failed: {status['error']}")
        return 202, status

    def render_impl(self, ctx, experiment: str, body: dict) -> dict:
        """Queue many units of one node at one step (`units`: a list, or "all")."""
        run, step, node = self._unit_args(ctx, experiment, body)
        group = self._group(run, step, node, body)
        units = body.get("units", "all")
        if units == "all":
            units = list(range(node.units))
        if not isinstance(units, list):
            raise errors.InvalidArgumentError('units must be a list of unit indexes, or "all"')
        with _public_errors():
            check_units(node, units)
        statuses = self._request(group, units)
        return {"units": {str(u): s for u, s in statuses.items()}}

    def examples_impl(self, ctx, experiment: str, args) -> dict:
        run, step, node = self._unit_args(ctx, experiment, args)
        unit, count = _int(args, "unit"), _int(args, "count", 8, 1, 64)
        with _public_errors():
            found = dataset_examples(
                run, step, node.name, [unit], count=count, device=self.service.devices[0]
            )[unit]
        return {
            "unit": unit,
            "examples": [
                {
                    "index": e.index,
                    "activation": e.activation,
                    "position": e.position,
                    "box": e.box,
                    "image": _png_data_url(e.image),
                    "crop": _png_data_url(e.crop),
                }
                for e in found
            ],
        }

    def weights_impl(self, ctx, experiment: str, args) -> dict:
        run, step, node = self._unit_args(ctx, experiment, args)
        unit, top = _int(args, "unit"), _int(args, "top", 8, 1, 256)
        with _public_errors():
            source, connections, _ = unit_weights(
                run,
                step,
                node.name,
                unit,
                source=args.get("source") or None,
                top=top,
                device=self.service.devices[0],
            )
        return {
            "unit": unit,
            "source": source,
            "connections": [
                {"node": c.node, "unit": c.unit, "strength": c.strength} for c in connections
            ],
        }

    def history_impl(self, ctx, experiment: str, args) -> dict:
        run = self._run(ctx, experiment, args.get("run", ""))
        unit = _int(args, "unit")
        with _public_errors():
            history = unit_history(run, args.get("node", ""), unit, device=self.service.devices[0])
        return {"unit": unit, "history": history}

    # --- handlers ----------------------------------------------------------------------------
    @staticmethod
    def _context(request):
        return plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)

    def _json(self, request, impl, *args):
        return http_util.Respond(request, impl(*self._context(request), *args), "application/json")

    @wrappers.Request.application
    def _serve_static(self, request):
        prefix = f"/data/plugin/{PLUGIN_NAME}/static/"
        path = request.path.split(prefix, 1)[1] if prefix in request.path else ""
        data, kind = self.static_impl(path)
        return http_util.Respond(request, data, kind)

    @wrappers.Request.application
    def _serve_techniques(self, request):
        return http_util.Respond(request, self.techniques_impl(), "application/json")

    @wrappers.Request.application
    def _serve_runs(self, request):
        return self._json(request, self.runs_impl)

    @wrappers.Request.application
    def _serve_nodes(self, request):
        return self._json(request, self.nodes_impl, request.args.get("run", ""))

    @wrappers.Request.application
    def _serve_image(self, request):
        code, body = self.image_impl(*self._context(request), request.args)
        if code == 200:
            return http_util.Respond(request, body, "image/png")
        return http_util.Respond(request, json.dumps(body), "application/json", code=code)

    @wrappers.Request.application
    def _serve_render(self, request):
        if request.method != "POST":
            raise errors.InvalidArgumentError("render takes a POST with a JSON body")
        try:
            body = json.loads(request.get_data() or b"{}")
        except ValueError as e:
            raise errors.InvalidArgumentError(f"the body is not JSON: {e}") from e
        if not isinstance(body, dict):
            raise errors.InvalidArgumentError("the body must be a JSON object")
        return self._json(request, self.render_impl, body)

    @wrappers.Request.application
    def _serve_examples(self, request):
        return self._json(request, self.examples_impl, request.args)

    @wrappers.Request.application
    def _serve_weights(self, request):
        return self._json(request, self.weights_impl, request.args)

    @wrappers.Request.application
    def _serve_history(self, request):
        return self._json(request, self.history_impl, request.args)

    @wrappers.Request.application
    def _serve_status(self, request):
        return http_util.Respond(request, self.service.snapshot(), "application/json")


class MicroscopeLoader(base_plugin.TBLoader):
    """Registers the plugin and its `--microscope_*` flags (see `tensorboard --helpfull`)."""

    def define_flags(self, parser):
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
