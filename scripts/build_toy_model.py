#!/usr/bin/env python
"""Build the embedded demo's reference policy (and the toy problems) into drift_engine/assets.

The model is a tiny Llama (about 0.09M parameters) with a word-level tokenizer and a
ChatML-style chat template, pretrained from scratch on synthetic guess-a-number games
(secret in 1..32, up to 5 guesses, "Higher."/"Lower." feedback) played by a mixture of
scripted habits: bisect (optimal), step by one towards the feedback, repeat the previous
guess, guess at random; each turn also slips to a random or malformed answer now and then.
The result explores (sampled, it sometimes bisects) but its greedy play follows its most
common habit, which ignores the feedback: the situation DRIFT is made for.

Everything is seeded (``--seed``): the same command on the same software rebuilds the same
files. The build takes a few minutes on two CPU cores. ``drift-engine demo --rebuild-model``
runs the same code into the demo's output folder instead.

    python scripts/build_toy_model.py     # -> drift_engine/assets/guess-model, guess-problems/
    python scripts/build_toy_model.py --out /tmp/toy --seed 1
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from drift_engine.demo import (
    DemoConfig,
    ToyModelConfig,
    build_toy_model,
    split_secrets,
    write_jsonl,
)
from drift_engine.envs.guess import guess_problems

# The source tree's copy, which the package ships (not the installed package's).
ASSETS = Path(__file__).resolve().parent.parent / "drift_engine" / "assets"


def main() -> None:
    defaults = ToyModelConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS / "guess-model")
    parser.add_argument(
        "--problems-dir",
        type=Path,
        default=ASSETS / "guess-problems",
        help="where the toy problem files (train.jsonl, eval.jsonl) go",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--num-games", type=int, default=defaults.num_games)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = dataclasses.replace(
        defaults, seed=args.seed, num_games=args.num_games, epochs=args.epochs
    )
    build_toy_model(args.out, config)

    # The demo's split of the secrets, as problem files for the CLI
    # (drift-engine rollout/eval --env guess --problems <assets>/guess-problems/train.jsonl).
    demo = DemoConfig()
    train, held_out = split_secrets(config.low, config.high, demo.num_eval, demo.split_seed)
    for name, secrets in (("train", train), ("eval", held_out)):
        path = write_jsonl(
            args.problems_dir / f"{name}.jsonl", guess_problems(secrets, config.low, config.high)
        )
        print(f"wrote {path} ({len(secrets)} problems)")


if __name__ == "__main__":
    main()
