"""PPO trainer on real tiny models: ratio 1 before the first update, exactly
num_ppo_epochs x num_mini_batches optimizer steps per rollout batch, one base model under
LoRA, a reward that rises, outputs that reload, and a SIGKILLed run that resumes to the
very same result."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from align import models
from align.errors import AlignError
from align.ppo import core
from align.ppo.roles import backbone
from align.ppo.rollout import position_ids_from
from align.recipe import build_recipe
from conftest import REPO, read_metrics, run_align, write_recipe

FAST = {"per_device_train_batch_size": 8, "num_mini_batches": 2, "gradient_accumulation_steps": 2,
        "num_ppo_epochs": 2, "response_length": 8, "temperature": 1.0, "kl_coef": 0.01}


def _build(tmp_path, model, block):
    """The stage's trainer, built in this process from a one-stage recipe."""
    from accelerate import PartialState
    from transformers import set_seed

    from align.run import Context
    from align.stages import ppo

    recipe = build_recipe({"name": "t", "seed": 0, "output_dir": str(tmp_path / "run"), "model": str(model),
                           "stages": {"ppo": block}})
    stage = recipe.stages[0]
    stage.dir.mkdir(parents=True, exist_ok=True)
    set_seed(0)
    return ppo.build_trainer(stage, Context(recipe, PartialState())), stage


