"""`align plan recipe.yaml` and `align run --dry-run`: one row per stage with parameters, memory per
device, FLOPs and time, before anything runs.

Model configs are read without weights (see align.plan_inputs): a local folder's config.json, a
Hub id's config (online only), or, for `init` stages and the outputs of stages that have not run
yet, the config the stage *will* write. Sequence lengths come from a sample of the stage's data
through the model's tokenizer when both exist (padded batches, as TRL pads them), else from
`max_length`. Time: `--flops-per-second` (peak per device, at PLAN_MFU), else a GPU's datasheet
peak at PLAN_MFU, else, on a CPU, measured here: small models by timing their passes
(align.estimate.probe), larger ones by FLOPs over a measured matmul rate.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from align import distributed, plan_inputs
from align.errors import AlignError, first_line
from align.estimate import (
    DTYPE_BYTES, OPTIMIZERS, Settings, chinchilla_tokens, count_parameters, estimate_time,
    fmt_count, format_plan, model_matmul_rate,
)
from align.estimate.compute import gpu_peak_flops
from align.estimate.probe import PROBE_MAX_PARAMS
from align.estimate.table import columns
from align.plan_stages import plan_online, plan_ppo, plan_trainer

#: Model FLOPs utilisation assumed with --flops-per-second or a GPU's datasheet peak.
PLAN_MFU = 0.4


def _on_gpu() -> bool:
    return gpu_peak_flops() is not None


def resident_bytes() -> int | None:
    """This process's resident set now (Linux), or None: the runtime a CPU stage starts from
    (Python, torch, transformers, TRL, peft are imported by the time a recipe is loaded)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclasses.dataclass
class Planner:
    """What every stage's plan shares: the recipe, configs read so far, rows written by earlier
    stages, the engine and process count, and how seconds are counted."""

    recipe: Any
    engine: str
    processes: int
    flops_per_second: float | None  # None: measured on this CPU
    configs: plan_inputs.Configs = None
    known_rows: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.configs = plan_inputs.Configs(self.recipe)

    def arg(self, stage, name, fallback=None):
        """A stage field: the recipe's value, else its config class's default, else ``fallback``."""
        value = stage.args[name] if name in stage.args else next(
            (f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
             for f in dataclasses.fields(stage.module.Config)
             if f.name == name and (f.default is not dataclasses.MISSING
                                    or f.default_factory is not dataclasses.MISSING)), None)
        value = getattr(value, "value", value)  # enums (optim, ...)
        return fallback if value is None else value

    def settings(self, stage, config, notes, **fields) -> Settings:
        """The stage's :class:`Settings`: method and adapters, dtype, optimizer, engine."""
        method, r, targets, dropout = _method(stage, config, notes)
        optimizer = str(self.arg(stage, "optim", "adamw")).lower()
        if optimizer not in OPTIMIZERS:
            notes.append(f"optimizer '{optimizer}' not modelled: counted as AdamW")
            optimizer = "adamw"
        return Settings(method=method if method in ("full", "lora", "qlora") else "full", r=r or 16,
                        target_modules=targets or "all-linear", lora_dropout=dropout, dtype=_dtype(self.recipe, stage),
                        optimizer=optimizer, engine=self.engine, processes=self.processes, **fields)

    def tokenizer_folder(self, path: str, depth: int = 0) -> str | None:
        """Where the tokenizer of the model at ``path`` is, following stages not run yet back to
        the model they start from."""
        from pathlib import Path

        if (Path(path) / "tokenizer_config.json").is_file():
            return path
        stage = self.stage_at(path)
        if stage is None or stage.traits.data == "any" or depth >= 10:  # init writes a new tokenizer
            return None
        return self.tokenizer_folder(self.recipe.start_model(stage), depth + 1)

    def stage_at(self, path: str):
        return next((s for s in self.recipe.stages if plan_inputs.key(s.dir) == plan_inputs.key(path)), None)

    def lengths(self, spec, model_path: str) -> dict | None:
        folder = self.tokenizer_folder(model_path)
        return plan_inputs.token_lengths(spec, folder) if folder else None

    def seconds(self, row, config, s: Settings, flops_total, passes, steps, tokens_per_pass) -> float:
        """Wall-clock seconds: FLOPs at a given or datasheet rate; on a CPU, ``steps`` times the
        probed ``passes`` ((count, probe call) pairs for one step) for a small model, else FLOPs
        over the measured matmul rate at ``tokens_per_pass`` rows."""
        if self.flops_per_second:
            return estimate_time(flops_total, self.flops_per_second, mfu=PLAN_MFU, devices=self.processes)
        if count_parameters(config)["total"] <= PROBE_MAX_PARAMS and steps:
            row["step_seconds"] = sum(count * call() for count, call in passes)
            return row["step_seconds"] * steps
        rate = model_matmul_rate(config, max(int(tokens_per_pass), 1), s.dtype)
        row["notes"].append(f"time at the measured matmul rate {rate:.2e} FLOP/s (FLOPs / rate)")
        return estimate_time(flops_total, rate, mfu=1.0, devices=self.processes)


