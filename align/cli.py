"""`align` command line: one sub-command per job, each a thin call into its module."""

from __future__ import annotations

import argparse
import os
import sys

from align.errors import AlignError, disk_full
from align.estimate.settings import ENGINES


def cmd_run(args):
    from align import run
    from align.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe, args.set)
    except AlignError:
        # Under `accelerate launch` every process reads the same recipe: the main one reports it.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
            sys.exit(2)
        raise
    run.run(recipe, only=args.stage, dry_run=args.dry_run)


def cmd_eval(args):
    from pathlib import Path

    from align import data, evaluate
    from align.functions import load_function

    if not (args.prompts or args.pairs or args.texts):
        raise AlignError("align eval: give at least one of --prompts, --pairs or --texts")
    if args.reward_model:
        from align.models import check_model_path, check_reward_model

        check_model_path(args.reward_model, "--reward-model")
        check_reward_model(args.reward_model, "--reward-model")
    policies = {p.rstrip("/").split("/")[-1]: p for p in args.policy}
    results = evaluate.evaluate(
        policies=policies,
        prompts=[r["prompt"] for r in data.read_rows(args.prompts, "prompt", "--prompts", args.limit)]
        if args.prompts else None,
        pairs=data.read_rows(args.pairs, "preference", "--pairs", args.limit) if args.pairs else None,
        texts=[r["text"] for r in data.read_rows(args.texts, "text", "--texts", args.limit)] if args.texts else None,
        reward_model=args.reward_model, reference=args.reference,
        judge=load_function(args.judge, "--judge") if args.judge else None,
        max_new_tokens=args.max_new_tokens, seed=args.seed,
    )
    evaluate.write(results, Path(args.out))
    print(evaluate.markdown(results))
    print(f"wrote {Path(args.out) / 'eval.json'} and eval.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="Align language models with YAML recipes.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe's stages in order (finished stages are skipped)")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--stage", help="run only this stage (earlier stages must be finished)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set stages.sft.learning_rate=1e-4 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe and data, print the plan, train nothing")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="evaluate policies, a reward model, or perplexity")
    p.add_argument("--policy", action="append", default=[], help="policy to evaluate (repeatable)")
    p.add_argument("--reward-model", help="reward model: scores, win rate, pair accuracy")
    p.add_argument("--reference", help="reference policy for KL and win rate")
    p.add_argument("--prompts", help="prompt-only dataset file (TRL prompt format)")
    p.add_argument("--pairs", help="preference dataset for reward-model pair accuracy")
    p.add_argument("--texts", help="text dataset for perplexity")
    p.add_argument("--judge", help="gold judge module:function(prompt, response) -> [0, 1]")
    p.add_argument("--limit", type=int, default=200, help="rows per dataset")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="eval", help="folder for eval.json and eval.md")
    p.set_defaults(func=cmd_eval)

    for name, help_text in (("chat", "chat with a model in the terminal"),
                            ("generate", "batched generation for a prompt file, to jsonl")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("target", help="run folder, stage output, checkpoint or Hub id (adapters load onto their base)")
        if name == "generate":
            p.add_argument("--prompts", required=True, help="prompt file (jsonl/json/csv/parquet, TRL prompt format)")
            p.add_argument("--out", default="generations.jsonl", help="output jsonl")
            p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--load-in-4bit", action="store_true", help="nf4 weights through bitsandbytes (CPU or GPU)")
        p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--trust-remote-code", action="store_true")
        p.set_defaults(func=_lazy("align.chat" if name == "chat" else "align.infer", f"{name}_command"))

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base and save safetensors")
    p.add_argument("target", help="adapter folder, stage output or run folder")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.set_defaults(func=_lazy("align.merge", "merge_command"))

    p = sub.add_parser("push", help="push an adapter (or merged model) with a model card to the Hub")
    p.add_argument("target", help="stage output or run folder")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--merged", action="store_true", help="merge the adapter into its base first")
    p.set_defaults(func=_lazy("align.push", "push_command"))

    p = sub.add_parser("report", help="rebuild a run's report.md and plots")
    p.add_argument("run_dir", help="run folder (output_dir of a recipe)")
    p.set_defaults(func=_lazy("align.report", "report_command"))

    p = sub.add_parser("forecast", help="fit RL stages' held-out curves and forecast where they saturate")
    p.add_argument("run_dir", help="run folder (output_dir of a recipe)")
    p.add_argument("--stage", action="append", default=[], metavar="NAME", help="RL stage to fit (repeatable; "
                   "default: every RL stage)")
    p.add_argument("--fit-fraction", type=float, default=0.25,
                   help="forecast from the points up to this share of each stage's final compute (default 0.25)")
    p.add_argument("--metric", choices=["gold_score", "reward"], default=None,
                   help="held-out metric to fit (default: the judge's gold score when logged, else reward)")
    p.set_defaults(func=_lazy("align.forecast", "forecast_command"))

    p = sub.add_parser("plan", help="parameters, memory, FLOPs and time per stage, before spending compute")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    p.add_argument("--flops-per-second", type=float, default=None,
                   help="peak FLOP/s per device for time estimates (default: the GPU's datasheet peak; on a CPU, "
                        "measured)")
    p.add_argument("--engine", choices=ENGINES, default=None,
                   help="what each process holds (default: from `accelerate launch`'s environment, else ddp)")
    p.add_argument("--num-processes", type=int, default=None,
                   help="data-parallel processes (default: WORLD_SIZE, else 1)")
    p.set_defaults(func=_lazy("align.plan", "plan_command"))
    return parser


def _lazy(module: str, function: str):
    """Import a command's module only when it runs: `align --help` stays fast."""

    def call(args):
        import importlib

        return getattr(importlib.import_module(module), function)(args)

    return call


def main(argv=None):
    from align import threads

    threads.configure()  # before torch starts its thread pool
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # datasets' per-file progress bars bury the messages that matter; training bars stay.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    try:
        try:
            args.func(args)
        except OSError as e:
            path = disk_full(e)
            if path is None:
                raise
            raise AlignError(f"no space left on device while writing {path}") from None
    except AlignError as e:
        _end_progress_bars()
        rank = os.environ.get("RANK", "0")
        print(f"error: {e}" if rank == "0" else f"error (process {rank}): {e}", file=sys.stderr)
        _tell_launcher(f"error: {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _end_progress_bars():
    """A training progress bar interrupted by the error would leave the message on its line."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", [])):
        bar.close()


def _tell_launcher(message: str):
    """Under `accelerate launch` (torch elastic), the launcher prints its own failure report
    after align's line; with the message in the worker's error file, that report's root cause
    is align's message instead of a link to torch's docs."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        import json
        import time

        try:
            with open(path, "w") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
        except OSError:
            pass


if __name__ == "__main__":
    main()