def _lora_reward_adapter(base, out):
    """A one-logit LoRA reward model on `base` (random, non-zero adapter and head)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(str(out))
    models.load_tokenizer(str(base)).save_pretrained(str(out))
    return out


def _base_linear_weights(modules) -> set:
    """Storage of every base-model Linear weight reachable from `modules` (LoRA factors and
    one-logit heads excluded)."""
    seen = set()
    for module in modules:
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear) and "lora_" not in name and sub.out_features > 1:
                seen.add(sub.weight.data_ptr())
    return seen


def test_lora_one_base_model_ratio_one_and_step_count(tmp_path, tiny_model, data_dir):
    reward = _lora_reward_adapter(tiny_model, tmp_path / "rm")
    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST, "num_train_steps": 3,
             "peft": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}, "learning_rate": 1e-2,
             "reward_model": str(reward), "reward_funcs": "tests.rewards:letter_a", "reward_weights": [0.5, 1.0],
             "adaptive_kl": True, "kl_estimator": "k3", "whiten_rewards": True, "missing_eos_penalty": 1.0,
             "save_steps": 2, "sample_generations_every": 2}
    trainer, stage = _build(tmp_path, tiny_model, block)
    roles = trainer.roles

    # One base model serves policy, reference, critic and reward.
    assert roles.layout == "shared" and roles.ref_model is None and roles.reward_model is None
    plain = models.load_model(str(tiny_model))
    held = _base_linear_weights([roles.actor_critic, *roles.frozen_modules()])
    assert len(held) == len(_base_linear_weights([plain])) > 0
    adapters = set(roles.actor_critic.policy.peft_config)
    assert adapters == {"default", "critic", "reward"}, adapters
    assert trainer.rewards.sources == ["reward_model", "tests.rewards:letter_a"]

    metrics = trainer.train()
    trainer.save(stage.dir)
    log = [json.loads(line) for line in (stage.dir / "log_history.jsonl").read_text().splitlines()]
    per_update = FAST["num_ppo_epochs"] * FAST["num_mini_batches"]
    assert [r["step"] for r in log] == [1, 2, 3]
    for record in log:
        # Old log-probs come from the policy being updated: nothing has moved yet.
        assert abs(record["first_minibatch_ratio"] - 1.0) < 1e-5, record
        assert record["first_minibatch_approx_kl"] < 1e-10, record
        assert record["optimizer_steps"] == per_update, record
    assert trainer.optimizer_steps == 3 * per_update == metrics["optimizer_steps"]
    assert len(trainer.minibatch_stats) == per_update
    assert log[0]["kl"] == 0.0  # the policy adapter starts as the identity
    assert log[-1]["kl_coef"] != FAST["kl_coef"]  # adaptive controller moved
    assert metrics["global_step"] == 3 and metrics["resumed_from_step"] == 0

    # The policy loads like an SFT output, the critic like a reward model.
    assert models.is_adapter(stage.dir) and models.is_adapter(stage.dir / "critic")
    assert models.load_model(str(stage.dir)).config.vocab_size == plain.config.vocab_size
    critic = models.load_model(str(stage.dir / "critic"), kind="seq-cls")
    assert torch.equal(critic.score.weight.float(), roles.actor_critic.value_head.weight.detach().cpu())
    assert (stage.dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert "## step 2" in (stage.dir / "samples.md").read_text()


def test_stop_strings_mask_after_the_string(tmp_path, tiny_model, data_dir):
    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST, "num_train_steps": 1,
             "reward_funcs": "tests.rewards:letter_a", "stop_strings": ["ba"]}
    trainer, _ = _build(tmp_path, tiny_model, block)
    tok = trainer.tokenizer
    rows = [tok("cc dd ba ee ff", add_special_tokens=False)["input_ids"],
            tok("cc dd ee ff ab", add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    ids[1, len(rows[1]):] = tok.eos_token_id  # row 2 ends with EOS
    ids = torch.cat([ids, torch.full((2, 1), tok.eos_token_id)], 1)
    mask, has_stop = trainer.sampler.stop_mask(ids)
    assert has_stop.tolist() == [True, True]
    first = tok.decode(ids[0][mask[0]])
    assert first.endswith("ba") and "ee" not in first
    assert tok.decode(ids[1][mask[1]]) == "cc dd ee ff ab" + tok.eos_token


@pytest.mark.parametrize("change, field", [
    ({"reward_funcs": None}, "reward_model"),
    ({"per_device_train_batch_size": 6}, "per_device_train_batch_size"),
    ({"reward_funcs": "tests.rewards"}, "reward_funcs"),
    ({"reward_weights": [1.0, 2.0]}, "reward_weights"),
    ({"kl_estimator": "k2"}, "kl_estimator"),
    ({"peft": {"method": "ia3"}}, "peft.method"),
    ({"value_head_on_policy": True, "value_model": "some/critic"}, "value_model"),
    ({"bf16": True, "fp16": True}, "bf16"),
    ({"report_to": ["tensorboard", "nosuch"]}, "report_to"),
    ({"missing_eos_penalty": -1.0}, "missing_eos_penalty: must be 0 or more: it is subtracted .* write 1.0"),
])
def test_bad_recipes_fail_at_load_naming_the_field(tmp_path, data_dir, change, field):
    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST, "reward_funcs": "tests.rewards:letter_a",
             **change}
    block = {k: v for k, v in block.items() if v is not None}
    with pytest.raises(AlignError, match=rf"stages\.ppo\.{field}"):
        build_recipe({"name": "t", "output_dir": str(tmp_path), "model": "x", "stages": {"ppo": block}})


def test_reward_functions_are_imported_before_training_not_at_dry_run(tmp_path, data_dir):
    """`--dry-run` checks only the `module:function` form (importing runs the module's code); a
    real run imports every named function before the first stage trains."""
    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST, "reward_funcs": "tests.rewards:nope"}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"ppo": block}, model="some/model")
    assert run_align(["run", recipe, "--dry-run"]).returncode == 0
    result = run_align(["run", recipe])
    assert result.returncode == 2 and "stages.ppo.reward_funcs: 'tests.rewards' has no function 'nope'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "ppo").exists()


def test_full_finetuning_learns_and_resumes_after_sigkill(tmp_path, tiny_model, data_dir):
    """Full fine-tuning on an easy reward: the reward rises; a run killed after a checkpoint
    resumes from it and ends exactly where an uninterrupted run ends."""
    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST, "per_device_train_batch_size": 16,
             "num_ppo_epochs": 4, "num_train_steps": 16, "learning_rate": 3e-3, "save_steps": 4,
             "reward_funcs": "tests.rewards:letter_a", "sample_generations_every": 8}
    killed = write_recipe(tmp_path / "killed.yaml", tmp_path / "killed", {"ppo": block}, model=str(tiny_model))
    whole = write_recipe(tmp_path / "whole.yaml", tmp_path / "whole", {"ppo": block}, model=str(tiny_model))
    checkpoints = tmp_path / "killed" / "ppo" / "checkpoints"

    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "align", "run", str(killed)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **env})
    deadline = time.time() + 300
    while not any(checkpoints.glob("checkpoint-*[0-9]")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "ppo" / "metrics.json").exists(), "killed before the end"

    again = run_align(["run", killed], check=True)
    assert "resumed from checkpoint-" in again.stdout
    run_align(["run", whole], check=True)

    out = tmp_path / "killed" / "ppo"
    m, m_whole = read_metrics(out), read_metrics(tmp_path / "whole" / "ppo")
    assert m["resumed_from_step"] >= 4 and m["global_step"] == m_whole["global_step"] == 16
    assert m["world_size"] == 1 and m["optimizer_steps"] == 16 * 4 * 2
    assert m["reward_mean"] > m["reward_first"] + 0.15, m
    # Weights, optimizer, scheduler, RNG and data order all came back: the same run, step for step.
    log = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    log_whole = [json.loads(x) for x in (tmp_path / "whole" / "ppo" / "log_history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 17))
    for a, b in zip(log, log_whole):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6) and a["kl"] == pytest.approx(b["kl"], abs=1e-5)

    assert (out / "model.safetensors").is_file() and (out / "critic" / "model.safetensors").is_file()
    assert models.load_model(str(out / "critic"), kind="seq-cls").num_labels == 1
    assert len(list(checkpoints.iterdir())) <= 2


@pytest.mark.parametrize("lora", [False, True], ids=["separate", "shared"])
def test_ppo_reward_score_matches_the_reward_model_as_evaluated(tmp_path, tiny_model, data_dir, lora):
    """PPO must read the reward model where RewardTrainer trained it (the chat-template text),
    so its scores equal align eval's (and TRL's) for the same prompt and completion."""
    from align import evaluate

    reward = _lora_reward_adapter(tiny_model, tmp_path / "rm")
    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST, "num_train_steps": 1,
             "reward_model": str(reward), **({"peft": {"r": 4}} if lora else {})}
    trainer, _ = _build(tmp_path, tiny_model, block)
    prompts = [[{"role": "user", "content": "reverse abc"}], [{"role": "user", "content": "reverse fed"}]]
    completions = ["cba", "I do not know"]
    ppo_scores = trainer.rewards.reward_model_scores(prompts, completions)
    rm = models.load_model(str(reward), kind="seq-cls", dtype="float32").eval()
    expected = evaluate.reward_scores(rm, models.load_tokenizer(str(reward)), prompts, completions)
    assert torch.allclose(ppo_scores.cpu(), torch.tensor(expected), atol=1e-4), (ppo_scores, expected)


@pytest.mark.parametrize("lora", [True, False], ids=["shared", "separate"])
def test_value_head_on_policy_one_pass_learns_and_saves_a_critic(tmp_path, tiny_model, data_dir, lora):
    """value_head_on_policy: no critic network; one pass of the policy gives logits and values
    (those of the value head on the LM head's input), PPO still takes exactly its optimizer
    steps from ratio 1, the critic learns, and it saves as a loadable classifier. With full
    fine-tuning the reward rises (LoRA cannot move this random-init model's outputs much)."""
    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST, "per_device_train_batch_size": 16,
             "num_ppo_epochs": 4, "num_train_steps": 8 if lora else 16, "learning_rate": 1e-2 if lora else 3e-3,
             "reward_funcs": "tests.rewards:letter_a", "value_head_on_policy": True, "save_steps": 0,
             **({"peft": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}} if lora else {})}
    trainer, stage = _build(tmp_path, tiny_model, block)
    ac = trainer.roles.actor_critic
    assert ac.critic is None and ac.on_policy
    if lora:
        assert set(ac.policy.peft_config) == {"default"}
    _, critic_params = ac.param_groups()
    assert critic_params == [ac.value_head.weight]

    # One pass through the transformer body per forward, and its values are the value head
    # applied to exactly the hidden states the LM head read.
    body = backbone(ac.policy)
    calls = []
    hook = body.register_forward_hook(lambda m, a, out: calls.append(out.last_hidden_state))
    with torch.no_grad():
        ac.value_head.weight.normal_()
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        mask = torch.ones_like(ids)
        logits, values = ac(ids, mask, position_ids_from(mask), 3)
    hook.remove()
    assert len(calls) == 1 and logits.shape[:2] == values.shape == (1, 3)
    expected = ac.value_head(calls[0][:, -4:-1].float()).squeeze(-1)
    assert torch.allclose(values, expected, atol=1e-6)
    with torch.no_grad():
        ac.value_head.weight.zero_()

    metrics = trainer.train()
    trainer.save(stage.dir)
    log = [json.loads(line) for line in (stage.dir / "log_history.jsonl").read_text().splitlines()]
    for record in log:
        assert abs(record["first_minibatch_ratio"] - 1.0) < 1e-5, record
        assert record["optimizer_steps"] == 4 * FAST["num_mini_batches"], record
    assert ac.value_head.weight.abs().sum() > 0  # the value loss reached the head
    if not lora:
        assert metrics["reward_mean"] > metrics["reward_first"] + 0.1, metrics
        # The critic learned: on a fresh rollout it predicts the returns better than the zero it started as.
        batch = trainer.rollout(trainer.prompts_for_step(0))
        error = core.masked_mean((batch.values - batch.returns) ** 2, batch.mask)
        assert error < 0.5 * core.masked_mean(batch.returns ** 2, batch.mask), error

    critic = models.load_model(str(stage.dir / "critic"), kind="seq-cls", dtype="float32")
    assert torch.equal(critic.score.weight.float(), ac.value_head.weight.detach().cpu())
    assert not (stage.dir / "critic" / "adapter_model.safetensors").exists() or lora


