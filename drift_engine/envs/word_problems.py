"""Seeded arithmetic word problems with integer answers, for the ``math`` environment.

Two levels. ``standard``: ten templates, with two or three operands and the operations
+ − ×, operands up to 150 (operands before a plural noun are at least 2). ``easy``: five of
those templates with one-digit operands (sums and products of small numbers, a first
step for models of ~100M parameters). Every answer is a non-negative integer. Each problem
is a ``math`` problem (``question``, ``answer``) with ``id``, ``template`` and
``expression`` (the arithmetic the question asks for, e.g. ``"(7 + 5) * 3"``) kept
alongside. The package ships a train and a held-out split of each level, disjoint in their
questions (at the easy level the arithmetic itself repeats: there are few one-digit sums),
regenerated with::

    python -m drift_engine.envs.word_problems --out-dir drift_engine/envs/data

(seed 0, 1000 train and 400 held-out problems per level; ``arithmetic-train.jsonl``,
``arithmetic-heldout.jsonl``, ``arithmetic-easy-train.jsonl``,
``arithmetic-easy-heldout.jsonl``). ``shipped_problems("train", level="easy")`` is the path of
a shipped split, ready for ``--env math --problems PATH``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from drift_engine.errors import ConfigError

DATA_DIR = Path(__file__).parent / "data"
SPLITS = ("train", "heldout")
ProblemLevel = Literal["standard", "easy"]
LEVELS: tuple[str, ...] = get_args(ProblemLevel)
DEFAULT_SEED = 0
DEFAULT_SIZES = {"train": 1000, "heldout": 400}

NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Hugo", "Iris", "Jonas", "Mei", "Omar",
         "Priya", "Sofia", "Tariq", "Yuki", "Zoe")  # fmt: skip
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards",
         "buttons", "crayons")  # fmt: skip


@dataclass(frozen=True)
class Template:
    """A question with operand slots a, b (and c), how to draw the operands, and the
    arithmetic: ``expression`` is a Python expression over a, b, c (only + - * and brackets)."""

    name: str
    text: str
    expression: str
    draw: Callable[[random.Random], tuple[int, ...]]


def _draw_sub2(rng: random.Random) -> tuple[int, ...]:
    a = rng.randint(10, 99)
    return a, rng.randint(1, a)


def _draw_add_sub3(rng: random.Random) -> tuple[int, ...]:
    a, b = rng.randint(5, 60), rng.randint(2, 40)
    return a, b, rng.randint(1, a + b)


def _draw_mul_sub3(rng: random.Random) -> tuple[int, ...]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return a, b, rng.randint(2, a * b)


def _draw_sub_mul3(rng: random.Random) -> tuple[int, ...]:
    a = rng.randint(4, 30)
    return a, rng.randint(2, a - 1), rng.randint(2, 9)


def _draw_sub3(rng: random.Random) -> tuple[int, ...]:
    a = rng.randint(20, 150)
    b = rng.randint(2, a - 2)
    return a, b, rng.randint(2, a - b)


TEMPLATES = (
    Template(
        "add2",
        "{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?",
        "a + b",
        lambda rng: (rng.randint(2, 99), rng.randint(2, 99)),
    ),
    Template(
        "sub2",
        "{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} "
        "have left?",
        "a - b",
        _draw_sub2,
    ),
    Template(
        "mul2",
        "A box holds {a} {item}. How many {item} are there in {b} such boxes?",
        "a * b",
        lambda rng: (rng.randint(2, 25), rng.randint(2, 12)),
    ),
    Template(
        "add3",
        "{name} collects {item}: {a} on Monday, {b} on Tuesday and {c} on Wednesday. How "
        "many {item} did {name} collect in these three days?",
        "a + b + c",
        lambda rng: (rng.randint(1, 60), rng.randint(1, 60), rng.randint(1, 60)),
    ),
    Template(
        "sub3",
        "{name} had {a} dollars, spent {b} dollars on lunch and {c} dollars on a book. How "
        "many dollars does {name} have left?",
        "a - b - c",
        _draw_sub3,
    ),
    Template(
        "add_sub3",
        "{name} has {a} {item}, receives {b} more and then loses {c}. How many {item} does "
        "{name} have now?",
        "a + b - c",
        _draw_add_sub3,
    ),
    Template(
        "mul_add3",
        "{name} buys {a} packs of {item} with {b} in each pack and finds {c} more. How many "
        "{item} does {name} have in total?",
        "a * b + c",
        lambda rng: (rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 30)),
    ),
    Template(
        "mul_sub3",
        "A shop has {a} shelves with {b} {item} on each shelf. It sells {c} {item}. How many "
        "{item} are left in the shop?",
        "a * b - c",
        _draw_mul_sub3,
    ),
    Template(
        "add_mul3",
        "{name} reads {a} pages in the morning and {b} pages in the evening, every day for "
        "{c} days. How many pages does {name} read in total?",
        "(a + b) * c",
        lambda rng: (rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)),
    ),
    Template(
        "sub_mul3",
        "A ticket costs {a} dollars, and members get {b} dollars off each ticket. How many "
        "dollars does a member pay for {c} tickets?",
        "(a - b) * c",
        _draw_sub_mul3,
    ),
)


def _one_digit(count: int, low: int = 1) -> Callable[[random.Random], tuple[int, ...]]:
    return lambda rng: tuple(rng.randint(low, 9) for _ in range(count))


def _draw_easy_sub2(rng: random.Random) -> tuple[int, ...]:
    a = rng.randint(2, 9)
    return a, rng.randint(1, a - 1)


def _draw_easy_add_sub3(rng: random.Random) -> tuple[int, ...]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return a, b, rng.randint(1, min(9, a + b))


_EASY_DRAWS = {
    "add2": _one_digit(2, low=2),
    "sub2": _draw_easy_sub2,
    "mul2": _one_digit(2, low=2),
    "add3": _one_digit(3),
    "add_sub3": _draw_easy_add_sub3,
}
LEVEL_TEMPLATES = {
    "standard": TEMPLATES,
    "easy": tuple(
        dataclasses.replace(t, draw=_EASY_DRAWS[t.name]) for t in TEMPLATES if t.name in _EASY_DRAWS
    ),
}


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(node: ast.expr, values: dict[str, int]) -> int:
    """A template expression (names a, b, c; + - *; brackets) at ``values``."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](
            _evaluate(node.left, values), _evaluate(node.right, values)
        )
    if isinstance(node, ast.Name) and node.id in values:
        return values[node.id]
    raise ValueError(f"unsupported template expression {ast.dump(node)}")