def plan_recipe(recipe, *, flops_per_second: float | None = None, world_size: int | None = None,
                engine: str | None = None) -> list[dict]:
    """One row per stage: the recipe-level facts (``type``, ``model``, ``method``, ``r``,
    ``target_modules``, ``batch_size``, ``grad_accum``, ``world_size``, ``engine``, ``seq_len``,
    ``gradient_checkpointing``, ``dtype``, ``examples``, ``sequences``, ``steps``, ``tokens``,
    ``chinchilla_tokens``, ``notes``) plus the memory estimate's keys, ``runtime`` (CPU), ``flops``
    and ``seconds`` where they can be computed. The engine and process count come from the
    arguments, else from what ``accelerate launch`` sets (align.distributed.launched). A stage
    whose model config cannot be read gets a note instead of numbers, and planning goes on."""
    env_engine, env_processes = distributed.launched()
    processes = int(world_size or env_processes)
    planner = Planner(recipe, engine or env_engine, processes, flops_per_second or gpu_peak_flops())
    runtime = None if _on_gpu() else resident_bytes()
    rows = []
    for stage in recipe.stages:
        row: dict[str, Any] = {"name": stage.name, "type": stage.type, "world_size": processes,
                               "engine": f"{planner.engine} x{processes}", "notes": []}
        try:
            _plan_stage(planner, stage, row)
        except (AlignError, ValueError, TypeError, OSError, KeyError) as e:
            row["notes"].append(f"not estimated: {first_line(e)}")
            if stage.traits.produces in ("policy", "reward_model"):
                planner.configs.future.setdefault(plan_inputs.key(stage.dir), None)
        if "total" in row and runtime:
            row["runtime"] = runtime
        rows.append(row)
    return rows


def _plan_stage(planner: Planner, stage, row):
    notes = row["notes"]
    traits = stage.traits
    if traits.produces == "data":
        from align.task import FILE_NAMES

        cfg = stage.config()
        counts = {"sft": cfg.n_sft, "prefs": cfg.n_pairs, "prompts": cfg.n_prompts, "eval_prompts": cfg.n_eval,
                  "eval_prefs": cfg.n_eval}
        for split, filename in FILE_NAMES.items():
            planner.known_rows[plan_inputs.key(stage.dir / filename)] = counts[split]
        notes.append("writes the task's data files; no model")
        return
    if traits.produces is None:
        notes.append("evaluation: generation and scoring only")
        return
    if traits.data == "any":  # init: a new model and tokenizer, no gradient steps
        known = (stage.dir / "config.json").is_file()
        config = (planner.configs.get(str(stage.dir))[0] if known else None) or plan_inputs.init_config(stage)
        planner.configs.future[plan_inputs.key(stage.dir)] = config
        n = count_parameters(config)["total"]
        row.update(model="(new) llama", method="init", params=n, chinchilla_tokens=chinchilla_tokens(n))
        notes.append("initialises weights and trains a tokenizer; no gradient steps")
        return

    path = planner.recipe.start_model(stage)
    row["model"] = path
    config, note = planner.configs.get(path)
    planner.configs.future[plan_inputs.key(stage.dir)] = config
    if config is None:
        notes.append(note or f"no config for '{path}'")
        return
    if stage.type == "ppo":  # align's own trainer: four roles, its own fields
        plan_ppo(planner, stage, row, config)
    elif traits.online:  # TRL's critic-free online trainers
        plan_online(planner, stage, row, config)
    elif traits.data in ("lm", "text", "preference"):
        plan_trainer(planner, stage, row, config)
    else:
        notes.append(f"stage type '{stage.type}' is not estimated")