def test_gradient_checkpointing_keeps_each_adapters_gradients(tmp_path, tiny_model, data_dir):
    """Checkpointing recomputes layers in the backward pass; on the shared base the critic's
    layers must be recomputed under the critic's adapter, not whichever adapter ran last, so
    the gradients equal those without checkpointing."""
    def gradients(checkpointing: bool) -> dict:
        block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST, "reward_funcs": "tests.rewards:letter_a",
                 "peft": {"r": 4, "target_modules": "all-linear"}, "gradient_checkpointing": checkpointing}
        trainer, _ = _build(tmp_path / str(checkpointing), tiny_model, block)
        ac = trainer.roles.actor_critic
        torch.manual_seed(0)
        with torch.no_grad():
            for p in ac.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)  # non-zero adapters and head, so every gradient is non-trivial
        ids = torch.randint(5, 60, (2, 10))
        mask = torch.ones_like(ids)
        logits, values = trainer.model(ids, mask, position_ids_from(mask), 4)
        (logits.float().logsumexp(-1).sum() + values.sum()).backward()
        return {n: p.grad.clone() for n, p in ac.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and any(".critic." in n for n in plain)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-4), name


def test_first_update_step_reuses_the_rollout_forward_pass(tmp_path, tiny_model, data_dir):
    """With one minibatch of one micro-batch, the rollout's policy/critic pass (run with
    gradients) is the first optimizer step's forward pass: one pass fewer per step, and the
    same weights afterwards as recomputing it (forced here by chunking the rollout)."""
    def one_step(chunk):
        block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST, "num_mini_batches": 1,
                 "gradient_accumulation_steps": 1, "num_train_steps": 1, "learning_rate": 1e-3, "save_steps": 0,
                 "reward_funcs": "tests.rewards:letter_a", "rollout_forward_batch_size": chunk,
                 "peft": {"r": 4, "target_modules": "all-linear"}}
        trainer, _ = _build(tmp_path / str(chunk), tiny_model, block)
        calls = []
        trainer.unwrapped.register_forward_hook(lambda *a: calls.append(1))
        trainer.train()
        log = json.loads((trainer.output_dir / "log_history.jsonl").read_text().splitlines()[0])
        return trainer.unwrapped.trainable_state_dict(), len(calls), log

    reused, passes, log = one_step(None)
    recomputed, passes_recomputed, _ = one_step(4)
    epochs = FAST["num_ppo_epochs"]
    assert passes == epochs and passes_recomputed == 2 + epochs  # rollout (1 or 2 chunks) + update
    assert log["first_minibatch_ratio"] == 1.0 and log["optimizer_steps"] == epochs
    assert any(v.abs().sum() > 0 for n, v in reused.items() if "lora_B" in n)  # the step moved the adapter
    for name, value in reused.items():
        assert torch.allclose(value, recomputed[name], atol=1e-5), name


