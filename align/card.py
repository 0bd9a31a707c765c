"""The model card (``README.md``) of a stage pushed to the Hub.

Built the way TRL builds its cards: the metadata is a ``huggingface_hub.ModelCardData`` (base
model, datasets, tags, library, pipeline, license, model-index) and the prose comes from
``align/templates/model_card.md`` through ``ModelCard.from_template``. The card says what the
model is (adapter, merged or full; causal LM or reward classifier), its stages and their key
hyperparameters, its metrics, how to load it with transformers (+ peft) and the resolved recipe.

:func:`build_model_card` renders it from explicit inputs; :func:`stage_summaries`,
:func:`card_metrics`, :func:`eval_results` and :func:`base_model_of` gather those inputs from a
run folder. Hub tokens never reach the card (``align.secrets.redact_secrets``).
"""

from __future__ import annotations

import json
import math
import os
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from align.errors import AlignError
from align.markdown import cell
from align.rundir import read_json
from align.secrets import redact_secrets

__all__ = ["base_model_of", "build_model_card", "card_metrics", "eval_results", "model_layout", "stage_summaries"]

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[A-Za-z0-9][\w.\-]{0,95})?$")
_DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".yaml", ".yml")
_SUMMARY_CORE_KEYS = ("name", "type", "dataset")

# Hyperparameters worth a column in the card's stage table, in this order.
_CARD_HPARAMS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "lr_scheduler_type", "warmup_steps", "warmup_ratio", "max_length", "beta", "loss_type", "kl_coef", "cliprange",
    "num_ppo_epochs", "num_generations", "rloo_k", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads",
)
_CARD_PEFT = ("method", "r", "lora_alpha", "lora_dropout", "target_modules")
# metrics.json bookkeeping that says nothing about the model.
_CARD_SKIP_METRICS = frozenset({"world_size", "resumed_from_step"})
# Which input of an eval stage a metric was measured on (the rest come from its prompts).
_EVAL_SOURCE = {"perplexity": "texts"}


# --------------------------------------------------------------------------- small helpers


def _read_json(path: Path) -> dict:
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def _looks_like_hub_id(value: Any) -> bool:
    """True for ``owner/name`` or ``name`` ids; False for local paths and data files."""
    if not isinstance(value, str) or not _HUB_ID_RE.match(value):
        return False
    if ".." in value or value.lower().endswith(_DATA_FILE_SUFFIXES):
        return False
    return not os.path.exists(value)


def _dataset_names(dataset: Any) -> list[str]:
    """Dataset identifiers from a ``dataset`` value (a string, a mapping or a list). In a recipe's
    mapping ``path`` is the dataset and ``name`` its Hub config, so ``path`` is read first."""
    if dataset is None:
        return []
    if isinstance(dataset, str):
        return [dataset]
    if isinstance(dataset, dict):
        for key in ("path", "repo_id", "id", "dataset", "name"):
            if isinstance(dataset.get(key), str):
                return [dataset[key]]
        return []
    if isinstance(dataset, (list, tuple)):
        return [name for item in dataset for name in _dataset_names(item)]
    return [str(dataset)]


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt_value(v) for v in value) + "]"
    return str(value)


