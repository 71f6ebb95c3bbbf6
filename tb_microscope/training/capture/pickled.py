"""The pickle fallback: a cloudpickled architecture with weights on `meta`, written by the
training side (read back by `store.architecture.load_pickled`, only when the reader opts in: it
runs code)."""

from __future__ import annotations

import copy
import site
import sys
import sysconfig
from pathlib import Path

import cloudpickle
import torch
from torch import nn


def _installed_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = {paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"]}
    roots.update(site.getsitepackages())
    roots.add(site.getusersitepackages())
    return [Path(r).resolve() for r in roots if r]


def _user_code_modules(model: nn.Module) -> list:
    """Modules defining the model's classes that are not installed packages: pickle by value."""
    roots = _installed_roots()
    found = {}
    for cls in {type(m) for m in model.modules()}:
        module = sys.modules.get(cls.__module__)
        path = getattr(module, "__file__", None)
        if module is None or cls.__module__ == "__main__" or not path:
            continue
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            found[module.__name__] = module
    return list(found.values())


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def pickle_architecture(model: nn.Module) -> bytes:
    """cloudpickle a copy of `model` whose parameters and persistent buffers are on `meta`."""
    persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in model.buffers():
        if id(b) in persistent and id(b) not in memo:
            memo[id(b)] = torch.empty_like(b, device="meta")
    skeleton = copy.deepcopy(model, memo)
    for m in skeleton.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(m, attr, None)
            if hooks is not None:
                hooks.clear()
    by_value = _user_code_modules(model)
    for module in by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(skeleton)
    finally:
        for module in by_value:
            cloudpickle.unregister_pickle_by_value(module)
