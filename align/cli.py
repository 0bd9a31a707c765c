"""`align` command line: one sub-command per job, each a thin call into its module."""

from __future__ import annotations

import argparse
import os
import sys

from align.errors import AlignError


def cmd_run(args):
    from align import run
    from align.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    run.run(recipe, only=args.stage, dry_run=args.dry_run)


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
    return parser


def main(argv=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # datasets' per-file progress bars bury the messages that matter; training bars stay.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except AlignError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
