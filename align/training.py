"""What every trainer-based stage shares: its TRL config with align's defaults, the model with
its adapter settings, resume from the last checkpoint, the divergence guard, and the final save.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from align import data, distributed, models, render, rundir
from align.divergence import diverged, nonfinite_value, nonfinite_weight
from align.errors import AlignError, first_line, suggest
from align.recipe import check_keys, coerce

TRAINING_OPTIONS = {"model", "dataset", "eval_dataset", "peft", "quantization"}
LENGTH_FIELDS = ("max_length", "max_prompt_length", "max_completion_length")


def trainer_config(stage, ctx, **stage_defaults):
    """The stage's TRL config: recipe fields win over stage defaults, which win over align's.

    align's defaults make a run work anywhere: checkpoints inside the stage folder, no external
    loggers, and on machines without CUDA fp32 (TRL defaults to bf16, which refuses CPU) and no
    gradient checkpointing (TRL's default; on a CPU it only recomputes every layer, for memory a
    CPU has plenty of). A NaN loss is logged as NaN (transformers would log the mean of the
    finite ones), so it is seen.
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
        "logging_nan_inf_filter": False,
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
    if getattr(args, "disable_dropout", False):
        models.disable_dropout(model)  # also the rates layers copied from the config (OPT, GPT-2)
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


class Guard(TrainerCallback):
    """What align adds to every TRL trainer:

    - a non-finite logged loss or gradient norm, or a non-finite weight before a checkpoint is
      written, stops the stage (`Diverged`), so every checkpoint kept is finite;
    - every checkpoint step is also a logging step, so `log_history` (restored on resume) holds
      the loss of every step before the checkpoint: a resumed stage's train_loss is exact;
    - a resumed trainer's token count goes on from the checkpoint's instead of from 0;
    - a saved checkpoint loses its `training_args.bin` (a pickle of the arguments, which
      resuming does not read) and gets its file list (`rundir.write_file_list`).
    """

    def __init__(self, trainer, stage):
        self.trainer = trainer
        self.stage = stage

    def on_train_begin(self, args, state, control, **kwargs):
        counted = [e["num_tokens"] for e in state.log_history if "num_tokens" in e and e.get("step", 0) <= state.global_step]
        if state.global_step and counted and hasattr(self.trainer, "_total_train_tokens"):
            self.trainer._total_train_tokens = int(counted[-1])  # TRL counts from 0 in every train() call

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._before_save(args, state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._before_save(args, state, control, model)

    def _before_save(self, args, state, control, model):
        if control.should_save:
            control.should_log = True
            bad = _nonfinite_weight(self.trainer, model)
            if bad:
                self._stop(args, state, f"weight {bad} is not finite")

    def on_log(self, args, state, control, logs=None, **kwargs):
        bad = nonfinite_value({k: (logs or {}).get(k) for k in ("loss", "grad_norm", "train_loss")})
        if bad:
            self._stop(args, state, bad)

    def _stop(self, args, state, what: str):
        from transformers.trainer_callback import ProgressCallback

        for callback in self.trainer.callback_handler.callbacks:  # the error gets a line of its own
            if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
                callback.training_bar.close()
                callback.training_bar = None
        raise diverged(state.global_step, what, rundir.complete_checkpoints(self.stage.dir / rundir.CHECKPOINTS))

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            rundir.remove(checkpoint / "training_args.bin", self.stage.dir)
            rundir.write_file_list(checkpoint)


def _nonfinite_weight(trainer, model) -> str | None:
    """A non-finite trainable weight's name, decided by every process together: under FSDP each
    holds only its shard, and all must stop or none."""
    bad = nonfinite_weight((model or trainer.model).named_parameters())
    accelerator = trainer.accelerator
    if accelerator.num_processes > 1:
        flags = accelerator.gather(torch.tensor([bad is not None], dtype=torch.int32, device=accelerator.device))
        if bool(flags.any()) and not bad:
            bad = "held by another process"
    return bad


def train_and_save(trainer, stage, ctx) -> dict:
    """Train (resuming from the last checkpoint when there is one), save into the stage folder,
    and return the metrics: first/last training loss, steps, runtime, eval results."""
    trainer.add_callback(Guard(trainer, stage))
    resume = rundir.last_checkpoint(stage.dir)
    if resume:
        ctx.log(f"[{stage.name}] resuming from {Path(resume).name}")
    state = rundir.read_json(Path(resume) / "trainer_state.json") if resume else {}
    if resume and state.get("global_step", 0) >= (state.get("max_steps") or 0) > 0 and not trainer.is_deepspeed_enabled:
        # Killed between the final checkpoint and the final save: training had finished, and
        # train() would take one step too many. The final checkpoint is the model.
        from transformers import TrainerState

        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        result = None
    else:
        result = trainer.train(resume_from_checkpoint=resume)
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    resumed = int(state.get("global_step", 0))
    metrics = {
        "train_loss": _train_loss(history, resumed, trainer.state.global_step, result),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "global_step": trainer.state.global_step,
        "resumed_from_step": resumed,
        "train_runtime": result.metrics.get("train_runtime") if result else None,
    }
    bad = _nonfinite_weight(trainer, None)
    if bad:
        raise diverged(trainer.state.global_step, f"weight {bad} is not finite",
                       rundir.complete_checkpoints(stage.dir / rundir.CHECKPOINTS))
    if trainer.eval_dataset is not None:
        metrics.update({k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    trainer.save_model(str(stage.dir))
    if ctx.is_main:
        for entry in history:  # transformers' own figure covers this train() call's steps only
            if "train_loss" in entry:
                entry["train_loss"] = metrics["train_loss"]
        rundir.write_log_history(history, stage.dir)
        trainer.processing_class.save_pretrained(str(stage.dir))
        # A pickle of the arguments: not safetensors, and never needed to load the model.
        rundir.remove(stage.dir / "training_args.bin", stage.dir)
    return metrics


def _train_loss(history: list[dict], resumed: int, global_step: int, result) -> float | None:
    """Mean loss per step over the whole stage: the steps before the resume point from the
    restored log history (each logged loss is the mean over the steps since the previous one;
    `Guard` makes the checkpoint step a logged one), the rest from this train() call."""
    total, covered = 0.0, 0
    for entry in history:
        if "loss" in entry and covered < entry.get("step", 0) <= resumed:
            total += entry["loss"] * (entry["step"] - covered)
            covered = entry["step"]
    if result is not None:
        steps = global_step - resumed
        total, covered = total + result.training_loss * steps, covered + steps
    return total / covered if covered else None
