"""SFT: full, LoRA and QLoRA on a tiny model. The loss must fall, the output must reload, and
the trained model must stop generating at the end-of-turn token."""

import pytest
import torch

from align import models
from conftest import read_metrics, run_align, write_recipe

SFT = {"learning_rate": 3e-3, "max_steps": 60, "per_device_train_batch_size": 16, "logging_steps": 5,
       "save_steps": 30, "lr_scheduler_type": "constant"}


def _reload_and_generate(stage_dir):
    """Greedy-decode training prompts; return (n_stopped, n_total, texts)."""
    tokenizer = models.load_tokenizer(str(stage_dir))
    model = models.load_model(str(stage_dir), dtype="float32").eval()
    stopped, texts = 0, []
    for word in ("abc", "fed", "cab"):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"reverse {word}"}],
                                               tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        stopped += tokenizer.eos_token_id in new
        texts.append(tokenizer.decode(new))
    return stopped, texts


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_sft_trains_reloads_and_stops(tmp_path, tiny_model, pretrained_model, data_dir, method):
    base = tiny_model if method == "full" else pretrained_model
    stage = {"model": str(base), "dataset": {"path": str(data_dir / "messages.jsonl")}, **SFT}
    if method != "full":
        stage.update(peft={"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}, learning_rate=1e-2,
                     max_steps=80)
    if method == "qlora":
        stage["quantization"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                 "bnb_4bit_compute_dtype": "float32"}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"sft": stage})
    run_align(["run", recipe], check=True)

    out = tmp_path / "run" / "sft"
    m = read_metrics(out)
    # Full SFT from random init falls far; adapters on a small pretrained base fall less.
    assert m["train_loss_last"] < (0.6 if method == "full" else 0.9) * m["train_loss_first"], m
    assert (out / ("adapter_model.safetensors" if method != "full" else "model.safetensors")).is_file()
    assert not list(out.glob("*.bin")), "safetensors only"
    stopped, texts = _reload_and_generate(out)
    assert stopped == 3, texts


def test_prompt_completion_loss_on_completion_only(tmp_path, tiny_model, data_dir):
    stage = {"model": str(tiny_model), "dataset": {"path": str(data_dir / "prompt_completion.jsonl"),
                                                   "test_size": 0.1}, **SFT, "max_steps": 10}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"sft": stage})
    run_align(["run", recipe], check=True)
    m = read_metrics(tmp_path / "run" / "sft")
    assert m["eval_perplexity"] > 1 and "eval_loss" in m


def test_qlora_policy_keeps_its_gradients_after_an_eval_pass(tmp_path, tiny_model, data_dir):
    """A 4-bit policy loaded for training (any TRL stage) must give the same gradients after
    an eval-mode forward (evaluation, generation): bitsandbytes would otherwise repack its
    weights on AVX512-BF16 CPUs for a kernel that has no backward."""
    from accelerate import PartialState
    from peft import get_peft_model

    from align.recipe import build_recipe
    from align.run import Context
    from align.training import load_policy

    block = {"dataset": {"path": str(data_dir / "messages.jsonl")}, "peft": {"r": 4, "target_modules": "all-linear"},
             "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}}
    recipe = build_recipe({"name": "t", "output_dir": str(tmp_path), "model": str(tiny_model), "stages": {"sft": block}})
    model, _, lora = load_policy(recipe.stages[0], Context(recipe, PartialState()))
    model = get_peft_model(model, lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(5, 60, (2, 10))

    def gradients():
        model.train()
        model.zero_grad()
        model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = gradients()
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-6), name
