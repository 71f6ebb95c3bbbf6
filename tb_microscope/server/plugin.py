"""The TensorBoard plugin: routes under /data/plugin/tb_microscope/ and the Microscope tab.

Runs come from the data provider (runs with our snapshot summaries); our files are read from
`<logdir>/<run>/plugins/tb_microscope/`. Each route is a thin handler over a tested `*_impl`;
errors are TensorBoard's own, so users get a 400 or 404 with the message; every route runs in
`public_errors`, so that anything else (a bug, a fault of the machine) is a 500 whose traceback
is in the server's log. A run that cannot be read is listed with its error and breaks nothing
else. Routes that start or stop work take a POST of `application/json` from the tab's own
origin only, so a page on another site cannot make the server render (or cancel) anything.

Beside it: `requests.py` reads and checks a request, `previews.py` decides what is shown first,
`flags.py` defines the `--microscope_*` flags, and `service.py` runs the work on its workers.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import posixpath
from importlib import resources
from urllib.parse import urlencode

from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from .. import limits
from ..analysis.attribution import METHODS, captum_attr
from ..analysis.concepts import check_concepts_request, needs_library
from ..analysis.warmup import WARM_UP
from ..analysis.weights import default_source
from ..errors import MicroscopeError, RunNotFoundError, StepNotFoundError, first_line
from ..execution.cache import decode_picture, encode_picture
from ..optvis.engine import (
    QUALITIES,
    Quality,
    check_images,
    check_technique,
    check_units,
    display_bands,
)
from ..optvis.probe import as_rgb, probe_count
from ..optvis.techniques import TECHNIQUES, get_technique
from ..store import remote
from ..store.mlflow import MlflowRuns
from ..store.paths import PLUGIN_NAME, is_remote_url
from ..store.remote.mirror import RemoteRunStore
from .flags import (
    DEFAULT_CACHE_MB,
    DEFAULT_MAX_COUNT,
    DEFAULT_MAX_GRID,
    DEFAULT_MEMORY_MB,
    define_flags,
)
from .previews import atlas_qualities, render_preview, request_with_previews
from .requests import (
    UnavailableError,
    capped_arg,
    check_same_site,
    int_arg,
    json_body,
    public_errors,
)
from .service import DONE, FAILED, QueueFullError, RenderService
from .work import Analysis, RenderWork, Work

# What the tab's static files may be, and how they are served.
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css"}
log = logging.getLogger(__name__)


def guarded(app):
    """The route `app` (a WSGI app) with its errors said as TensorBoard's (`public_errors`)."""

    def guarded_app(environ, start_response):
        with public_errors():
            return app(environ, start_response)

    return guarded_app


def overlay_png(result: dict) -> bytes:
    """The PNG of an attribution result's heat map (held in it as a data URL)."""
    return base64.b64decode(result["overlay"].split(",", 1)[1])


