"""What every trainer-based stage shares: its TRL config with align's defaults, the model with
its adapter settings, resume from the last checkpoint, and the final save.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

from align import data, distributed, models, render, rundir
from align.errors import AlignError, first_line, suggest
from align.recipe import check_keys, coerce

TRAINING_OPTIONS = {"model", "dataset", "eval_dataset", "peft", "quantization"}
LENGTH_FIELDS = ("max_length", "max_prompt_length", "max_completion_length")


def trainer_config(stage, ctx, **stage_defaults):
    """The stage's TRL config: recipe fields win over stage defaults, which win over align's.

    align's defaults make a run work anywhere: checkpoints inside the stage folder, no external
    loggers, and on machines without CUDA fp32 (TRL defaults to bf16, which refuses CPU) and no
    gradient checkpointing (TRL's default; on a CPU it only recomputes every layer, for memory a
    CPU has plenty of).
    """
    on_gpu = torch.cuda.is_available()
    defaults = {
        "output_dir": str(stage.dir / rundir.CHECKPOINTS),
        "seed": ctx.seed,
        "report_to": "none",
        "save_strategy": "steps",
        "save_total_limit": 2,
        "logging_steps": 5,
        "ddp_find_unused_parameters": False,
        "disable_tqdm": not ctx.is_main,
        **distributed.trainer_device_args(),
        **({} if on_gpu else {"gradient_checkpointing": False}),
        **stage_defaults,
    }
    args = {**defaults, **stage.args}
    try:
        return stage.module.Config(**args)
    except (ValueError, TypeError) as e:
        raise AlignError(f"stages.{stage.name}: {first_line(e)}") from None


def check_training_fields(stage):
    """Checks shared by trainer stages that need no data: run at recipe load time."""
    where = f"stages.{stage.name}"
    lr = stage.args.get("learning_rate")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise AlignError(f"{where}.learning_rate: must be a positive number, got {lr}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs"):
        if key in stage.args and not stage.args[key] > 0:
            raise AlignError(f"{where}.{key}: must be positive, got {stage.args[key]}")
    # transformers reads any max_steps <= 0 as "train num_train_epochs"; only -1 means that.
    steps = stage.args.get("max_steps")
    if steps is not None and steps != -1 and not steps > 0:
        raise AlignError(f"{where}.max_steps: must be positive (or -1 to train num_train_epochs), got {steps}")
    for key in LENGTH_FIELDS:  # TRL truncates to a non-positive length without complaint
        value = stage.args.get(key)
        if value is not None and not value > 0:
            raise AlignError(f"{where}.{key}: must be a positive number of tokens (or null for no limit), got {value}")
    if "dataset" not in stage.options:
        raise AlignError(f"{where}.dataset: required, e.g. `dataset: {{path: data/train.jsonl}}`")
    quant = stage.options.get("quantization")
    if quant:
        check_keys(quant, _bnb_fields(), where=f"{where}.quantization", kind="BitsAndBytesConfig field")
        if not stage.options.get("peft") and (quant.get("load_in_4bit") or quant.get("load_in_8bit")):
            raise AlignError(f"{where}.quantization: a 4-bit/8-bit model cannot be fully fine-tuned; "
                             f"add a `peft:` block (QLoRA) or remove `quantization`")
    if stage.options.get("peft") is not None:
        peft_config(stage.options["peft"], task_type="CAUSAL_LM", where=f"{where}.peft")
    check_sharding(stage)


def check_sharding(stage):
    """Refuse the combinations that fail deep inside a sharded run (axolotl #207 #1240)."""
    if stage.type == "ppo" and distributed.zero_stage() in (0, 1):
        raise AlignError(f"stages.{stage.name}: PPO under DeepSpeed needs ZeRO stage 2 or 3 (its per-network "
                         f"clipping reads ZeRO's gradient partitions); use recipes/accelerate/zero2.yaml or zero3.yaml")
    mode = distributed.sharding()
    if mode is None:
        return
    where = f"stages.{stage.name}"
    quant = stage.options.get("quantization") or {}
    if quant.get("load_in_4bit") and not quant.get("bnb_4bit_quant_storage"):
        raise AlignError(f"{where}.quantization: QLoRA under {mode} shards the 4-bit weights, which needs "
                         f"`bnb_4bit_quant_storage` equal to the compute dtype, e.g. bnb_4bit_quant_storage: bfloat16")
    if stage.type == "ppo" and mode == "fsdp":
        raise AlignError(f"{where}: PPO's hand-driven update is not wired to FSDP; shard it with DeepSpeed ZeRO-3 "
                         f"(recipes/accelerate/zero3.yaml), or use ZeRO-2 / DDP when the weights fit")


def _bnb_fields():
    import inspect

    from transformers import BitsAndBytesConfig

    return set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}


