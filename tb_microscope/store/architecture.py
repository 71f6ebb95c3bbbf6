"""The architecture file `model.pt2`: an exported program kept without weights, and read back
from a log directory someone else wrote without running anything from it.

`save_program` writes a zip (format version 2 runs)::

    format.json             {"format": "tb_microscope.program", "version": 1}
    program.json            torch.export's serialized graph (JSON)
    state.json              each weight the program takes: dtype, shape, parameter or buffer
    constants.safetensors   tensors the graph holds itself (non-persistent buffers, constants)

The weights are in the run's snapshots, so they are not stored twice. (It is not the archive
`torch.export.save` writes, which always holds pickles, and `torch.export.load` cannot read it.)

`load_program` reads that file, or the `torch.export.save` archive runs of format version 1
hold. Loading a program can run code in more ways than unpickling: torch's deserializer resolves
any `torch.…` attribute path named as an op, evaluates symbolic shape expressions with sympy's
`sympify` (Python's eval), and keeps guard code that `ExportedProgram.module()` executes. So
unless the reader trusts the log directory (`trusted=True`: `allow_pickle`), the program is
checked before it is deserialized, and anything outside these rules is refused:

- no pickled payload is read (a torch archive's pickled weights, constants or custom objects are
  refused; its pickled sample inputs are never read);
- every op is a torch op of the aten, prims or higher-order namespaces (except those with side
  effects, such as `aten.save` and `aten.from_file`) or Python arithmetic on sizes;
- every symbolic expression is arithmetic on shape symbols with sympy's functions, nothing else;
- graph names are identifiers, module paths dotted identifiers; guard code and the debugging
  metadata (stack traces, source functions) are dropped;
- every stored tensor's size is checked against its bytes before it is read.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import PickleNotAllowedError, first_line

FORMAT = "tb_microscope.program"
FORMAT_VERSION = 1
MAX_ENTRY_BYTES = 1 << 30  # any one entry of the archive, uncompressed
MAX_ENTRIES = 1 << 16

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PATH = re.compile(r"^([A-Za-z0-9_-]+(@\d+)?)(\.[A-Za-z0-9_-]+(@\d+)?)*$")  # layer1.0.conv@1
_TOKEN = re.compile(
    r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|'(?P<string>[^'\\]*)'"
    r"|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\*\*|//|[-+*/%(),<>=!&|~])"
)
_SYMBOL = re.compile(r"^[a-z]{1,4}\d+$")  # s0, u12, zuf3: torch's shape symbols
_NUMBER = re.compile(r"^[-+]?[0-9.]+(?:[eE][-+]?\d+)?$")
# Expressions are stored as sympy's srepr: Add(Symbol('s0', positive=True), Integer(-1)).
_SYMPY_NAMES = {
    *"FloorDiv ModularIndexing Where PythonMod Mod CleanDiv CeilToInt FloorToInt CeilDiv LShift "
    "RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator "
    "TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat Identity "
    "Add Mul Pow Integer Rational Float Symbol Max Min Abs floor ceiling sqrt Eq Ne Lt Le Gt Ge "
    "StrictLessThan StrictGreaterThan LessThan GreaterThan Equality Unequality And Or Not "
    "Piecewise ExprCondPair ITE Tuple True False true false oo zoo nan Infinity "
    "NegativeInfinity NaN One Zero NegativeOne Half BooleanTrue BooleanFalse "
    "positive negative nonnegative nonpositive integer real finite infinite zero nonzero "
    "rational commutative even odd prime precision".split()
}
_SYMPY_PREFIXES = ("OpaqueUnaryFn_", "BitwiseFn_")
_OP_NAMESPACES = {"aten", "prims", "higher_order"}
_SIDE_EFFECTS = {"save", "from_file", "_print"}  # aten ops that touch files or print
_PYTHON_OPS = {
    "_operator": {
        *"getitem add sub mul floordiv truediv mod neg pos pow abs eq ne lt le gt ge and_ or_ "
        "not_ invert".split()
    },
    "math": {"ceil", "floor", "sqrt", "trunc"},
    "torch": {
        *"sym_int sym_float sym_max sym_min sym_not sym_ite sym_sqrt sym_sum _sym_sqrt".split()
    },
}
_KEPT_METADATA = {"nn_module_stack"}


class UnsafeProgramError(PickleNotAllowedError):
    """An architecture file holds something that could run code, and the reader did not opt in."""


def refusal(path: Path, what: str) -> UnsafeProgramError:
    return UnsafeProgramError(
        f"the architecture file {path} is refused: {what}. Loading it could run code from the log "
        "directory. Pass allow_pickle=True (tensorboard --microscope_allow_pickle, "
        "tb-microscope --allow-pickle) only for log directories you trust."
    )


# --- writing -------------------------------------------------------------------------------------


def program_archive(program: torch.export.ExportedProgram) -> bytes:
    """`program` as the bytes of its archive, without its weights (see the module's doc)."""
    buffer = io.BytesIO()
    save_program(program, buffer)
    return buffer.getvalue()


def save_program(program: torch.export.ExportedProgram, path: Path | BinaryIO) -> None:
    """Write `program` to `path` (or a binary file) without its weights (see the module's doc)."""
    from safetensors.torch import save as save_tensors
    from torch._export.serde.serialize import serialize

    artifact = serialize(
        program,
        serialize_state_dict=False,
        serialize_constants=False,
        serialize_example_inputs=False,
    )
    constants = {}
    for name, value in program.constants.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"the program holds a {type(value).__name__} constant ({name}), which the "
                "architecture file cannot store without a pickle"
            )
        constants[name] = value.detach().cpu().contiguous()
    state = {
        name: {
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(tensor.shape),
            "parameter": isinstance(tensor, torch.nn.Parameter),
            "requires_grad": bool(tensor.requires_grad),
        }
        for name, tensor in program.state_dict.items()
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("format.json", json.dumps({"format": FORMAT, "version": FORMAT_VERSION}))
        archive.writestr("program.json", artifact.exported_program)
        archive.writestr("state.json", json.dumps(state))
        archive.writestr("constants.safetensors", save_tensors(constants) if constants else b"")


# --- reading -------------------------------------------------------------------------------------


class _Archive:
    """A zip archive read entry by entry, each entry size-checked before it is read."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path} is not a readable archive ({e})") from e
        infos = self.zip.infolist()
        if len(infos) > MAX_ENTRIES:
            raise ValueError(f"{path} has {len(infos)} entries, more than {MAX_ENTRIES}")
        self.entries = {info.filename: info for info in infos}

    def read(self, name: str) -> bytes:
        info = self.entries.get(name)
        if info is None:
            raise ValueError(f"{self.path} has no entry {name!r}")
        if info.file_size > MAX_ENTRY_BYTES:
            raise ValueError(f"{self.path}: entry {name!r} is {info.file_size:,} bytes")
        try:
            return self.zip.read(info)
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{self.path}: entry {name!r} is unreadable ({e})") from e

    def json(self, name: str):
        try:
            return json.loads(self.read(name))
        except ValueError as e:
            raise ValueError(f"{self.path}: entry {name!r} is not JSON ({e})") from e

    def close(self) -> None:
        self.zip.close()


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def _meta(dtype: torch.dtype, shape, parameter: bool, requires_grad: bool) -> torch.Tensor:
    tensor = torch.empty(tuple(int(s) for s in shape), dtype=dtype, device="meta")
    return torch.nn.Parameter(tensor, requires_grad=requires_grad) if parameter else tensor


def _raw_tensor(data: bytes, dtype: torch.dtype, sizes, strides, offset: int) -> torch.Tensor:
    """A tensor viewed from raw storage bytes, after checking that the view stays inside them."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) % itemsize:
        raise ValueError("a stored tensor's bytes are not a whole number of elements")
    numel = len(data) // itemsize
    if any(s < 0 for s in sizes) or any(s < 0 for s in strides) or offset < 0:
        raise ValueError("a stored tensor has a negative size, stride or offset")
    if len(sizes) != len(strides):
        raise ValueError("a stored tensor's sizes and strides differ in length")
    last = offset + sum((n - 1) * s for n, s in zip(sizes, strides)) if math.prod(sizes) else 0
    if math.prod(sizes) and last >= numel:
        raise ValueError("a stored tensor reaches past its bytes")
    storage = (
        torch.frombuffer(bytearray(data), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
    )
    return torch.as_strided(storage, tuple(sizes), tuple(strides), offset).clone()


def _read_ours(archive: _Archive) -> tuple[dict, dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    state = {}
    for name, spec in archive.json("state.json").items():
        state[name] = _meta(
            _dtype(spec["dtype"]),
            spec["shape"],
            bool(spec["parameter"]),
            bool(spec["requires_grad"]),
        )
    raw = archive.read("constants.safetensors")
    try:
        constants = load_tensors(raw) if raw else {}
    except SafetensorError as e:
        raise ValueError(f"{archive.path}: its constants are unreadable ({e})") from e
    return archive.json("program.json"), state, constants


def _read_torch_archive(archive: _Archive) -> tuple[dict, dict, dict]:
    """The program, weight shapes and constants of a `torch.export.save` archive; refuses any
    payload it would have to unpickle (its sample inputs, always a pickle, are not read)."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import (
        _dict_to_dataclass,
        deserialize_scalar_type,
        deserialize_size,
        deserialize_storage_offset,
        deserialize_stride,
    )

    models = [n for n in archive.entries if re.match(r"^[^/]+/models/[^/]+\.json$", n)]
    if len(models) != 1:
        raise ValueError(f"{archive.path} holds {len(models)} programs; one was expected")
    root, model = re.match(r"^([^/]+)/models/([^/]+)\.json$", models[0]).groups()
    for legacy in (f"{root}/data/weights/{model}.pt", f"{root}/data/constants/{model}.pt"):
        if legacy in archive.entries:
            raise refusal(archive.path, f"it stores tensors as a pickle ({legacy})")

    def config(kind: str) -> dict:
        data = archive.json(f"{root}/data/{kind}/{model}_{kind}_config.json")
        return _dict_to_dataclass(schema.PayloadConfig, data).config

    state = {}
    for name, meta in config("weights").items():
        if meta.use_pickle:
            raise refusal(archive.path, f"its weight {name!r} is a pickled payload (use_pickle)")
        t = meta.tensor_meta
        state[name] = _meta(
            deserialize_scalar_type(t.dtype),
            deserialize_size(t.sizes),
            bool(meta.is_param),
            bool(t.requires_grad),
        )
    constants = {}
    for name, meta in config("constants").items():
        if meta.use_pickle or not meta.path_name.startswith("tensor_") or meta.tensor_meta is None:
            raise refusal(
                archive.path, f"its constant {name!r} is a pickled object ({meta.path_name})"
            )
        t = meta.tensor_meta
        constants[name] = _raw_tensor(
            archive.read(f"{root}/data/constants/{meta.path_name}"),
            deserialize_scalar_type(t.dtype),
            deserialize_size(t.sizes),
            deserialize_stride(t.strides),
            deserialize_storage_offset(t.storage_offset),
        )
    return archive.json(models[0]), state, constants


def check_expression(text: str) -> None:
    """Refuse a symbolic expression that is not arithmetic on shape symbols (sympify evals it)."""
    if not isinstance(text, str) or len(text) > 10_000:
        raise ValueError("a symbolic expression is not a short string")
    position = 0
    for match in _TOKEN.finditer(text):
        if match.start() != position:
            break
        name, string = match.group("name"), match.group("string")
        if name is not None and not (
            name in _SYMPY_NAMES or name.startswith(_SYMPY_PREFIXES) or _SYMBOL.match(name)
        ):
            raise ValueError(f"a symbolic expression names {name!r}: {text[:80]!r}")
        if string is not None and not (_SYMBOL.match(string) or _NUMBER.match(string)):
            raise ValueError(f"a symbolic expression holds the text {string!r}")
        position = match.end()
    if text[position:].strip():
        raise ValueError(f"a symbolic expression is not arithmetic: {text[:80]!r}")


def check_target(target: str) -> None:
    """Refuse an op that is not a side-effect-free torch op or Python arithmetic on sizes."""
    parts = target.split(".") if isinstance(target, str) else []
    if (
        len(parts) in (4, 5)
        and parts[:2] == ["torch", "ops"]
        and parts[2] in _OP_NAMESPACES
        and all(_IDENTIFIER.match(p) for p in parts[3:])
        and parts[3] not in _SIDE_EFFECTS
    ):
        return
    if len(parts) == 2 and parts[1] in _PYTHON_OPS.get(parts[0], ()):
        return
    raise ValueError(f"the graph calls {str(target)[:80]!r}, which is not a torch op it may call")


def _check_module_stack(text: str) -> None:
    """nn_module_stack metadata: `key,path,type;…` with dotted-identifier paths."""
    for entry in text.split(";"):
        parts = entry.split(",")
        if len(parts) < 3 or (parts[1] and not _PATH.match(parts[1])):
            raise ValueError(f"a module path is not a dotted name: {entry[:80]!r}")


_PLAIN_TYPES = {"builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"}


def _plain_spec(spec: dict) -> dict:
    """A pytree spec whose containers are all tuples, lists and dicts with plain keys."""
    if not isinstance(spec, dict):
        raise ValueError("a pytree spec is malformed")
    kind, context = spec.get("type"), spec.get("context")
    children = [_plain_spec(child) for child in spec.get("children_spec") or []]
    if kind is None:
        return {"type": None, "context": None, "children_spec": children}
    if kind in ("builtins.dict", "collections.OrderedDict"):
        try:
            keys = json.loads(context)
        except (TypeError, ValueError):
            keys = None
        if isinstance(keys, list) and all(isinstance(k, (str, int)) for k in keys):
            return {"type": "builtins.dict", "context": json.dumps(keys), "children_spec": children}
    elif kind in _PLAIN_TYPES:
        return {"type": kind, "context": "null", "children_spec": children}
    return {"type": "builtins.tuple", "context": "null", "children_spec": children}


def plain_specs(program: dict) -> None:
    """Make the program's input and output specs plain containers, in place.

    A model's output types (a Hugging Face `ModelOutput`, a namedtuple of the user's) would
    need their library imported to be read back, and torch resolves the names of enums in a
    spec by importing modules. The reading side only taps nodes inside the model, so the
    outputs' structure may be a plain tuple.
    """

    def visit(value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("in_spec", "out_spec") and isinstance(item, str):
                    try:
                        protocol, spec = json.loads(item)
                    except (TypeError, ValueError):
                        raise ValueError("a pytree spec is not JSON") from None
                    value[key] = json.dumps([protocol, _plain_spec(spec)])
                else:
                    visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)

    visit(program.get("graph_module"))


def sanitize(program: dict) -> dict:
    """Check a serialized program (JSON) against the rules in the module's doc, in place, and
    drop what it need not keep (guard code, debugging metadata). Raises ValueError."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise ValueError("it holds no serialized graph")
    program["guards_code"] = []
    for expression in program.get("range_constraints") or {}:
        check_expression(expression)

    def visit(value, key=None) -> None:
        if isinstance(value, dict):
            if "target" in value and "inputs" in value and "outputs" in value:  # a graph node
                check_target(value["target"])
                metadata = value.get("metadata") or {}
                value["metadata"] = {k: v for k, v in metadata.items() if k in _KEPT_METADATA}
                if "nn_module_stack" in value["metadata"]:
                    _check_module_stack(value["metadata"]["nn_module_stack"])
            for k, v in value.items():
                if k == "expr_str":
                    check_expression(v)
                elif k in ("name", "parameter_name", "buffer_name", "fqn") and isinstance(v, str):
                    if v and not (_IDENTIFIER.match(v) or _PATH.match(v)):
                        raise ValueError(f"a name in the graph is not a dotted name: {v[:80]!r}")
                else:
                    visit(v, k)
        elif isinstance(value, list):
            for v in value:
                visit(v, key)

    visit(program["graph_module"])
    return program


def _read(path: Path, trusted: bool) -> tuple[dict, dict, dict] | None:
    """The program's JSON (checked unless `trusted`), its weights as meta tensors and its
    constants; None for a torch archive that a trusting reader loads with torch itself."""
    archive = _Archive(path)
    try:
        if "format.json" in archive.entries:
            header = archive.json("format.json")
            if header.get("format") != FORMAT or header.get("version", 0) > FORMAT_VERSION:
                raise ValueError(f"{path} is a program archive this tb_microscope cannot read")
            program, state, constants = _read_ours(archive)
        elif trusted:
            return None
        else:
            program, state, constants = _read_torch_archive(archive)
    finally:
        archive.close()
    try:
        plain_specs(program)
        if not trusted:
            sanitize(program)
    except ValueError as e:
        raise refusal(path, str(e)) from e
    return program, state, constants


def check_program(path: Path, *, trusted: bool = False) -> None:
    """Raise what `load_program` would refuse `path` for, without building the program."""
    _read(path, trusted)


# torch.export's deserializer keeps the program it is reading in a module global, so two threads
# reading programs at once (render workers on two devices) break each other: one at a time.
EXPORT_LOCK = threading.RLock()


@contextmanager
def _parsed_once() -> Iterator[None]:
    """While held (with EXPORT_LOCK), torch's deserializer parses each symbolic expression of a
    program once. It parses every size and stride of every node again (and every sub-expression
    of each, recursively) with sympy, though a program has few distinct ones: a GoogLeNet took
    19 s to load on a 2-core CPU for 26,564 parses of 130 distinct expressions, 2 s with each
    parsed once. A repeat gets the first parse's result, which is also what torch's own symbol
    table hands back for it; only the hint (a size's example value) a later parse may carry is
    still recorded, as the parse would have. Left as torch's where its deserializer differs."""
    from torch._export.serde.serialize import GraphModuleDeserializer
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    parse = GraphModuleDeserializer.__dict__.get("_parse_sym_expr")
    if parse is None or not hasattr(ShapeEnv, "add_backed_var_to_val"):
        yield
        return

    def parse_once(self, expr_str, hint=None):
        table = self.symbol_name_to_symbol
        owner, parsed = self.__dict__.get("_tb_microscope_parsed", (None, None))
        if owner is not table:  # a new program: its own symbols
            parsed = {}
            self.__dict__["_tb_microscope_parsed"] = (table, parsed)
        try:
            sym = parsed.get(expr_str)
        except TypeError:  # not hashable: parse it as torch would
            return parse(self, expr_str, hint)
        if sym is None:
            sym = parsed[expr_str] = parse(self, expr_str, hint)
        elif hint is not None and sym not in self.shape_env.backed_var_to_val:
            self.shape_env.add_backed_var_to_val(sym, hint)
        return sym

    GraphModuleDeserializer._parse_sym_expr = parse_once
    try:
        yield
    finally:
        GraphModuleDeserializer._parse_sym_expr = parse


def load_program(path: Path, *, trusted: bool = False) -> torch.export.ExportedProgram:
    """The exported program in `path`, its weights and buffers on the `meta` device (the caller
    puts a snapshot's tensors in their place). Untrusted, it is checked as the module's doc says
    and refused with `UnsafeProgramError`; anything else wrong raises ValueError."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    parts = _read(path, trusted)
    if parts is None:
        with EXPORT_LOCK, _parsed_once():
            return torch.export.load(str(path))
    program, state, constants = parts
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, program)
        with EXPORT_LOCK, _parsed_once():
            return ExportedProgramDeserializer().deserialize(serialized, state, constants, None)
    except Exception as e:  # the deserializer raises many types on malformed input
        raise ValueError(f"{path}: the program cannot be read ({type(e).__name__}: {e})") from e


def program_bytes(program: torch.export.ExportedProgram) -> int:
    """A rough size of a loaded program in memory, for the model cache's byte bound: its
    constants and about 2 KB per graph node."""
    constants = sum(
        t.numel() * t.element_size()
        for t in program.constants.values()
        if isinstance(t, torch.Tensor)
    )
    return constants + 2048 * len(program.graph.nodes)


def move_program(program: torch.export.ExportedProgram, device: torch.device):
    """The program with its constants and the devices its graph names moved from the CPU to
    `device` (its `meta` weights stay where they are)."""
    if device.type == "cpu":
        return program
    return torch.export.passes.move_to_device_pass(program, {"cpu": str(device)})


# --- the pickle fallback (model.pkl) ---------------------------------------------------------


def pickle_refusal(run_dir: Path) -> PickleNotAllowedError:
    return PickleNotAllowedError(
        f"run '{run_dir}' stores its architecture as a pickle, because torch.export could not "
        "capture the model. Unpickling runs code from the log directory, so it is refused by "
        "default: pass allow_pickle=True (tensorboard --microscope_allow_pickle, tb-microscope "
        "--allow-pickle) only for log directories you trust."
    )


def load_pickled(data: bytes, run_dir: Path, allow_pickle: bool) -> torch.nn.Module:
    if not allow_pickle:
        raise pickle_refusal(run_dir)
    try:
        return pickle.loads(data)
    except Exception as e:
        raise PickleNotAllowedError(
            f"the pickled architecture of run '{run_dir}' cannot be loaded here "
            f"({first_line(e)}); the classes it needs may be missing from this environment."
        ) from e
