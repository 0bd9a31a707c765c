"""User functions named `module:function` (reward functions, gold judges), for recipes and the
command line alike.

`check_spec` validates the form at recipe load without importing anything (importing runs the
module's top-level code, which `--dry-run` and `align plan` must not do); `load_function`
imports it when the stage runs. Modules are found on the Python path and in the current folder,
whether align was started as `align` or as `python -m align` (only the latter puts the current
folder on the path by itself).
"""

from __future__ import annotations

import importlib
import os
import re
import sys

from align.errors import AlignError, first_line

SPEC = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*")


def check_spec(spec, where: str) -> str:
    """`spec` if it has the form `package.module:function`, else a clear error."""
    if not isinstance(spec, str) or not SPEC.fullmatch(spec):
        raise AlignError(f"{where}: {spec!r} is not 'module:function' (e.g. align.task:judge_reward)")
    return spec


def check_specs(value, where: str) -> list[str]:
    """One `module:function` or a list of them (None: none) -> the checked list."""
    if value is None:
        return []
    specs = [value] if isinstance(value, str) else value
    if not isinstance(specs, list):
        raise AlignError(f"{where}: expected 'module:function' or a list of them")
    return [check_spec(spec, where) for spec in specs]


def specs_of(stage) -> list[tuple[str, str]]:
    """(where, spec) of every function a stage names (`reward_funcs`, `judge`)."""
    found = []
    judge = stage.options.get("judge", stage.args.get("judge"))  # an option of RL stages, a field of eval
    for key, value in (("reward_funcs", stage.options.get("reward_funcs")), ("judge", judge)):
        where = f"stages.{stage.name}.{key}"
        found += [(where, spec) for spec in check_specs(value, where)]
    return found


def load_function(spec: str, where: str):
    """`package.module:function` -> the function."""
    module_name, _, name = check_spec(spec, where).partition(":")
    try:
        module = _import(module_name)
    except ImportError as e:
        raise AlignError(f"{where}: cannot import '{module_name}': {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001  (the module's own top-level code failed)
        raise AlignError(f"{where}: importing '{module_name}' failed: {type(e).__name__}: {first_line(e)}") from None
    func = getattr(module, name, None)
    if not callable(func):
        raise AlignError(f"{where}: '{module_name}' has no function '{name}'")
    return func


def _import(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        missing_is_ours = e.name is not None and module_name.split(".")[0] == e.name.split(".")[0]
        if not missing_is_ours or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(module_name)


def load_reward_function(spec: str, where: str):
    """A reward function (TRL's signature `f(prompts, completions, **kw) -> list[float]`) whose
    every return is checked: one number (or None, "no opinion") per completion. A string or a
    short list would otherwise fail deep inside the trainer's tensor code."""
    import functools
    import math

    func = load_function(spec, where)

    @functools.wraps(func)
    def checked(*args, **kwargs):
        values = func(*args, **kwargs)
        count = len(kwargs.get("completions", args[1] if len(args) > 1 else []))
        if not isinstance(values, (list, tuple)) or len(values) != count:
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise AlignError(f"{where}: {spec} returned {got} for {count} completions; return a list with one "
                             f"number per completion")
        for i, value in enumerate(values):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise AlignError(f"{where}: {spec} returned {value!r} for completion {i}; rewards must be finite "
                                 f"numbers (or None)")
        return list(values)

    return checked