def peft_config(block: dict, *, task_type: str, where: str):
    """A peft config from a `peft:` block: `method` picks the class (lora by default); the other
    keys are that class's fields verbatim."""
    import peft

    if not isinstance(block, dict):
        raise AlignError(f"{where}: expected a mapping of peft fields, e.g. {{r: 16, lora_alpha: 32}}")
    fields = dict(block)
    method = str(fields.pop("method", "lora")).lower()
    classes = {
        "lora": peft.LoraConfig,
        "prompt_tuning": peft.PromptTuningConfig,
        "prefix_tuning": peft.PrefixTuningConfig,
        "p_tuning": peft.PromptEncoderConfig,
        "ia3": peft.IA3Config,
    }
    if method not in classes:
        raise AlignError(f"{where}.method: unknown peft method '{method}'{suggest(method, classes)} "
                         f"(methods: {', '.join(classes)})")
    cls = classes[method]
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    check_keys(fields, names, where=where, kind=f"{cls.__name__} field")
    import typing

    hints = typing.get_type_hints(cls)
    fields = {k: coerce(v, hints.get(k), f"{where}.{k}") for k, v in fields.items()}
    fields.setdefault("task_type", task_type)
    try:
        return cls(**fields)
    except (ValueError, TypeError) as e:
        raise AlignError(f"{where}: {first_line(e)}") from None


def load_datasets(stage, ctx):
    """(train, eval or None) for the stage's data kind; `eval_dataset` wins over `test_size`.
    String prompts and answers become user and assistant turns (align.render, rule 1), so
    TRL renders them with the chat template, as PPO, eval, chat and generate do."""
    where = f"stages.{stage.name}"
    kind = stage.traits.data
    train, evals = data.load(stage.options["dataset"], kind, f"{where}.dataset", ctx.seed)
    if stage.options.get("eval_dataset"):
        evals, _ = data.load(stage.options["eval_dataset"], kind, f"{where}.eval_dataset", ctx.seed)
    converted = render.conversational_dataset(train)
    if converted is not train:
        ctx.log(f"[{stage.name}] text prompts and answers are read as user and assistant turns of the chat template "
                f"(align/render.py)")
    return converted, render.conversational_dataset(evals)


def build_trainer(stage, ctx, trainer_cls, *, kind: str = "causal-lm", defaults=None, prepare=None,
                  **trainer_kwargs):
    """What every TRL-trainer stage builds: `trainer_cls` on the stage's data, starting model
    (`kind` "causal-lm" or "seq-cls"), tokenizer, peft config and TRL config.

    `prepare(train, evals, tokenizer) -> (train, evals)` reshapes the data once the tokenizer is
    known. `defaults` are stage-level config defaults (the recipe's fields still win), or a
    function of the training set that returns them. With held-out data, evaluation runs every epoch."""
    train, evals = load_datasets(stage, ctx)
    model, tokenizer, peft = load_policy(stage, ctx, kind=kind)
    if prepare is not None:
        train, evals = prepare(train, evals, tokenizer)
    config_defaults = {"eval_strategy": "epoch"} if evals is not None else {}
    config_defaults.update((defaults(train) if callable(defaults) else defaults) or {})
    args = trainer_config(stage, ctx, **config_defaults)
    where = f"stages.{stage.name}"
    try:
        trainer = trainer_cls(model=model, args=args, train_dataset=train, eval_dataset=evals,
                              processing_class=tokenizer, peft_config=peft, **trainer_kwargs)
    except Exception as e:  # noqa: BLE001  (raised while TRL prepares the data; the row is found below)
        row = data.first_unrenderable(train, tokenizer)
        if row is not None:
            raise AlignError(f"{where}.dataset: {row}") from None
        if isinstance(e, (ValueError, TypeError, KeyError)):
            raise AlignError(f"{where}: {trainer_cls.__name__} could not prepare the stage: "
                             f"{type(e).__name__}: {first_line(e)}") from None
        raise
    for name, before, after in (("dataset", train, trainer.train_dataset), ("eval_dataset", evals, trainer.eval_dataset)):
        _check_rows_left(f"{where}.{name}", before, after, args, trainer_cls.__name__)
    return trainer