def _cell(text: Any) -> str:
    return cell(text).strip() or "–"


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in ``text``."""
    fence = "```"
    while fence in text:
        fence += "`"
    return fence


def _numbers(mapping: dict) -> dict:
    return {k: v for k, v in mapping.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _CARD_SKIP_METRICS}


def _framework_versions() -> list[tuple[str, str]]:
    found = []
    for dist in ("align-rlhf", "transformers", "peft", "trl", "torch", "huggingface_hub"):
        try:
            found.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            continue
    return found


def model_layout(stage_dir: Path) -> dict:
    """What a stage folder holds: adapter or full model, causal LM or sequence classifier."""
    stage_dir = Path(stage_dir)
    adapter_cfg_path = stage_dir / "adapter_config.json"
    config_path = stage_dir / "config.json"
    has_adapter = adapter_cfg_path.is_file()
    has_full = config_path.is_file() and any(
        p.name.endswith(".safetensors") and not p.name.startswith("adapter_") for p in stage_dir.iterdir()
    )
    adapter_cfg = _read_json(adapter_cfg_path) if has_adapter else {}
    config = _read_json(config_path)
    seq_cls = adapter_cfg.get("task_type") == "SEQ_CLS" or any(
        str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []
    )
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    tok_cfg = _read_json(stage_dir / "tokenizer_config.json")
    return {
        "adapter": has_adapter and not has_full,
        "has_adapter_files": has_adapter,
        "has_full_files": has_full,
        "adapter_config": adapter_cfg,
        "config": config,
        "seq_cls": seq_cls,
        "has_tokenizer": any((stage_dir / name).is_file() for name in tokenizer_files),
        "has_chat_template": bool(tok_cfg.get("chat_template")) or (stage_dir / "chat_template.jinja").is_file(),
    }


# --------------------------------------------------------------------------- the card


def build_model_card(
    stage_dir: str | os.PathLike,
    *,
    repo_id: str,
    base_model: str | None,
    stage_summaries: list[dict],
    metrics: dict | None,
    recipe_text: str | None,
    merged: bool,
    eval_results: list[EvalResult] | None = None,
    license: str | None = None,  # noqa: A002 - the model card field's name
) -> ModelCard:
    """The model card for a stage output folder (``str(card)`` is the ``README.md`` text).

    ``stage_summaries`` lists the run's stages in order, each a dict with ``name``, ``type``,
    ``dataset`` (a string, a mapping with ``path``, or a list) and either a ``hyperparameters``
    dict or the key hyperparameters as extra keys. ``metrics`` is a flat mapping of numbers
    (``None``: read ``metrics.json`` from the folder). ``merged`` says a LoRA adapter was merged
    into the base weights, so the folder is a full model. ``eval_results`` become the card's
    model-index. Token-shaped strings anywhere in the card are redacted.
    """
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        raise AlignError(f"cannot build a model card: {stage_dir} is not a directory")
    layout = model_layout(stage_dir)
    if not (layout["has_adapter_files"] or layout["has_full_files"]):
        raise AlignError(
            f"cannot build a model card: {stage_dir} holds neither a PEFT adapter (adapter_config.json) "
            "nor a full model (config.json + *.safetensors)"
        )
    if merged and not layout["has_full_files"]:
        raise AlignError(
            f"cannot build a model card: merged=True but {stage_dir} only holds adapter files; "
            "merge the adapter into the base model before pushing"
        )
    adapter = layout["adapter"]
    summaries = [dict(s) for s in (stage_summaries or [])]
    this_stage = next((s for s in summaries if s.get("name") == stage_dir.name), summaries[-1] if summaries else {})
    classifier = layout["seq_cls"] or this_stage.get("type") == "reward"
    if metrics is None:
        metrics = _read_json(stage_dir / "metrics.json")
    if base_model is None and adapter:
        base_model = layout["adapter_config"].get("base_model_name_or_path") or None
    on_hub = bool(base_model) and _looks_like_hub_id(base_model)
    peft_type = str(layout["adapter_config"].get("peft_type", "")).upper()

    stage_types = [t for t in dict.fromkeys(s.get("type") for s in summaries) if isinstance(t, str) and t]
    tags = ["align", "trl", *stage_types]
    if adapter and peft_type == "LORA":
        tags.append("lora")
    if classifier:
        tags.append("reward-model")
    datasets = [ds for s in summaries for ds in _dataset_names(s.get("dataset")) if _looks_like_hub_id(ds)]

    card_data = ModelCardData(
        base_model=base_model if on_hub else None,
        datasets=list(dict.fromkeys(datasets)) or None,
        eval_results=list(eval_results or []) or None,
        library_name="peft" if adapter else "transformers",
        license=license,
        model_name=repo_id.split("/")[-1],
        pipeline_tag="text-classification" if classifier else "text-generation",
        tags=tags,  # ModelCardData drops repeats, keeping the first
    )
    card = ModelCard.from_template(card_data, template_path=str(TEMPLATE), **_template_values(
        layout, repo_id=repo_id, base_model=base_model, on_hub=on_hub, merged=merged, classifier=classifier,
        peft_type=peft_type, summaries=summaries, metrics=metrics, recipe_text=recipe_text))
    # One pass over the finished text: a token in any value (run name, path, recipe) cannot slip through.
    return ModelCard(redact_secrets(str(card)))


def _template_values(layout: dict, *, repo_id: str, base_model: str | None, on_hub: bool, merged: bool,
                     classifier: bool, peft_type: str, summaries: list[dict], metrics: dict,
                     recipe_text: str | None) -> dict:
    """The template's variables; table cells come escaped, code literals quoted."""
    if base_model:
        base_ref = f"[`{base_model}`](https://huggingface.co/{base_model})" if on_hub else f"`{base_model}`"
    else:
        base_ref = "its base model"
    adapter_cfg = layout["adapter_config"]
    stage_rows = []
    for s in summaries:
        params = s.get("hyperparameters")
        if not isinstance(params, dict):
            params = {k: v for k, v in s.items() if k not in _SUMMARY_CORE_KEYS}
        stage_rows.append({
            "name": _cell(s.get("name", "?")), "type": _cell(s.get("type", "?")),
            "datasets": _cell(", ".join(_dataset_names(s.get("dataset")))),
            "hyperparameters": _cell(", ".join(f"{k}={_fmt_value(v)}" for k, v in params.items())),
        })
    recipe_text = (recipe_text or "").rstrip()
    return {
        "adapter": layout["adapter"],
        "adapter_kind": "LoRA adapter" if peft_type == "LORA" else f"{peft_type or 'PEFT'} adapter",
        "adapter_settings": ", ".join(f"{k}={_fmt_value(adapter_cfg[k])}" for k in
                                      ("r", "lora_alpha", "lora_dropout", "target_modules") if k in adapter_cfg),
        "merged": merged,
        "kind": ("reward model (a sequence classifier that outputs one scalar score per text)" if classifier
                 else "causal language model"),
        "base_ref": base_ref,
        "pipeline": " → ".join(f"{s.get('name', '?')} ({s.get('type', '?')})" for s in summaries) or "unknown",
        "stage_rows": stage_rows,
        "metric_rows": [(_cell(k), _cell(_fmt_value(v))) for k, v in metrics.items()],
        "classifier": classifier,
        "model_class": "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM",
        "base_model_literal": json.dumps(base_model or "<base-model-id>"),
        "repo_literal": json.dumps(repo_id),
        "tokenizer_in_repo": layout["has_tokenizer"],
        "num_labels": len(layout["config"].get("id2label") or {}) or 1,
        "chat_template": layout["has_chat_template"],
        "recipe_text": recipe_text,
        "recipe_fence": _fence(recipe_text),
        "versions": _framework_versions(),
    }


