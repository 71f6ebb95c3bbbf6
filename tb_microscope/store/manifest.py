"""The manifest of a run (`manifest.json`): the one type that writes, reads and checks it.

The manifest is written once per run by the training side (again when a pending capture ends)
and read by every reader; `Manifest.parse` checks every key before anything is built from it and
names the key that is wrong. The checks are written out here rather than declared through a
validation library: several depend on other keys (the normalization's length on the channel
count, the architecture's file on its kind, version 1's node kinds), and each error says what to
do about the run, which a library's generic message would not.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from dataclasses import asdict, dataclass, field

from ..errors import IncompatibleRunError
from ..nodes import CHANNELS_FIRST, LAYOUTS, VECTOR, Node
from .paths import EXPORTED_ARCHITECTURE, PICKLED_ARCHITECTURE

FORMAT = "tb_microscope.run"
FORMAT_VERSION = 2  # 2: run ids; the architecture without weights, never a pickle
SUMMARY_TAG = "tb_microscope/snapshot"

EXPORT = "export"
PICKLE = "pickle"
NONE = "none"  # neither worked: weights only
PENDING = "pending"  # its Logger is capturing it (the manifest is written again when done)

MAX_MANIFEST_BYTES = 64 << 20
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_SIZE = 1 << 16  # the largest input dimension a manifest may name
MAX_UNITS = 1 << 20  # the most units (or calls) a node may have


def new_run_id() -> str:
    """A random id for a new run: every cache of the reading side is keyed by it, never by path."""
    return uuid.uuid4().hex


_V1_KINDS = {"spatial": CHANNELS_FIRST, "vector": VECTOR}


@dataclass(frozen=True)
class Architecture:
    kind: str  # EXPORT, PICKLE or NONE
    file: str | None  # its file in the run's plugin folder
    note: str | None  # why the capture is less than fully dynamic, or why it fell back


@dataclass(frozen=True)
class ModelInfo:
    cls: str  # the model's class, "module.Qualname" ("class" in the file)
    parameters: int
    weights: dict[str, tuple[str, tuple[int, ...]]]  # state-dict key -> (dtype, shape)
    architecture: Architecture

    def to_json(self) -> dict:
        return {
            "class": self.cls,
            "parameters": self.parameters,
            "weights": {k: [dtype, list(shape)] for k, (dtype, shape) in self.weights.items()},
            "architecture": asdict(self.architecture),
        }


@dataclass(frozen=True)
class InputSpec:
    """What the model is fed: one example's shape, its dtype, the image value range and the
    normalization applied before the model, and each input dimension's allowed sizes."""

    shape: list[int]
    dtype: str
    value_range: list[float]
    example_range: list[float]
    normalize: dict | None  # {"mean": [...], "std": [...]}, one value per channel
    dims: list[dict] = field(default_factory=list)  # {"name", "size", "min", "max"}

    @property
    def channels(self) -> int:
        return self.shape[0]

    def dim(self, name: str) -> dict | None:
        return next((d for d in self.dims if d["name"] == name), None)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ProbeSpec:
    count: int
    shape: list[int]


