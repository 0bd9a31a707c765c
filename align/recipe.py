"""Recipes: a YAML file is a run.

    name: quickstart
    seed: 42
    output_dir: runs/quickstart
    model: Qwen/Qwen2.5-0.5B            # or {name_or_path, dtype, trust_remote_code, revision}
    stages:                             # ordered; the key is the stage name
      sft:
        type: sft                       # defaults to the key
        dataset: {path: data/sft.jsonl}
        peft: {r: 16, lora_alpha: 32}
        learning_rate: 2.0e-4           # any field of TRL's SFTConfig, verbatim
      reward:
        model: ${sft}                   # an earlier stage's output folder

A stage block holds the fields of that stage's config class (TRL's SFTConfig, RewardConfig,
DPOConfig, ...; align's own dataclasses for its own stages) plus the align-level options the
stage module declares in `OPTIONS`. Validation reads those classes, so a field renamed by TRL
surfaces as "unknown field, did you mean ...".
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path

import yaml

from align.errors import AlignError, first_line, suggest
from align.secrets import SECRET_KEYS, scrub

TOP_LEVEL = {
    "name": "run name, shown in logs and model cards",
    "seed": "random seed for every stage (a stage's own `seed` wins)",
    "output_dir": "folder holding one sub-folder per stage",
    "model": "base model: Hub id or local path, or {name_or_path, dtype, trust_remote_code, revision}",
    "stages": "ordered mapping of stage name -> stage block",
    "hub": "push chosen stages to the Hub when they finish: {repo_id, stages, private, merged}",
}
MODEL_KEYS = {"name_or_path", "dtype", "trust_remote_code", "revision", "attn_implementation"}
HUB_KEYS = {"repo_id", "stages", "private", "merged"}
REF = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
# A stage name is the name of its folder in output_dir, so never a path; `plots` is the report's.
STAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
RESERVED_NAMES = {"plots"}


# ---------------------------------------------------------------------------------------------
# YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.1 would make it a string: trl #1487) and
    refuses a key given twice in one mapping: plain YAML keeps the last one, so a second `sft:`
    block would silently replace the first, finished stage."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults` is meant to be overridden
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, typing.Hashable) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}' (lines {seen[key]} and {line}); give each key once",
                        key_node.start_mark)
                if isinstance(key, typing.Hashable):
                    seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>"):
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise AlignError(f"{source}{where}: invalid YAML: {problem}") from None


def _parse_value(text: str):
    value = parse_yaml(text, "--set")
    if isinstance(value, int) and not isinstance(value, bool) and re.fullmatch(r"0\d+", text):
        return text  # keep leading zeros (ids, not numbers)
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`[a,b]`, `1e-4`, `true`)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise AlignError(f"--set {item}: expected KEY=VALUE, e.g. stages.sft.learning_rate=1e-4")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if node is raw and part == "model" and isinstance(node.get(part), str):
                node[part] = _model_block(node[part])  # `model: id` is short for {name_or_path: id}
            if not isinstance(node.get(part), dict):
                if part in node:
                    raise AlignError(f"--set {key}: '{part}' is not a mapping")
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _parse_value(text)
    return raw


# ---------------------------------------------------------------------------------------------
# Data model


@dataclasses.dataclass
class Stage:
    name: str
    type: str
    module: types.ModuleType  # align.stages.<type>
    options: dict  # align-level keys (dataset, peft, quantization, model, ...)
    args: dict  # fields of the stage's config class, coerced to their types
    dir: Path
    hash: str = ""
    hashed: tuple = ()  # (options, args) with `${stage}` references unresolved: what the hash covers

    def config(self, **extra):
        """An instance of the stage's config class (TRL's SFTConfig, ...)."""
        return self.module.Config(**{**self.args, **extra})

    @property
    def traits(self):
        """What the stage type is (align.stages.Traits): what it produces, what data it takes."""
        return self.module.TRAITS


@dataclasses.dataclass
class Recipe:
    name: str
    seed: int
    output_dir: Path
    model: dict
    stages: list[Stage]
    hub: dict
    resolved: dict  # the fully resolved recipe, secrets removed

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise AlignError(f"--stage {name}: no such stage; the recipe has {', '.join(s.name for s in self.stages)}")

    def earlier(self, stage: Stage) -> list[Stage]:
        # By name: while a stage is built its copy points at the build folder.
        return self.stages[: [s.name for s in self.stages].index(stage.name)]

    def start_model(self, stage: Stage) -> str:
        """The model a stage starts from: its own `model:`, else the latest earlier stage that
        produces a policy, else the recipe's `model`."""
        if stage.options.get("model"):
            return stage.options["model"]
        for prev in reversed(self.earlier(stage)):
            if prev.traits.produces == "policy":
                return str(prev.dir)
        if self.model.get("name_or_path"):
            return self.model["name_or_path"]
        raise AlignError(f"stages.{stage.name}.model: no model to start from; set the top-level `model:` "
                         f"or `model: ${{stage}}` naming an earlier stage")


