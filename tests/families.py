"""Tiny stand-ins for the model families users fine-tune, each saved as an ordinary checkpoint
folder the way a downloaded model looks: a transformers config class at a few hundred thousand
parameters, and a byte-level BPE tokenizer trained here that keeps the family's special-token
conventions, the ones that break toolkits:

    family    bos (added by the tokenizer?)      eos              pad               end of turn     chat template
    llama3    <|begin_of_text|> (yes, +template) <|end_of_text|>  none (reserved)   <|eot_id|>      Llama 3 (TRL's copy)
    qwen2     none                               <|im_end|>       <|endoftext|>     <|im_end|>      Qwen2.5 (TRL's copy)
    qwen3     none                               <|endoftext|>    = eos             <|im_end|>      Qwen3 (TRL's copy), base-model eos
    gemma2    <bos> (yes, +template)             <eos>            <pad>             <end_of_turn>   Gemma (refuses a system role)
    mistral   <s> (yes, +template)               </s>             none              </s>            [INST] (refuses a system role)
    phi3      <s> (no)                           <|endoftext|>    = eos             <|end|>         Phi-3 (TRL's copy; appends eos)
    gpt_neox  <|endoftext|> (no)                 <|endoftext|>    = eos             -               none (align adds one)
    gpt2      <|endoftext|> (no)                 <|endoftext|>    none              -               none; Conv1D layers, dropout 0.1
    opt       </s> (yes)                         </s>             <pad>             -               none; dropout 0.1
    olmo2     <|endoftext|> (template)           <|endoftext|>    <|pad|>           <|endoftext|>   OLMo 2 (bos = eos)

Generation configs list the ids the real checkpoints list (Llama-3-Instruct: end of text and
end of turn; Gemma: eos and <end_of_turn>; Phi-3: three; a base model: its eos only).

Each base is trained here for a few seconds as a causal LM (all weights) on "repeat <word>" turns
rendered with its own template (or on plain text for families without one), so it already ends
its turns the family's way, as a pretrained or instruction-tuned checkpoint does.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch

LETTERS = "abcdef"


def _trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


MISTRAL_TEMPLATE = (  # Mistral-7B-Instruct-v0.1's: BOS in the template, no system role, eos ends a turn
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

OLMO2_TEMPLATE = (  # OLMo-2-Instruct's: bos (= eos) opens, eos ends an assistant turn
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config: str  # transformers config class
    specials: tuple[str, ...]  # special tokens, in vocabulary order
    eos: str
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False  # the tokenizer puts bos in front of every encoded text
    template: str | None = None  # TRL's copy of the family's template, or a literal
    end_of_turn: str | None = None  # the token a chat turn ends with (None: no chat template)
    generation_eos: tuple[str, ...] = ()  # generation_config.json eos ids (default: eos)
    fields: tuple = ()  # extra config fields
    qlora: bool = False  # the chain's SFT is QLoRA (4-bit base)

    def chat_template(self) -> str | None:
        if self.template is None or "{" in self.template:
            return self.template
        return _trl_template(self.template)


FAMILIES = [
    Family("llama3", "LlamaConfig", ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                     "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           bos="<|begin_of_text|>", eos="<|end_of_text|>", add_bos=True, template="llama3", end_of_turn="<|eot_id|>",
           generation_eos=("<|end_of_text|>", "<|eot_id|>"), qlora=True),
    Family("qwen2", "Qwen2Config", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>",
           pad="<|endoftext|>", template="qwen2_5", end_of_turn="<|im_end|>",
           generation_eos=("<|im_end|>", "<|endoftext|>"), qlora=True),
    Family("qwen3", "Qwen3Config", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|endoftext|>",
           pad="<|endoftext|>", template="qwen3", end_of_turn="<|im_end|>", generation_eos=("<|endoftext|>",),
           fields=(("head_dim", 16),)),
    Family("gemma2", "Gemma2Config", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
           bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True, template="gemma",
           end_of_turn="<end_of_turn>", generation_eos=("<eos>", "<end_of_turn>"),
           fields=(("head_dim", 16), ("query_pre_attn_scalar", 16), ("sliding_window", 64))),
    Family("mistral", "MistralConfig", ("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", unk="<unk>", add_bos=True,
           template=MISTRAL_TEMPLATE, end_of_turn="</s>"),
    Family("phi3", "Phi3Config", ("<unk>", "<s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>",
                                  "<|system|>"),
           bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>", template="phi3", end_of_turn="<|end|>",
           generation_eos=("<|endoftext|>", "<|end|>", "<|assistant|>")),
    Family("gpt_neox", "GPTNeoXConfig", ("<|endoftext|>",), bos="<|endoftext|>", eos="<|endoftext|>",
           pad="<|endoftext|>", unk="<|endoftext|>"),
    Family("gpt2", "GPT2Config", ("<|endoftext|>",), bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>"),
    Family("opt", "OPTConfig", ("<s>", "<pad>", "</s>", "<unk>"), bos="</s>", eos="</s>", pad="<pad>", unk="<unk>",
           add_bos=True),
    Family("olmo2", "Olmo2Config", ("<|endoftext|>", "<|pad|>"), bos="<|endoftext|>", eos="<|endoftext|>",
           pad="<|pad|>", template=OLMO2_TEMPLATE, end_of_turn="<|endoftext|>"),
]
BY_NAME = {f.name: f for f in FAMILIES}


# --------------------------------------------------------------------------- data


def words(n: int, seed: int):
    rng = random.Random(seed)
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 4))) for _ in range(n)]


def chat(prompt: str, answer: str | None = None) -> list[dict]:
    turns = [{"role": "user", "content": prompt}]
    return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reply(word: str) -> str:
    """The SFT target: a word the base never saw before its turns (so the loss has far to fall in a
    few LoRA steps), then the reversed word."""
    return f"ok {word[::-1]}"


def write_data(folder: Path) -> Path:
    """The chain's data: SFT turns, preference pairs, PPO prompts, all about reversing a word."""
    train = words(200, seed=1)
    write_jsonl(folder / "sft.jsonl", ({"messages": chat(f"reverse {w}", reply(w))} for w in train))
    write_jsonl(folder / "prefs.jsonl", ({"prompt": chat(f"reverse {w}"),
                                          "chosen": [{"role": "assistant", "content": reply(w)}],
                                          "rejected": [{"role": "assistant", "content": "no idea"}]} for w in train))
    write_jsonl(folder / "prompts.jsonl", ({"prompt": chat(f"reverse {w}")} for w in words(16, seed=2)))
    return folder


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(family: Family, corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(family.specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    if family.add_bos:
        bos = (family.bos, tok.token_to_id(family.bos))
        tok.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B",
                                                           special_tokens=[bos])
    named = {family.bos, family.eos, family.pad, family.unk}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad,
        unk_token=family.unk, additional_special_tokens=[t for t in family.specials if t not in named])
    tokenizer.chat_template = family.chat_template()
    return tokenizer