@dataclass(frozen=True)
class Manifest:
    """The manifest of a run: the one type that writes (`to_json`) and reads (`parse`) it."""

    run_id: str
    created: str
    tb_microscope: str
    torch: str
    model: ModelInfo
    input: InputSpec
    nodes: list[Node]
    edges: list[tuple[str, str]]
    probe: ProbeSpec | None
    schedule: str
    version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": self.version,
            "run_id": self.run_id,
            "created": self.created,
            "tb_microscope": self.tb_microscope,
            "torch": self.torch,
            "model": self.model.to_json(),
            "input": self.input.to_json(),
            "nodes": [n.to_json() for n in self.nodes],
            "edges": [list(e) for e in self.edges],
            "probe": None if self.probe is None else asdict(self.probe),
            "schedule": self.schedule,
        }

    @classmethod
    def parse(cls, raw: bytes, source: str) -> Manifest:
        """Check `raw` (the file's bytes) against the format and build the manifest, or raise
        one `IncompatibleRunError` naming the file and the key that is wrong."""
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise IncompatibleRunError(f"{source} is not valid JSON ({e})") from e
        f = _Fields(data, source)
        if f.get("format", str, optional=True) != FORMAT:
            raise IncompatibleRunError(f"{source} is not a tb_microscope manifest")
        version = f.get("version", int)
        if version > FORMAT_VERSION:
            raise IncompatibleRunError(
                f"{source} was written in format version {version}, newer than this "
                f"tb_microscope reads ({FORMAT_VERSION}); upgrade tb-microscope."
            )
        if version < 1:
            raise f.bad("version", "must be 1 or more")
        if version >= 2:
            run_id = f.get("run_id", str)
            if not RUN_ID.match(run_id):
                raise f.bad("run_id", "must be 32 hexadecimal digits")
        else:  # version 1 had no run id: one from the manifest's bytes, which hold its time
            run_id = hashlib.sha256(raw).hexdigest()[:32]
        model, arch = f.sub("model"), f.sub("model").sub("architecture")
        kind = arch.get("kind", str)
        if kind not in (EXPORT, PICKLE, NONE, PENDING):
            raise arch.bad("kind", f"must be one of export, pickle, none, pending, not {kind!r}")
        file = arch.get("file", str, optional=True)
        if file != {EXPORT: EXPORTED_ARCHITECTURE, PICKLE: PICKLED_ARCHITECTURE}.get(kind):
            raise arch.bad("file", f"must be the file of a {kind!r} architecture, not {file!r}")
        weights = {}
        for key, value in model.get("weights", dict).items():
            if not (
                isinstance(value, list)
                and len(value) == 2
                and isinstance(value[0], str)
                and whole_numbers(value[1])
            ):
                raise model.bad(f"weights.{key}", "must be [dtype, shape]")
            weights[key] = (value[0], tuple(value[1]))
        spec = f.sub("input")
        normalize = spec.get("normalize", dict, optional=True)
        shape = spec.get("shape", list)
        if not whole_numbers(shape, MAX_SIZE) or not shape or not shape[0]:
            raise spec.bad("shape", f"must be a list of whole numbers up to {MAX_SIZE}")
        if normalize is not None:
            for part in ("mean", "std"):
                values = normalize.get(part)
                if not finite_numbers(values) or len(values) != shape[0]:
                    raise spec.bad(f"normalize.{part}", f"must be {shape[0]} numbers")
        dims = spec.get("dims", list)
        for i, d in enumerate(dims):
            if not isinstance(d, dict) or not isinstance(d.get("name"), str):
                raise spec.bad(f"dims.{i}", "must be an object with a name")
            for bound in ("size", "min", "max"):
                if d.get(bound) is not None and not whole_numbers([d[bound]], MAX_SIZE):
                    raise spec.bad(f"dims.{i}.{bound}", f"must be null or 0 to {MAX_SIZE}")
        value_range = spec.get("value_range", list)
        if not finite_numbers(value_range) or len(value_range) != 2:
            raise spec.bad("value_range", "must be [low, high]")
        example_range = spec.get("example_range", list, optional=True) or value_range
        nodes = []
        for i, item in enumerate(f.get("nodes", list)):
            n = f.sub(f"nodes.{i}", item)
            node_shape = n.get("shape", list)
            if not whole_numbers(node_shape):
                raise n.bad("shape", "must be a list of whole numbers")
            units, calls = n.get("units", int), n.get("calls", int)
            if not 1 <= units <= MAX_UNITS or not 1 <= calls <= MAX_UNITS:
                raise n.bad("units", f"and calls must be from 1 to {MAX_UNITS}")
            if version == 1:
                layout = _V1_KINDS.get(n.get("kind", str))
            else:
                layout = n.get("layout", str)
            if layout not in LAYOUTS:
                raise n.bad("layout", f"must be one of {', '.join(LAYOUTS)}")
            prefix = n.get("prefix", int, optional=True) or 0
            path = n.get("output", list, optional=True) or []
            if not all(isinstance(p, (int, str)) and not isinstance(p, bool) for p in path):
                raise n.bad("output", "must be a list of indexes and keys")
            if not 0 <= prefix <= MAX_UNITS:
                raise n.bad("prefix", f"must be from 0 to {MAX_UNITS}")
            nodes.append(
                Node(
                    n.get("name", str),
                    layout,
                    units,
                    tuple(node_shape),
                    n.get("module", str),
                    calls,
                    prefix,
                    tuple(path),
                )
            )
        edges = []
        for i, edge in enumerate(f.get("edges", list)):
            if not (
                isinstance(edge, list) and len(edge) == 2 and all(isinstance(e, str) for e in edge)
            ):
                raise f.bad(f"edges.{i}", "must be [source, target]")
            edges.append((edge[0], edge[1]))
        probe = None
        if f.get("probe", dict, optional=True) is not None:
            p = f.sub("probe")
            probe_shape = p.get("shape", list)
            if not whole_numbers(probe_shape):
                raise p.bad("shape", "must be a list of whole numbers")
            probe = ProbeSpec(p.get("count", int), probe_shape)
        return cls(
            run_id=run_id,
            created=f.get("created", str),
            tb_microscope=f.get("tb_microscope", str),
            torch=f.get("torch", str),
            model=ModelInfo(
                model.get("class", str),
                model.get("parameters", int),
                weights,
                Architecture(kind, file, arch.get("note", str, optional=True)),
            ),
            input=InputSpec(
                [int(s) for s in shape],
                spec.get("dtype", str),
                [float(v) for v in value_range],
                [float(v) for v in example_range],
                normalize,
                dims,
            ),
            nodes=nodes,
            edges=edges,
            probe=probe,
            schedule=f.get("schedule", str, optional=True) or "",
            version=version,
        )


def whole_numbers(values, limit: int | None = None) -> bool:
    """Whether `values` is a list of non-negative ints (booleans are not), each up to `limit`."""
    return isinstance(values, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= (limit or v) for v in values
    )


def finite_numbers(values) -> bool:
    """Whether `values` is a list of finite ints or floats (booleans are not)."""
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


_TYPE_NAMES = {str: "a string", int: "a whole number", list: "a list", dict: "an object"}


class _Fields:
    """Typed access to one JSON object of the manifest, naming the key in every error."""

    def __init__(self, data, source: str, prefix: str = ""):
        self.source, self.prefix = source, prefix
        if not isinstance(data, dict):
            where = f"key '{prefix}'" if prefix else "the file"
            raise IncompatibleRunError(f"{source}: {where} must be an object")
        self.data = data

    def bad(self, key: str, problem: str) -> IncompatibleRunError:
        return IncompatibleRunError(
            f"{self.source}: key '{self.prefix}{key}' {problem}. The run was written by another "
            "program or damaged: log it again, or move it out of the log directory."
        )

    def get(self, key: str, kind: type, optional: bool = False):
        if key not in self.data or (optional and self.data[key] is None):
            if optional:
                return None
            raise self.bad(key, "is missing")
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.bad(key, f"must be {_TYPE_NAMES[kind]}, not {type(value).__name__}")
        return value

    def sub(self, key: str, data=None) -> _Fields:
        if data is None:
            data = self.get(key, dict)
        return _Fields(data, self.source, f"{self.prefix}{key}.")