def make_problem(template: Template, rng: random.Random) -> dict[str, str]:
    """One problem of ``template``: its question, answer and the arithmetic behind it."""
    operands = template.draw(rng)
    values = dict(zip("abc", operands, strict=False))
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    answer = _evaluate(ast.parse(template.expression, mode="eval").body, values)
    expression = re.sub(r"[abc]", lambda m: str(values[m.group()]), template.expression)
    return {
        "question": template.text.format(name=name, item=item, **values),
        "answer": str(answer),
        "template": template.name,
        "expression": expression,
    }


def generate_splits(
    seed: int = DEFAULT_SEED, sizes: dict[str, int] | None = None, level: str = "standard"
) -> dict[str, list[dict[str, str]]]:
    """Problems of each split, from one seeded stream: the level's templates in turn, every
    question distinct (so the splits share none), then shuffled and cut into the splits in
    order."""
    templates = _level_templates(level)
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    if any(not isinstance(n, int) or n < 1 for n in sizes.values()):
        raise ConfigError(f"split sizes must be positive integers, got {sizes}")
    rng = random.Random(seed)
    total = sum(sizes.values())
    pool: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(pool) < total:
        attempts += 1
        if attempts > 50 * total:
            raise ConfigError(f"cannot draw {total} distinct problems; ask for fewer")
        problem = make_problem(templates[len(pool) % len(templates)], rng)
        if problem["question"] not in seen:
            seen.add(problem["question"])
            pool.append(problem)
    rng.shuffle(pool)
    splits, start = {}, 0
    for split, n in sizes.items():
        splits[split] = [
            {"id": f"{_ID_PREFIX[level]}-{split}-{i:05d}", **p}
            for i, p in enumerate(pool[start : start + n])
        ]
        start += n
    return splits


_ID_PREFIX = {"standard": "arith", "easy": "arith-easy"}


def _level_templates(level: str) -> tuple[Template, ...]:
    if level not in LEVEL_TEMPLATES:
        raise ConfigError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    return LEVEL_TEMPLATES[level]


def _stem(level: str) -> str:
    return "arithmetic" if level == "standard" else f"arithmetic-{level}"


def split_path(out_dir: str | Path, split: str, level: str = "standard") -> Path:
    _level_templates(level)
    return Path(out_dir) / f"{_stem(level)}-{split}.jsonl"


def write_splits(
    out_dir: str | Path,
    seed: int = DEFAULT_SEED,
    sizes: dict[str, int] | None = None,
    levels: tuple[str, ...] = LEVELS,
) -> list[Path]:
    """Write each split of each level as JSONL (one problem per line, keys sorted) into
    ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for level in levels:
        written += _write_level(out_dir, seed, sizes, level)
    return written


def _write_level(out_dir: Path, seed: int, sizes: dict[str, int] | None, level: str) -> list[Path]:
    written = []
    for split, problems in generate_splits(seed, sizes, level).items():
        path = split_path(out_dir, split, level)
        path.write_text(
            "".join(json.dumps(p, sort_keys=True) + "\n" for p in problems), encoding="utf-8"
        )
        written.append(path)
    return written


def shipped_problems(split: str = "train", level: str = "standard") -> Path:
    """Path of the shipped ``train`` or ``heldout`` split of ``level`` (seed 0, default
    sizes)."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    return split_path(DATA_DIR, split, level)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m drift_engine.envs.word_problems",
        description="Write seeded arithmetic word problems (train and held-out JSONL splits).",
    )
    parser.add_argument("--out-dir", default=str(DATA_DIR))
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--train", type=int, default=DEFAULT_SIZES["train"])
    parser.add_argument("--heldout", type=int, default=DEFAULT_SIZES["heldout"])
    parser.add_argument("--level", choices=LEVELS, action="append",
                        help="Level to write (repeatable; default: every level).")  # fmt: skip
    args = parser.parse_args(argv)
    sizes = {"train": args.train, "heldout": args.heldout}
    for path in write_splits(args.out_dir, args.seed, sizes, tuple(args.level or LEVELS)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