def _corpus(family: Family) -> list[str]:
    texts = [f"repeat {w} = {w}. reverse {w} = {w[::-1]}." for w in words(300, seed=0)]
    texts += ["user assistant model system no idea I do not know"] * 20
    template = family.chat_template()
    if template:  # the template's own words (role names, markers) get merges like a real vocabulary
        from jinja2 import Template

        texts += [Template(template).render(messages=chat("hello", "hi"), bos_token="", eos_token="",
                                            raise_exception=lambda m: "", add_generation_prompt=True)] * 20
    return texts


# --------------------------------------------------------------------------- model


def model_config(family: Family, tokenizer):
    import transformers

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    vocab, hidden, layers, heads, ffn = len(tokenizer), 64, 2, 4, 128
    cls = getattr(transformers, family.config)
    if family.config == "GPT2Config":
        fields = dict(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256)
    elif family.config == "OPTConfig":
        fields = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      ffn_dim=ffn, word_embed_proj_dim=hidden, max_position_embeddings=256)
    else:
        fields = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=ffn, max_position_embeddings=256)
        if family.config != "GPTNeoXConfig":
            fields["num_key_value_heads"] = 2
    fields.update(dict(family.fields))
    return cls(**fields, **ids)


def _examples(family: Family, tokenizer) -> list[list[int]]:
    """"repeat <word>" turns in the family's format: the base learns to end its turns."""
    rows = []
    for w in words(256, seed=3):
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(chat(f"repeat {w}", w), tokenize=False)
            rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            rows.append(tokenizer(f"repeat {w} = {w}.")["input_ids"] + [tokenizer.eos_token_id])
    return rows


def pretrain(model, rows: list[list[int]], steps: int = 80, batch: int = 16, seed: int = 0):
    """A few seconds of causal-LM training on every token of `rows` (right-padded, masked)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        chunk = rng.sample(rows, batch)
        width = max(map(len, chunk))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in chunk])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk])
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss)


def build(family: Family, folder: Path) -> Path:
    """Tokenizer, config, briefly trained weights and generation config of `family` in `folder`."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(0)
    tokenizer = build_tokenizer(family, _corpus(family))
    config = model_config(family, tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    pretrain(model, _examples(family, tokenizer))
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in family.generation_eos] or [tokenizer.eos_token_id]
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0])
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