def _method(stage, config, notes: list[str]):
    """(method, r, target_modules, lora_dropout) from the stage's peft/quantization blocks."""
    from align.estimate.params import text_config

    peft = stage.options.get("peft")
    quant = stage.options.get("quantization") or {}
    if not isinstance(peft, dict):
        if quant:
            notes.append("quantization without peft: counted as full fine-tuning in the model dtype")
        return "full", 0, (), 0.0
    kind = str(peft.get("method", "lora")).lower()
    if kind != "lora":
        notes.append(f"peft method '{kind}': counted as full fine-tuning")
        return kind, 0, (), 0.0
    r = int(peft.get("r", 8))
    targets = peft.get("target_modules")
    if not targets:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        targets = DEFAULTS.get(getattr(text_config(config), "model_type", None), "all-linear")
    dropout = float(peft.get("lora_dropout", 0.0) or 0.0)
    if quant.get("load_in_4bit"):
        return "qlora", r, targets, dropout
    if quant.get("load_in_8bit"):
        notes.append("8-bit base weights are not modelled: counted in the model dtype")
    return "lora", r, targets, dropout


def _dtype(recipe, stage) -> str:
    wanted = str((recipe.model or {}).get("dtype") or "auto").lower().removeprefix("torch.")
    if wanted in DTYPE_BYTES:
        return wanted
    if stage.args.get("bf16"):
        return "bf16"
    if stage.args.get("fp16"):
        return "fp16"
    return "bf16" if _on_gpu() else "fp32"


def _detail_table(rows) -> str:
    header = ["", "type", "method", "batch", "seq", "grad ckpt", "dtype", "examples", "steps", "tokens", "chinchilla"]
    body = []
    for row in rows:
        method = row.get("method") or "-"
        if row.get("r"):
            method += f" r={row['r']} {row.get('target_modules')}"
        batch = f"{row['batch_size']}x{row.get('grad_accum', 1)}x{row.get('world_size', 1)}" \
            if row.get("batch_size") else "-"
        gc = row.get("gradient_checkpointing")
        body.append([row["name"], row["type"], method, batch, str(round(row["seq_len"])) if row.get("seq_len") else "-",
                     "-" if gc is None else ("on" if gc else "off"), row.get("dtype") or "-",
                     fmt_count(row.get("examples")), fmt_count(row.get("steps")), fmt_count(row.get("tokens")),
                     fmt_count(row.get("chinchilla_tokens"))])
    return columns(header, body, left=len(header))


def plan_text(recipe, *, flops_per_second: float | None = None, world_size: int | None = None,
              engine: str | None = None, rows=None) -> str:
    """The plan as text: each stage's state in the run folder (finished or to run), the
    :func:`format_plan` table (memory per device, FLOPs, time), what each stage trains on, and
    the notes. ``align plan`` and ``align run --dry-run`` print it."""
    from align import rundir

    if rows is None:
        rows = plan_recipe(recipe, flops_per_second=flops_per_second, world_size=world_size, engine=engine)
    world = rows[0]["world_size"] if rows else int(world_size or 1)
    fps = flops_per_second or gpu_peak_flops()
    rate = f"{fps:.2e} FLOP/s per device at {PLAN_MFU:.0%} MFU" if fps else "rates measured on this CPU"
    lines = [f"recipe '{recipe.name}' is valid; outputs in {recipe.output_dir}"]
    for stage in recipe.stages:
        state = "finished" if rundir.is_complete(stage) else "to run"
        lines.append(f"  - {stage.name:<10} {stage.type:<9} {state:<9} {stage.options.get('model', '')}".rstrip())
    lines += [
        "",
        f"plan for recipe '{recipe.name}': world size {world}, engine {rows[0]['engine'] if rows else '-'}; time at {rate} "
        f"(--flops-per-second to change)",
        "",
        format_plan(rows),
        "",
        "batch = per device x gradient accumulation x processes; seq = tokens per sequence (padded batches of "
        "the stage's data when it and the tokenizer can be read, else max_length; PPO: prompt + response);",
        "tokens = sequences trained on x seq (pairs count both); chinchilla = compute-optimal tokens (20 x params)",
        _detail_table(rows),
    ]
    notes = [(row["name"], n) for row in rows for n in row.get("notes", [])]
    if notes:
        lines += ["", "notes:"] + [f"  {name}: {note}" for name, note in notes]
    return "\n".join(lines)


def plan_command(args):
    from align.recipe import load_recipe

    recipe = load_recipe(args.recipe, getattr(args, "set", None) or [])
    print(plan_text(recipe, flops_per_second=getattr(args, "flops_per_second", None),
                    world_size=getattr(args, "num_processes", None), engine=getattr(args, "engine", None)))