def test_qlora_one_4bit_base_and_generation_keeps_gradients(tmp_path, tiny_model, data_dir):
    """QLoRA: one 4-bit base serves every role. A rollout generates in eval mode; on CPUs
    with AVX512-BF16, bitsandbytes would then repack the 4-bit weights for a kernel without
    a backward, silently changing every later gradient. Gradients after generating must
    equal those before."""
    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST, "reward_funcs": "tests.rewards:letter_a",
             "peft": {"r": 4, "target_modules": "all-linear"},
             "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}}
    trainer, _ = _build(tmp_path, tiny_model, block)
    ac = trainer.roles.actor_critic
    assert ac.policy.get_base_model().is_loaded_in_4bit and trainer.roles.layout == "shared"
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ac.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    ids = torch.randint(5, 60, (2, 10))
    mask = torch.ones_like(ids)

    def gradients():
        ac.zero_grad()
        logits, values = trainer.model(ids, mask, position_ids_from(mask), 4)
        (logits.float().logsumexp(-1).sum() + values.sum()).backward()
        return {n: p.grad.clone() for n, p in ac.named_parameters() if p.grad is not None}

    before = gradients()
    query, query_mask = trainer.sampler.encode(trainer.prompts_for_step(0))
    trainer.sampler.generate(query, query_mask)
    after = gradients()
    assert before.keys() == after.keys() and len(before) > 0
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-6), name