# --------------------------------------------------------------------------- inputs from a run folder


def stage_summaries(recipe: dict | None, stage_name: str | None = None) -> list[dict]:
    """Summaries of a resolved recipe's stages, up to and including `stage_name`, for the card:
    name, type, dataset and the key hyperparameters (peft `r`/`lora_alpha`, quantization)."""
    stages = (recipe or {}).get("stages") or {}
    if not isinstance(stages, dict):
        return []
    names = list(stages)
    if stage_name in stages:
        names = names[: names.index(stage_name) + 1]
    out = []
    for name in names:
        block = stages[name] if isinstance(stages[name], dict) else {}
        params = {k: block[k] for k in _CARD_HPARAMS if k in block and block[k] is not None}
        peft = block.get("peft")
        if isinstance(peft, dict):
            params.update({k: peft[k] for k in _CARD_PEFT if k in peft})
        quant = block.get("quantization")
        if isinstance(quant, dict) and (quant.get("load_in_4bit") or quant.get("load_in_8bit")):
            bits = "4-bit " + str(quant.get("bnb_4bit_quant_type", "fp4")) if quant.get("load_in_4bit") else "8-bit"
            params["quantization"] = f"{bits} (QLoRA)" if isinstance(peft, dict) else bits
        summary = {"name": name, "type": block.get("type", name), "hyperparameters": params}
        dataset = block.get("dataset") or block.get("prompts")
        if dataset is not None:
            summary["dataset"] = dataset
        out.append(summary)
    return out