class MicroscopePlugin(base_plugin.TBPlugin):
    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        self._provider = context.data_provider
        # a URL (s3://, gs://) stays a URL: its runs are read through the object store backend
        self._url = remote.normalize(context.logdir) if is_remote_url(context.logdir) else None
        self._remote: dict[str, RemoteRunStore] = {}  # run URL -> its mirror
        self._logdir = os.path.normpath(context.logdir or ".") if self._url is None else ""
        flags = context.flags
        full, preview = QUALITIES["full"], QUALITIES["preview"]
        self._size = getattr(flags, "microscope_size", full.size)
        self._iterations = getattr(flags, "microscope_iterations", full.iterations)
        render = Quality(self._size, self._iterations)
        # A preview is a smaller, shorter render shown first; none when it would not be cheaper.
        self._preview = render_preview(
            render,
            Quality(
                getattr(flags, "microscope_preview_size", preview.size),
                getattr(flags, "microscope_preview_iterations", preview.iterations),
            ),
        )
        self._atlas = atlas_qualities(render)
        # The most work one request may ask for: by default, the configured full quality.
        self._max_size = getattr(flags, "microscope_max_size", 0) or self._size
        self._max_iterations = getattr(flags, "microscope_max_iterations", 0) or self._iterations
        self._max_grid = getattr(flags, "microscope_max_grid", DEFAULT_MAX_GRID)
        self._max_count = getattr(flags, "microscope_max_count", DEFAULT_MAX_COUNT)
        cache_mb = getattr(flags, "microscope_cache_max_mb", DEFAULT_CACHE_MB)
        memory_mb = getattr(flags, "microscope_memory_mb", DEFAULT_MEMORY_MB)
        self.service = RenderService(
            device=getattr(flags, "microscope_device", None) or None,
            cache_dir=getattr(flags, "microscope_cache_dir", None) or None,
            allow_pickle=getattr(flags, "microscope_allow_pickle", False),
            cache_bytes=int(cache_mb * (1 << 20)) if cache_mb and cache_mb > 0 else None,
            model_bytes=int(memory_mb * (1 << 20)),
            ray_address=getattr(flags, "microscope_ray_address", "") or None,
            workers=getattr(flags, "microscope_workers", 0) or None,
        )
        # Compile UMAP and import concepts' libraries once a run with probe images is listed.
        self._warm_up = not getattr(flags, "microscope_no_warm_up", False)
        uri = getattr(flags, "microscope_mlflow_tracking_uri", "") or ""
        experiments = getattr(flags, "microscope_mlflow_experiments", "") or ""
        self._mlflow = (
            MlflowRuns(uri, [e.strip() for e in experiments.split(",") if e.strip()] or None)
            if uri
            else None
        )

    def get_plugin_apps(self):
        return {route: guarded(app) for route, app in self._routes().items()}

    def _routes(self):
        return {
            "/static/*": self._serve_static,
            "/runs": self._serve_runs,
            "/techniques": self._serve_techniques,
            "/settings": self._serve_settings,
            "/nodes": self._serve_nodes,
            "/image": self._serve_image,
            "/render": self._serve_render,
            "/cancel": self._serve_cancel,
            "/examples": self._serve_examples,
            "/weights": self._serve_weights,
            "/history": self._serve_history,
            "/attribution": self._serve_attribution,
            "/atlas": self._serve_atlas,
            "/concepts": self._serve_concepts,
            "/probe": self._serve_probe,
            "/dynamics": self._serve_dynamics,
            "/thumbnails": self._serve_thumbnails,
            "/align": self._serve_align,
            "/status": self._serve_status,
        }

    def is_active(self) -> bool:
        # the data provider's run list decides, through data_plugin_names; MLflow runs are ours,
        # and until the first listing answers there may be some (it is not waited for)
        return self._mlflow is not None and (self._mlflow.pending() or bool(self._mlflow.names()))

    def data_plugin_names(self):
        return (PLUGIN_NAME,)

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata(
            es_module_path="/static/index.js", tab_name="Microscope"
        )

    # --- impls -------------------------------------------------------------------------------
    def _run_names(self, ctx, experiment: str) -> list[str]:
        runs = self._provider.list_tensors(ctx, experiment_id=experiment, plugin_name=PLUGIN_NAME)
        return sorted(runs) + (self._mlflow.names() if self._mlflow is not None else [])

    def _open(self, name: str):
        """The run `name` (one the data provider lists), or the MicroscopeError saying why it
        cannot be shown: an unreadable manifest, or a model that cannot be loaded here."""
        store = self._mlflow.store(name) if self._mlflow is not None else None
        if store is not None:
            run = self.service.run(str(store.run_dir), store=store)
            run.check()
            return run
        if self._url is not None:
            return self._open_remote(name)
        path = os.path.normpath(os.path.join(self._logdir, name))
        if path != self._logdir and not path.startswith(self._logdir + os.sep):
            raise RunNotFoundError(f"run {name!r} is outside the log directory")
        run = self.service.run(path)
        run.check()
        return run

    def _open_remote(self, name: str):
        """The run `name` under the logdir's URL, read through its mirror (kept per run)."""
        parts = name.split("/")
        if name != "." and ("\\" in name or any(p in ("", ".", "..") for p in parts)):
            raise RunNotFoundError(f"run {name!r} is outside the log directory")
        url = remote.join(self._url, name)
        store = self._remote.get(url)
        if store is None:
            made = RemoteRunStore(url)
            made.background = True  # no request waits on the store once the run is mirrored
            store = self._remote.setdefault(url, made)
        run = self.service.run(str(store.run_dir), store=store)
        run.check()
        return run

    def _run(self, ctx, experiment: str, name: str):
        """A run the data provider lists; any other name, a path included, is a 404. A run
        that cannot be shown here is a 400 saying why."""
        names = self._run_names(ctx, experiment)
        if name not in names:
            raise errors.NotFoundError(
                f"run {name!r} has no tb_microscope data; runs: {', '.join(names) or 'none'}"
            )
        with public_errors():
            return self._open(name)

    def _step(self, run, args, name: str = "step") -> int:
        step = int_arg(args, name)
        with public_errors():
            if step not in run.steps:
                raise StepNotFoundError(run.store.missing_step_message(step))
        return step

    def _unit_args(self, ctx, experiment: str, args):
        run = self._run(ctx, experiment, args.get("run", ""))
        step = self._step(run, args)
        with public_errors():
            node = run.node(args.get("node", ""))
        return run, step, node

    def runs_impl(self, ctx, experiment: str) -> list[dict]:
        """Every run with our data; one that cannot be read is listed with its error."""
        out = []
        for name in self._run_names(ctx, experiment):
            try:
                run = self._open(name)
                model, probe = run.manifest.model, run.manifest.probe
                out.append(
                    {
                        "run": name,
                        "steps": run.steps,
                        "model": {
                            "class": model.cls,
                            "parameters": model.parameters,
                            "architecture": model.architecture.kind,
                            "note": model.architecture.note,
                        },
                        "nodes": len(run.nodes),
                        "input": run.input_spec.to_json(),
                        "probe": None if probe is None else dataclasses.asdict(probe),
                    }
                )
                if probe is not None and self._warm_up:
                    WARM_UP.start()  # at once: once per process, on a thread of its own
            except MicroscopeError as e:
                out.append({"run": name, "error": str(e)})
            except Exception as e:  # a bug or a fault of the machine: this run only, logged
                log.exception("listing run %r failed", name)
                out.append(
                    {"run": name, "error": f"internal error in tb_microscope ({first_line(e)})"}
                )
        return out

    def status_impl(self) -> dict:
        """What the render service is doing, and where the analyses' warm-up is
        (`analysis/warmup.py`)."""
        return {**self.service.snapshot(), "warm_up": WARM_UP.state()}

    @staticmethod
    def techniques_impl() -> list[dict]:
        """The techniques, so that the tab knows which draw images and how many per unit, and
        which draw probe images rather than units (`probe_images`: a caricature)."""
        return [
            {
                "name": t.name,
                "image": t.objective is not None,
                "images_per_unit": t.images_per_unit,
                "whole_node": t.whole_node,
                "class_token": t.class_token,
                "probe_images": t.compares,
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
        self.service.prefetch(run)  # the run is on screen: a node of it is likely opened next
        return {
            "run": run_name,
            "nodes": [n.to_json() for n in run.nodes],
            "edges": [list(e) for e in run.edges],
        }

    @staticmethod
    def _bands(run, args) -> tuple[int, ...] | None:
        """`bands`: three channels shown as RGB ("3,2,1" in a query, a list in a body)."""
        raw = args.get("bands")
        if raw in (None, ""):
            return None
        if isinstance(raw, str):
            try:
                raw = [int(b) for b in raw.split(",")]
            except ValueError:
                raise errors.InvalidArgumentError(
                    f"bands must be three channel numbers like 3,2,1, got {raw!r}"
                ) from None
        if not isinstance(raw, list):
            raise errors.InvalidArgumentError("bands must be a list of three channel numbers")
        channels = run.input_spec.channels
        with public_errors():
            chosen = display_bands(channels, raw)
        return None if chosen == display_bands(channels, None) else tuple(chosen)

    def settings_impl(self) -> dict:
        """What a render is (size, iterations) at full quality and as a preview (None: no
        previews), so that the tab asks for the preview first; the attribution methods (the
        first is the default); an atlas's cells at each quality; and the most one request may
        ask for (the `--microscope_max_*` flags)."""
        preview = self._preview
        return {
            "size": self._size,
            "iterations": self._iterations,
            "preview": None if preview is None else dataclasses.asdict(preview),
            "attribution_methods": list(METHODS),
            "atlas": {
                quality: None if q is None else dataclasses.asdict(q)
                for quality, q in self._atlas.items()
            },
            "limits": {
                "size": self._max_size,
                "iterations": self._max_iterations,
                "grid": self._max_grid,
                "count": self._max_count,
            },
        }

    def _group(self, run, step, node, args) -> RenderWork:
        quality = args.get("quality", "full")
        if quality not in QUALITIES:
            raise errors.InvalidArgumentError(
                f"quality must be one of {', '.join(QUALITIES)}, got {quality!r}"
            )
        preview = quality == "preview" and self._preview is not None
        with public_errors():
            technique = get_technique(args.get("technique", "channel"))
            version = run.snapshot_version(step)
            check_technique(technique, node)
        if technique.objective is None:
            raise errors.InvalidArgumentError(
                f"technique {technique.name!r} is not an image: use the {technique.name} route"
            )
        return RenderWork(
            str(run.path),
            run.id,
            step,
            version,
            node.name,
            technique.name,
            self._preview.size
            if preview
            else capped_arg(
                args, "size", self._size, limits.SIZE, self._max_size, "--microscope_max_size"
            ),
            self._preview.iterations
            if preview
            else capped_arg(
                args,
                "iterations",
                self._iterations,
                limits.ITERATIONS,
                self._max_iterations,
                "--microscope_max_iterations",
            ),
            int_arg(args, "seed", 0),
            self._bands(run, args),
            preview,
        )

    def _request(self, work: Work, units: list[int]) -> dict[int, dict]:
        try:
            if isinstance(work, RenderWork) and not work.preview and self._preview is not None:
                return request_with_previews(self.service, work, units, self._preview)
            return self.service.request(work, units)
        except QueueFullError as e:
            raise UnavailableError(str(e)) from e

    def image_impl(self, ctx, experiment: str, args) -> tuple[int, bytes | dict]:
        """(200, PNG bytes) when rendered, else (202, status) while the service works on it.

        `image` picks one of a unit's images where a technique draws several (diversity); for a
        technique of probe images (caricature) it names the probe image, which is what the
        render is of (`unit`, as the render route names it, may say the same)."""
        run, step, node = self._unit_args(ctx, experiment, args)
        group = self._group(run, step, node, args)
        technique = get_technique(group.technique)
        if technique.compares:
            unit, image = self._probe_index(run, technique.name, args), 0
        else:
            unit = int_arg(args, "unit", 0 if technique.whole_node else None)
            image = int_arg(args, "image", 0, 0, technique.images_per_unit - 1)
            with public_errors():
                check_units(node, [unit])
        status = self._request(group, [unit])[unit]
        if status["status"] == DONE:
            cache = self.service.cache(run)
            data = cache.read(cache.path(group.key(unit, image)))
            if data is not None:
                return 200, data
            status = self._request(group, [unit])[unit]  # evicted since: render it again
        if status["status"] == FAILED:
            raise errors.InvalidArgumentError(f"the render failed: {status['error']}")
        return 202, status

    def thumbnails_impl(self, ctx, experiment: str, args) -> dict:
        """Per node, the latest step at which its first `count` units' channel images are in
        the cache (full quality, else previews), without asking for any render:
        {node: {"step": s, "quality": "full" | "preview", "units": [0, 1, ...]}}."""
        run = self._run(ctx, experiment, args.get("run", ""))
        count = int_arg(args, "count", 4, 1, 16)
        cache = self.service.cache(run)
        qualities = ["full", "preview"] if self._preview is not None else ["full"]
        found = {}
        for node in run.nodes:
            units = list(range(min(count, node.units)))
            for step in reversed(run.steps):
                for quality in qualities:
                    group = self._group(run, step, node, {"quality": quality})
                    if all(key in cache for unit in units for key in group.keys(unit)):
                        found[node.name] = {"step": step, "quality": quality, "units": units}
                        break
                if node.name in found:
                    break
        return found

    def _units(self, run, node, group: RenderWork, body: dict) -> list[int]:
        """The units a render or cancel names: of the node, or for a technique of probe images
        (caricature) probe image indexes."""
        units = body.get("units", "all")
        of_probe = get_technique(group.technique).compares
        if units == "all":
            if of_probe:
                return list(range(self._probe_count(run)))
            return list(range(node.units))
        if not isinstance(units, list):
            raise errors.InvalidArgumentError('units must be a list of unit indexes, or "all"')
        if of_probe:
            return self._probe_images(run, units)
        with public_errors():
            return check_units(node, units)

    @staticmethod
    def _probe_count(run) -> int:
        """How many probe images the run has (its manifest says, else its store); a run
        without any is a 400 saying how to log them."""
        with public_errors():
            return probe_count(run)

    def _probe_images(self, run, images: list) -> list[int]:
        """Probe image indexes, checked against the run's probe images (a 400 saying the range,
        or that the run has none and how to log them)."""
        count = self._probe_count(run)
        with public_errors():
            return check_images(run, images, count)

    def _probe_index(self, run, technique: str, args) -> int:
        """The probe image a caricature is of: `image=`, or `unit=` as the render route names a
        caricature's units; both must agree."""
        given = {
            name: int_arg(args, name) for name in ("image", "unit") if args.get(name) is not None
        }
        if not given:
            raise errors.InvalidArgumentError(
                f"technique {technique!r} draws a probe image: pass image= (a probe image index)"
            )
        if len(set(given.values())) > 1:
            raise errors.InvalidArgumentError(
                f"image= names the probe image of a {technique}; unit= may only say the same, "
                f"got image={given['image']} and unit={given['unit']}"
            )
        (index,) = self._probe_images(run, list(given.values())[:1])
        return index

    def render_impl(self, ctx, experiment: str, body: dict) -> dict:
        """Queue many units of one node at one step (`units`: a list, or "all"; for a caricature,
        probe image indexes)."""
        run, step, node = self._unit_args(ctx, experiment, body)
        group = self._group(run, step, node, body)
        statuses = self._request(group, self._units(run, node, group, body))
        return {"units": {str(u): s for u, s in statuses.items()}}

    def cancel_impl(self, ctx, experiment: str, body: dict) -> dict:
        """Forget units of one render group (as `render` names them): queued ones are dropped,
        and a running render nobody else waits for stops."""
        run, step, node = self._unit_args(ctx, experiment, body)
        group = self._group(run, step, node, body)
        return {"cancelled": self.service.cancel(group, self._units(run, node, group, body))}

    def _analysis(self, ctx, experiment: str, args, kind: str, options: dict, steps=None):
        """A unit's computed view: (200, result) when computed, else (202, status) while a
        worker computes it."""
        run = self._run(ctx, experiment, args.get("run", ""))
        if steps is None:
            steps = [self._step(run, args)]
            options = {"step": steps[0], **options}
        with public_errors():
            node = run.node(args.get("node", ""))
            unit = int_arg(args, "unit")
            check_units(node, [unit])
        return self._computed(run, kind, node.name, unit, options, steps)

    def _computed(self, run, kind: str, node: str, unit: int, options: dict, steps):
        return self._result(run, self._work(run, kind, node, unit, options, steps))

    @staticmethod
    def _work(run, kind: str, node: str, unit: int, options: dict, steps) -> Analysis:
        with public_errors():
            snapshots = tuple((s, run.snapshot_version(s)) for s in steps)
        return Analysis(
            str(run.path), run.id, kind, node, unit, tuple(sorted(options.items())), snapshots
        )

    def _result(self, run, work: Analysis, read=None) -> tuple[int, dict | bytes]:
        """(200, the result) when computed, else (202, status) once it is asked for; a failure
        is a 400 saying why. `read(cache)` reads the result (by default its JSON); None, when
        it was evicted since, asks for it again."""
        unit = work.unit
        status = self._request(work, [unit])[unit]
        if status["status"] == DONE:
            cache = self.service.cache(run)
            result = read(cache) if read else cache.get_result(work.result_key)
            if result is not None:
                return 200, result
            status = self._request(work, [unit])[unit]
        if status["status"] == FAILED:
            raise errors.InvalidArgumentError(status["error"])
        return 202, status

    def _probe_needed(self, run, what: str = "dynamics and unit matching are computed on") -> None:
        if run.manifest.probe is None:
            raise errors.InvalidArgumentError(
                f"run '{run.name}' has no probe images, which {what}; log it with "
                "tb_microscope.Logger(..., probe=images) (a few hundred training inputs)"
            )

    def dynamics_impl(self, ctx, experiment: str, args) -> tuple[int, dict]:
        """A node's dynamics over every logged step, or with no `node` every node's CKA."""
        run = self._run(ctx, experiment, args.get("run", ""))
        self._probe_needed(run)
        node = ""
        if args.get("node"):
            with public_errors():
                node = run.node(args["node"]).name
        if not run.steps:
            raise errors.InvalidArgumentError(f"run '{run.name}' has no snapshots yet")
        return self._computed(run, "dynamics", node, 0, {}, run.steps)

    def align_impl(self, ctx, experiment: str, args) -> tuple[int, dict]:
        """A node's units at `run`@`step` matched one to one with those at `run2`@`step2`."""
        run, step, node = self._unit_args(ctx, experiment, args)
        self._probe_needed(run)
        other = self._run(ctx, experiment, args.get("run2", ""))
        step2 = self._step(other, args, "step2")
        with public_errors():
            other.node(node.name)
            options = {
                "other": str(other.path),
                "other_id": other.id,
                "other_step": step2,
                "other_version": other.snapshot_version(step2),
            }
        return self._computed(run, "align", node.name, 0, options, [step])

    def examples_impl(self, ctx, experiment: str, args) -> tuple[int, dict]:
        count = capped_arg(args, "count", 8, (1, 64), self._max_count, "--microscope_max_count")
        return self._analysis(ctx, experiment, args, "examples", {"count": count})

    def weights_impl(self, ctx, experiment: str, args) -> tuple[int, dict]:
        run, _, node = self._unit_args(ctx, experiment, args)
        with public_errors():  # a wrong source is said at once, not after a wait
            source = run.node(args.get("source") or default_source(run, node.name)).name
        top = capped_arg(args, "top", 8, (1, 256), self._max_count, "--microscope_max_count")
        options = {"top": top, "source": source}
        return self._analysis(ctx, experiment, args, "weights", options)

    def history_impl(self, ctx, experiment: str, args) -> tuple[int, dict]:
        run = self._run(ctx, experiment, args.get("run", ""))
        return self._analysis(ctx, experiment, args, "history", {}, steps=run.steps)

    def attribution_impl(self, ctx, experiment: str, args) -> tuple[int, dict]:
        """Which pixels of probe image `image` drive the unit at the step, by `method` (one of
        METHODS; the first by default): the signed values per pixel and a heat map to overlay
        on the image (with `format=png`, the route answers the heat map alone, as a PNG). What
        is wrong in the request is said before anything is queued."""
        run, _, node = self._unit_args(ctx, experiment, args)
        method = args.get("method") or METHODS[0]
        if method not in METHODS:
            raise errors.InvalidArgumentError(
                f"method must be one of {', '.join(METHODS)}, got {method!r}"
            )
        with public_errors():
            check_units(node, [int_arg(args, "unit")])
        if args.get("image") is None:
            raise errors.InvalidArgumentError("missing query parameter 'image' (a probe image)")
        (image,) = self._probe_images(run, [int_arg(args, "image")])
        with public_errors():
            captum_attr()  # without Captum: a 400 naming the extra to install
        options = {"image": image, "method": method}
        return self._analysis(ctx, experiment, args, "attribution", options)

    def _atlas_quality(self, args) -> dict:
        """The `preview`, `size` and `iterations` of an atlas's cells (or concepts' pictures) at
        the request's `quality`, full (the default) or preview (full where no preview would be
        cheaper)."""
        quality = args.get("quality", "full")
        if quality not in self._atlas:
            raise errors.InvalidArgumentError(
                f"quality must be one of {', '.join(self._atlas)}, got {quality!r}"
            )
        preview = quality == "preview" and self._atlas["preview"] is not None
        settings = self._atlas["preview" if preview else "full"]
        return {"preview": preview, "size": settings.size, "iterations": settings.iterations}

    def _atlas_work(self, ctx, experiment: str, args) -> tuple[object, Analysis]:
        """The run and the atlas work a request names: `grid` cells a side (20 by default),
        `quality` full or preview, laid out at `layout_step` (default: the last logged step,
        so that every step of the slider shares one layout)."""
        run, step, node = self._unit_args(ctx, experiment, args)
        self._probe_needed(run, "an activation atlas is made of")
        grid = capped_arg(args, "grid", 20, limits.GRID, self._max_grid, "--microscope_max_grid")
        layout_step = run.steps[-1]
        if args.get("layout_step") is not None:
            layout_step = self._step(run, args, "layout_step")
        options = {"step": step, "grid": grid, "layout_step": layout_step}
        options.update(self._atlas_quality(args))
        steps = sorted({step, layout_step})
        return run, self._work(run, "atlas", node.name, 0, options, steps)

    def atlas_impl(self, ctx, experiment: str, args) -> tuple[int, dict]:
        """A node's activation atlas at a step (see `analysis/atlas.py`): (202, status) while a
        worker computes it, then (200, the atlas as `Atlas.to_dict` has it, with `picture`: the
        URL of its PNG, relative to the plugin's routes)."""
        run, work = self._atlas_work(ctx, experiment, args)
        code, body = self._result(run, work)
        if code == 200:
            query = {k: v for k, v in args.items() if k != "format"}
            body = {**body, "picture": "atlas?" + urlencode({**query, "format": "png"})}
        return code, body

    def atlas_picture_impl(self, ctx, experiment: str, args) -> tuple[int, bytes | dict]:
        """The atlas's picture: (200, PNG bytes; empty cells transparent), else (202, status)."""
        run, work = self._atlas_work(ctx, experiment, args)

        def picture(cache):
            return cache.read(cache.picture_path(work.result_key))

        return self._result(run, work, picture)

    def _concepts_work(self, ctx, experiment: str, args) -> tuple[object, Analysis]:
        """The run and the concepts work a request names: `count` concepts (16 by default) by
        `method` (nmf by default), matched to `reference_step` (default: the last logged step,
        so that concept k stays in its place along the slider); their pictures at `quality`
        full or preview (an atlas's cells). With `concept` and `view=examples`: that concept's
        `examples` (8 by default) strongest probe images instead; with `concept`, `image` and
        `view=attribution`: which pixels of probe image `image` drive the concept, by the
        `attribution` method (one of METHODS; the first by default). What is wrong in the
        request is said before anything is queued."""
        run, step, node = self._unit_args(ctx, experiment, args)
        self._probe_needed(run, "concepts are fitted to")
        count = capped_arg(
            args, "count", 16, limits.CONCEPTS, self._max_count, "--microscope_max_count"
        )
        method = args.get("method") or "nmf"
        with public_errors():
            check_concepts_request(node, count, method)
            needs_library(method)  # without the extra: a 400 naming it
        reference_step = run.steps[-1]
        if args.get("reference_step") is not None:
            reference_step = self._step(run, args, "reference_step")
        options = {"step": step, "count": count, "method": method}
        options["reference_step"] = reference_step
        steps = sorted({step, reference_step})
        view = args.get("view", "concepts")
        if view == "examples":
            concept = int_arg(args, "concept", None, 0, count - 1)
            options["examples"] = capped_arg(
                args, "examples", 8, (1, 64), self._max_count, "--microscope_max_count"
            )
            return run, self._work(run, "concept-examples", node.name, concept, options, steps)
        if view == "attribution":
            concept = int_arg(args, "concept", None, 0, count - 1)
            attribution = args.get("attribution") or METHODS[0]
            if attribution not in METHODS:
                raise errors.InvalidArgumentError(
                    f"attribution must be one of {', '.join(METHODS)}, got {attribution!r}"
                )
            if args.get("image") is None:
                raise errors.InvalidArgumentError("missing query parameter 'image' (a probe image)")
            (image,) = self._probe_images(run, [int_arg(args, "image")])
            with public_errors():
                captum_attr()  # without Captum: a 400 naming the extra to install
            options.update(image=image, attribution=attribution)
            kind = "concept-attribution"
            return run, self._work(run, kind, node.name, concept, options, steps)
        if view != "concepts":
            raise errors.InvalidArgumentError(
                f"view must be concepts, examples or attribution, got {view!r}"
            )
        options.update(self._atlas_quality(args))
        return run, self._work(run, "concepts", node.name, 0, options, steps)

    def concepts_impl(self, ctx, experiment: str, args) -> tuple[int, dict]:
        """A node's concepts at a step (see `analysis/concepts.py`): (202, status) while a
        worker computes them, then (200, what `Concepts.to_dict` holds, `size`, and `pictures`:
        concept k's picture's URL, relative to the plugin's routes). With `view=examples` and
        `concept`: (200, that concept's dataset examples, as the examples route has a unit's);
        with `view=attribution`: (200, the attribution, as the attribution route has a unit's)."""
        run, work = self._concepts_work(ctx, experiment, args)
        code, body = self._result(run, work)
        if code == 200 and work.kind == "concepts":
            query = {k: v for k, v in args.items() if k not in ("format", "concept", "view")}
            body = {
                **body,
                "pictures": [
                    "concepts?" + urlencode({**query, "format": "png", "concept": k})
                    for k in range(body["count"])
                ],
            }
        return code, body

    def concepts_picture_impl(self, ctx, experiment: str, args) -> tuple[int, bytes | dict]:
        """Concept `concept`'s picture (PNG; with no `concept`, all of them in a row), else
        (202, status) while they are computed."""
        run, work = self._concepts_work(ctx, experiment, args)
        count = work.option("count")
        concept = None
        if args.get("concept") is not None:
            concept = int_arg(args, "concept", None, 0, count - 1)

        def picture(cache):
            data = cache.read(cache.picture_path(work.result_key))
            if data is None or concept is None:
                return data
            strip = decode_picture(data)
            size = strip.shape[1] // count
            return encode_picture(strip[:, concept * size : (concept + 1) * size])

        return self._result(run, work, picture)

    def probe_impl(self, ctx, experiment: str, args) -> bytes:
        """Probe image `image` of a run as a PNG (more than three channels: `bands` as RGB)."""
        run = self._run(ctx, experiment, args.get("run", ""))
        (index,) = self._probe_images(run, [int_arg(args, "image")])
        images = self.service.probe_images(run)
        with public_errors():
            return encode_picture(as_rgb(images[index], self._bands(run, args)))

    # --- handlers ----------------------------------------------------------------------------
    @staticmethod
    def _context(request):
        return plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)

    def _json(self, request, impl, *args):
        return http_util.Respond(request, impl(*self._context(request), *args), "application/json")

    def _json_or_pending(self, request, impl):
        check_same_site(request)  # each of these routes starts work
        code, body = impl(*self._context(request), request.args)
        return http_util.Respond(request, json.dumps(body), "application/json", code=code)

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
        check_same_site(request)
        code, body = self.image_impl(*self._context(request), request.args)
        if code == 200:
            return http_util.Respond(request, body, "image/png")
        return http_util.Respond(request, json.dumps(body), "application/json", code=code)

    @wrappers.Request.application
    def _serve_render(self, request):
        return self._json(request, self.render_impl, json_body(request))

    @wrappers.Request.application
    def _serve_cancel(self, request):
        return self._json(request, self.cancel_impl, json_body(request))

    @wrappers.Request.application
    def _serve_examples(self, request):
        return self._json_or_pending(request, self.examples_impl)

    @wrappers.Request.application
    def _serve_weights(self, request):
        return self._json_or_pending(request, self.weights_impl)

    @wrappers.Request.application
    def _serve_history(self, request):
        return self._json_or_pending(request, self.history_impl)

    @wrappers.Request.application
    def _serve_attribution(self, request):
        check_same_site(request)
        code, body = self.attribution_impl(*self._context(request), request.args)
        if code == 200 and request.args.get("format") == "png":  # the overlay alone
            return http_util.Respond(request, overlay_png(body), "image/png")
        return http_util.Respond(request, json.dumps(body), "application/json", code=code)

    def _json_or_picture(self, request, impl, picture_impl):
        """A computed view's JSON (`impl`), or with `format=png` its picture (`picture_impl`);
        either is a status (202) while it is computed."""
        check_same_site(request)  # each of these routes starts work
        if request.args.get("format") == "png":
            code, body = picture_impl(*self._context(request), request.args)
            if code == 200:
                return http_util.Respond(request, body, "image/png")
        else:
            code, body = impl(*self._context(request), request.args)
        return http_util.Respond(request, json.dumps(body), "application/json", code=code)

    @wrappers.Request.application
    def _serve_atlas(self, request):
        return self._json_or_picture(request, self.atlas_impl, self.atlas_picture_impl)

    @wrappers.Request.application
    def _serve_concepts(self, request):
        return self._json_or_picture(request, self.concepts_impl, self.concepts_picture_impl)

    @wrappers.Request.application
    def _serve_probe(self, request):
        return http_util.Respond(
            request, self.probe_impl(*self._context(request), request.args), "image/png"
        )

    @wrappers.Request.application
    def _serve_dynamics(self, request):
        return self._json_or_pending(request, self.dynamics_impl)

    @wrappers.Request.application
    def _serve_thumbnails(self, request):
        return self._json(request, self.thumbnails_impl, request.args)

    @wrappers.Request.application
    def _serve_align(self, request):
        return self._json_or_pending(request, self.align_impl)

    @wrappers.Request.application
    def _serve_settings(self, request):
        return http_util.Respond(request, self.settings_impl(), "application/json")

    @wrappers.Request.application
    def _serve_status(self, request):
        return http_util.Respond(request, self.status_impl(), "application/json")


class MicroscopeLoader(base_plugin.TBLoader):
    """Registers the plugin and its `--microscope_*` flags (see `tensorboard --helpfull`)."""

    def define_flags(self, parser):
        define_flags(parser)

    def load(self, context):
        return MicroscopePlugin(context)
