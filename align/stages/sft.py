"""Supervised fine-tuning on TRL's SFTTrainer: full, LoRA (`peft:`) or QLoRA (`peft:` +
`quantization:`). Loss falls on completions (prompt/completion data) or assistant turns
(conversational data) only; `packing` / `padding_free` pass through to SFTConfig.

Assistant-only loss needs `{% generation %}` markers in the chat template. TRL adds them to
the templates it knows (Llama 3, Qwen, Gemma, Phi-3, ...); for any other (Mistral's [INST],
OLMo 2's) each conversation's last assistant turn becomes a conversational completion, which
TRL masks by rendering the prompt alone: replies are still all the loss sees.
"""

import math

from trl import SFTConfig as Config
from trl import SFTTrainer

from align.errors import AlignError
from align.stages import Traits
from align.training import TRAINING_OPTIONS, check_training_fields, run_trainer

OPTIONS = TRAINING_OPTIONS
TRAITS = Traits(produces="policy", data="lm", chat=True)


def validate(stage, model):
    check_training_fields(stage)


def marks_assistant_turns(tokenizer) -> bool:
    """Whether TRL can mask a conversation to its assistant turns with this chat template."""
    from trl.chat_template_utils import get_training_chat_template

    try:
        get_training_chat_template(tokenizer)  # None: markers present; a template: TRL patches it
    except ValueError:
        return False
    return True


def _last_reply(row):
    return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}


def _replies_only(stage):
    """`prepare` for conversations whose template cannot mark assistant turns (see above)."""
    where = f"stages.{stage.name}"

    def prepare(train, evals, tokenizer):
        if "messages" not in train.column_names or marks_assistant_turns(tokenizer):
            return train, evals
        if stage.args.get("assistant_only_loss"):
            raise AlignError(f"{where}.assistant_only_loss: this chat template has no {{% generation %}} markers and "
                             f"TRL has no training version of it; remove the field (align then trains on each "
                             f"conversation's last assistant turn) or add the markers to the template")
        if stage.args.get("assistant_only_loss") is False:
            return train, evals  # the user asked for loss on every token
        out = []
        for split, name in ((train, "dataset"), (evals, "eval_dataset")):
            if split is not None:
                bad = [i for i, m in enumerate(split["messages"]) if not m or m[-1].get("role") != "assistant"]
                if bad:
                    raise AlignError(f"{where}.{name}: {len(bad)} conversations do not end with an assistant turn "
                                     f"(first: row {bad[0]}); the loss is taken on each conversation's last "
                                     f"assistant turn with this chat template")
                split = split.map(_last_reply, remove_columns=split.column_names)
            out.append(split)
        return tuple(out)

    return prepare


def _defaults(train) -> dict:
    # Never learn to imitate the user's turns.
    return {"assistant_only_loss": True} if "messages" in train.column_names else {}


def run(stage, ctx):
    metrics = run_trainer(stage, ctx, SFTTrainer, defaults=_defaults, prepare=_replies_only(stage))
    if "eval_loss" in metrics:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    return metrics