def _eval_stage_metrics(stage_dir: Path, recipe: dict | None) -> Iterator[tuple[dict, dict, bool]]:
    """This stage's results in the run's eval folders (`eval/` and any other eval stage's), as
    (the eval stage's recipe block, its numbers, whether they score this stage as a reward model)."""
    stages = (recipe or {}).get("stages")
    stages = stages if isinstance(stages, dict) else {}
    names = ["eval"] + [n for n, b in stages.items() if isinstance(b, dict) and b.get("type") == "eval" and n != "eval"]
    this_block = stages.get(stage_dir.name)
    this_type = this_block.get("type") if isinstance(this_block, dict) else None
    for name in names:
        results = _read_json(stage_dir.parent / name / "eval.json")
        block = stages[name] if isinstance(stages.get(name), dict) else {}
        mine = (results.get("policies") or {}).get(stage_dir.name)
        if isinstance(mine, dict):
            yield block, _numbers(mine), False
        if this_type == "reward" and isinstance(results.get("reward_model"), dict):
            yield block, _numbers(results["reward_model"]), True


def card_metrics(stage_dir: Path, recipe: dict | None = None) -> dict:
    """The stage's metrics.json, plus this stage's rows of the run's eval results prefixed `eval/`."""
    stage_dir = Path(stage_dir)
    metrics = _numbers(_read_json(stage_dir / "metrics.json"))
    for _, found, _ in _eval_stage_metrics(stage_dir, recipe):
        metrics.update({f"eval/{k}": v for k, v in found.items()})
    return metrics


def eval_results(stage_dir: Path, recipe: dict | None = None) -> list[EvalResult]:
    """The card's model-index: one entry per metric of this stage in the run's eval stages, where
    the eval data is a Hub dataset (an entry links to its dataset's page; a local file has none)."""
    out = []
    for block, found, as_reward in _eval_stage_metrics(Path(stage_dir), recipe):
        for key, value in found.items():
            spec = block.get("pairs" if as_reward else _EVAL_SOURCE.get(key, "prompts"))
            names = _dataset_names(spec)
            if len(names) != 1 or not _looks_like_hub_id(names[0]) or not math.isfinite(value):
                continue
            options = spec if isinstance(spec, dict) else {}
            out.append(EvalResult(
                task_type="text-classification" if as_reward else "text-generation",
                dataset_type=names[0], dataset_name=names[0], dataset_config=options.get("name"),
                dataset_split=options.get("split"), metric_type=key, metric_value=value))
    return out


def base_model_of(stage_dir: Path, recipe: dict | None) -> str | None:
    """An adapter's base; for a full model, the run's starting model (recipe `model`)."""
    stage_dir = Path(stage_dir)
    base = _read_json(stage_dir / "adapter_config.json").get("base_model_name_or_path")
    if base:
        return base
    recipe = recipe or {}
    model = recipe.get("model") or {}
    if isinstance(model, str) and model:
        return model
    if isinstance(model, dict) and model.get("name_or_path"):
        return model["name_or_path"]
    # No top-level model: the first stage that starts from a model outside the run.
    run_dir = str(recipe.get("output_dir") or stage_dir.parent)
    stages = recipe.get("stages") if isinstance(recipe.get("stages"), dict) else {}
    for name, block in stages.items():
        start = block.get("model") if isinstance(block, dict) else None
        if isinstance(start, str) and start and not start.startswith(run_dir.rstrip("/") + "/"):
            return start
        if name == stage_dir.name:
            break
    return None