# ---------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise AlignError(f"recipe '{path}': cannot read: {e.strerror}") from None
    raw = parse_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise AlignError(f"recipe '{path}': expected a mapping of keys (name, model, stages, ...)")
    raw = apply_overrides(raw, overrides or [])
    return build_recipe(raw, base_dir=path.parent)


def build_recipe(raw: dict, base_dir: Path = Path(".")) -> Recipe:
    from align.stages import stage_module

    check_keys(raw, TOP_LEVEL, where="")
    if not isinstance(raw.get("stages"), dict) or not raw["stages"]:
        raise AlignError("stages: the recipe needs at least one stage, e.g. `stages: {sft: {dataset: ...}}`")
    name = str(raw.get("name") or "run")
    seed = raw.get("seed", 42)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise AlignError(f"seed: expected an integer, got {seed!r}")
    output_dir = Path(str(raw.get("output_dir") or Path("runs") / name))
    model = _model_block(raw.get("model"))

    # Stage outputs are what `${name}` refers to; only earlier stages can be named. Hashes see
    # `${name}` itself, not the folder: moving the run folder must not retrain anything.
    stages: list[Stage] = []
    refs = {"output_dir": str(output_dir)}
    for stage_name, block in raw["stages"].items():
        where = f"stages.{stage_name}"
        check_stage_name(stage_name, where)
        if block is None:
            block = {}
        if not isinstance(block, dict):
            raise AlignError(f"{where}: expected a mapping of fields, got {type(block).__name__}")
        _check_block(block, where)
        placeholders = {name: f"${{{name}}}" for name in refs}
        as_hashed = _interpolate(block, placeholders, where, list(raw["stages"]))
        block = _interpolate(block, refs, where, list(raw["stages"]))
        stage_type = block.pop("type", stage_name)
        module = stage_module(stage_type, where)
        options, args = _split(block, module, where)
        hashed = _split({k: v for k, v in as_hashed.items() if k != "type"}, module, where)
        stage = Stage(stage_name, stage_type, module, options, args, output_dir / stage_name, hashed=hashed)
        if hasattr(module, "validate"):
            module.validate(stage, model)
        stages.append(stage)
        refs[stage_name] = str(stage.dir)

    hub = raw.get("hub") or {}
    check_keys(hub, HUB_KEYS, where="hub")
    for s in hub.get("stages", []):
        if s not in refs:
            raise AlignError(f"hub.stages: unknown stage '{s}'")

    resolved = scrub({**raw, "name": name, "seed": seed, "output_dir": str(output_dir), "model": model,
                      "stages": {s.name: {"type": s.type, **s.options, **s.args} for s in stages}})
    _chain_hashes(stages, model, seed)
    return Recipe(name, seed, output_dir, model, stages, hub, resolved)


def check_stage_name(name, where: str):
    if not isinstance(name, str) or not STAGE_NAME.fullmatch(name) or name in RESERVED_NAMES:
        taken = f"; '{name}' is taken by the run's report" if name in RESERVED_NAMES else ""
        raise AlignError(f"{where}: stage name {name!r} is not a plain name: use letters, digits, '_' and '-', "
                         f"starting with a letter or '_' (it names the stage's folder in output_dir){taken}")