def _check_rows_left(where: str, before, after, args, trainer_name: str):
    """TRL drops rows that do not fit `max_length` (RewardTrainer: longer pairs; DPOTrainer:
    prompts that fill it) without a word; every row dropped would train on nothing."""
    if before is None or after is None or not hasattr(after, "__len__") or len(after) == len(before):
        return
    limit = getattr(args, "max_length", None)
    if len(after) == 0:
        raise AlignError(f"{where}: {trainer_name} dropped all {len(before)} rows as longer than max_length={limit} "
                         f"tokens; raise max_length (or null for no limit) or shorten the data")
    if not getattr(args, "packing", False):  # packing joins rows: fewer rows, none lost
        print(f"warning: {where}: {trainer_name} dropped {len(before) - len(after)} of {len(before)} rows longer than "
              f"max_length={limit} tokens", flush=True)


def run_trainer(stage, ctx, trainer_cls, **build_kwargs) -> dict:
    """Build the stage's trainer, train it (resuming from its last checkpoint), save it, and
    return its metrics."""
    return train_and_save(build_trainer(stage, ctx, trainer_cls, **build_kwargs), stage, ctx)


def load_policy(stage, ctx, kind: str = "causal-lm"):
    """The stage's starting model, k-bit-prepared when quantized, plus its tokenizer."""
    path = ctx.recipe.start_model(stage)
    trust = bool(ctx.model.get("trust_remote_code", False))
    tokenizer = models.load_tokenizer(path, trust_remote_code=trust)
    # A merged adapter copy is written once, then read by all; weights load whole (see distributed).
    with ctx.state.main_process_first(), distributed.whole_weights():
        model = models.load_model(
            path, kind=kind, dtype=ctx.model.get("dtype", "auto"), quantization=stage.options.get("quantization"),
            trust_remote_code=trust, revision=ctx.model.get("revision") if path == ctx.model.get("name_or_path")
            else None, attn_implementation=ctx.model.get("attn_implementation"),
        )
    models.fit_tokenizer(model, tokenizer)  # we may have added a pad / end-of-turn token
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = models.prepare_kbit_training(model, bool(stage.args.get("gradient_checkpointing", False)))
    peft = stage.options.get("peft")
    task = "SEQ_CLS" if kind == "seq-cls" else "CAUSAL_LM"
    return model, tokenizer, (peft_config(peft, task_type=task, where=f"stages.{stage.name}.peft") if peft else None)


def train_and_save(trainer, stage, ctx) -> dict:
    """Train (resuming from the last checkpoint when there is one), save into the stage folder,
    and return the metrics: first/last training loss, steps, runtime, eval results."""
    resume = rundir.last_checkpoint(stage.dir)
    if resume:
        ctx.log(f"[{stage.name}] resuming from {Path(resume).name}")
    result = trainer.train(resume_from_checkpoint=resume)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    metrics = {
        "train_loss": result.training_loss,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "global_step": trainer.state.global_step,
        "resumed_from_step": int(Path(resume).name.split("-")[-1]) if resume else 0,
        "train_runtime": result.metrics.get("train_runtime"),
    }
    if trainer.eval_dataset is not None:
        metrics.update({k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    trainer.save_model(str(stage.dir))
    if ctx.is_main:
        rundir.write_log_history(trainer.state.log_history, stage.dir)
        trainer.processing_class.save_pretrained(str(stage.dir))
        # A pickle of the arguments: not safetensors, and it can carry a hub_token.
        (stage.dir / "training_args.bin").unlink(missing_ok=True)
    return metrics