def test_report_to_trackers_get_every_step_and_the_bar_shows(tmp_path, tiny_model, data_dir):
    """`report_to` as in TrainingArguments: every step's record reaches TensorBoard (under
    checkpoints/runs/<date>_<host>, where the other stages write theirs), trackio's local store
    and an offline wandb run, as `train/<key>`. The main process shows a progress bar and still
    prints its lines."""
    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST, "num_train_steps": 2, "save_steps": 0,
             "reward_funcs": "tests.rewards:letter_a", "report_to": ["tensorboard", "trackio", "wandb"],
             "run_name": "tiny-ppo", "project": "align-test"}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"ppo": block}, model=str(tiny_model))
    # Local stores only: trackio without a Space, wandb offline; nothing outside tmp_path.
    wandb_dir = str(tmp_path / "wandb")
    env = {"TRACKIO_DIR": str(tmp_path / "trackio"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DIR": wandb_dir, "WANDB_CACHE_DIR": wandb_dir, "WANDB_CONFIG_DIR": wandb_dir,
           "WANDB_DATA_DIR": wandb_dir}
    result = run_align(["run", recipe], check=True, env=env)
    stage = tmp_path / "run" / "ppo"
    log = [json.loads(line) for line in (stage / "log_history.jsonl").read_text().splitlines()]
    keys = ["reward", "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl", "lr"]
    assert "[ppo] step 2/2" in result.stdout
    assert "ppo: 100%" in result.stderr and "2/2" in result.stderr, result.stderr[-2000:]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (stage / "checkpoints" / "runs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    for key in keys:
        scalars = events.Scalars(f"train/{key}")
        assert [e.step for e in scalars] == [1, 2], key
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in log], rel=1e-5, abs=1e-7), key

    read = ("import json; from trackio.sqlite_storage import SQLiteStorage; "
            "print(json.dumps(SQLiteStorage.get_logs('align-test', 'tiny-ppo'), default=str))")
    out = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, check=True,
                         env={**os.environ, **env, "HF_HUB_OFFLINE": "1"})
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["step"] for r in rows] == [1, 2], rows
    for key in keys:
        assert [r[f"train/{key}"] for r in rows] == pytest.approx([r[key] for r in log]), key

    (wandb_file,) = (tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    rows = _wandb_history(wandb_file)
    assert [r["_step"] for r in rows] == [1, 2], rows
    for key in keys:
        assert [r[f"train/{key}"] for r in rows] == pytest.approx([r[key] for r in log]), key



@pytest.mark.parametrize("disable", [False, True])
def test_disable_tqdm_hides_the_progress_bar(tmp_path, tiny_model, data_dir, capsys, disable):
    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST, "num_train_steps": 1, "save_steps": 0,
             "reward_funcs": "tests.rewards:letter_a", "disable_tqdm": disable}
    trainer, _ = _build(tmp_path, tiny_model, block)
    capsys.readouterr()
    trainer.train()
    out = capsys.readouterr()
    assert ("ppo: 100%" in out.err) is not disable, out.err
    assert "[ppo] step 1/1" in out.out

def _wandb_history(path) -> list[dict]:
    """The history rows of an offline wandb run. wandb no longer ships a Python reader; its
    .wandb file is a LevelDB-style log: a 7-byte file header, then in 32 KiB blocks records
    with a 7-byte header (crc32, length u16, type: 1 whole, 2 first, 3 middle, 4 last part)
    whose payloads are protobuf `Record`s."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, payload, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if kind == 0:
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