def _split(block: dict, module, where: str) -> tuple[dict, dict]:
    """(align-level options, config-class fields coerced to their types) of a stage block."""
    block = dict(block)
    options = {k: block.pop(k) for k in list(block) if k in module.OPTIONS}
    check_keys(block, _field_names(module.Config), where=where, kind=f"{module.Config.__name__} field")
    return options, {k: coerce(v, _field_types(module.Config).get(k), f"{where}.{k}") for k, v in block.items()}


def _check_block(block: dict, where: str):
    """Fields a stage block must not set: tokens (they would be pickled into every checkpoint's
    training_args.bin) and `output_dir` (a stage writes into <output_dir>/<stage>)."""
    for key in block:
        if key in SECRET_KEYS:
            raise AlignError(f"{where}.{key}: a token never goes in a recipe (it would be written into the run "
                             f"folder); remove it and set HF_TOKEN in the environment or run `hf auth login`")
        if key == "output_dir":
            raise AlignError(f"{where}.output_dir: a stage writes into <output_dir>/<stage name>; remove it and set "
                             f"the top-level output_dir instead")


def _model_block(value) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        return {"name_or_path": value}
    if not isinstance(value, dict):
        raise AlignError("model: expected a Hub id / path or a mapping with name_or_path")
    check_keys(value, MODEL_KEYS, where="model")
    return dict(value)


def _interpolate(value, refs: dict, where: str, all_names: list[str]):
    """Replace `${stage}` with that stage's output folder; only earlier stages may be named."""
    if isinstance(value, dict):
        return {k: _interpolate(v, refs, f"{where}.{k}", all_names) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, refs, where, all_names) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match):
        name = match.group(1)
        if name in refs:
            return refs[name]
        if name in all_names:
            raise AlignError(f"{where}: ${{{name}}} names a later stage; a stage can only use earlier outputs")
        raise AlignError(f"{where}: ${{{name}}} is not a stage{suggest(name, list(refs))}")

    return REF.sub(sub, value)


def _chain_hashes(stages: list[Stage], model: dict, seed: int):
    # Each hash covers the stage's resolved config, the stage module's VERSION (bumped when its
    # output changes for the same config, e.g. the toy task's generator) and the previous hash:
    # changing a stage reruns it and every stage after it.
    previous = _digest({"model": model, "seed": seed})
    for stage in stages:
        options, args = stage.hashed
        previous = stage.hash = _digest({"prev": previous, "type": stage.type, "options": options,
                                         "args": args, "version": getattr(stage.module, "VERSION", None)})


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Validation helpers


def check_keys(block: dict, valid, *, where: str, kind: str = "key"):
    if not isinstance(block, dict):
        raise AlignError(f"{where or 'recipe'}: expected a mapping, got {type(block).__name__}")
    for key in block:
        if key not in valid:
            path = f"{where}.{key}" if where else key
            raise AlignError(f"{path}: unknown {kind}{suggest(str(key), valid)}")


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _field_types(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # some annotations only resolve inside their library
        return {f.name: f.type for f in dataclasses.fields(cls)}


def coerce(value, annotation, where: str):
    """Check `value` against a dataclass field annotation, converting numeric strings.

    Only scalars are checked strictly (the fields users get wrong); containers pass through for
    the config class to validate.
    """
    if annotation is None or value is None:
        return value
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    scalar = [t for t in options if t in (bool, int, float, str) or (isinstance(t, type) and issubclass(t, enum.Enum))]
    if len(scalar) < len(options) or not scalar:
        return value  # a container or exotic type: leave it to the class
    for t in scalar:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
        if isinstance(t, type) and issubclass(t, enum.Enum) and value in {m.value for m in t}:
            return value
    for t in scalar:  # a number written as a string, e.g. "1e-4" from another YAML tool
        if t in (int, float) and isinstance(value, str):
            try:
                return t(value)
            except ValueError:
                pass
    names = " or ".join(t.__name__ for t in scalar)
    raise AlignError(f"{where}: expected {names}, got {value!r}")


def dump_yaml(obj) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)
