"""Problem loading: JSONL files (one JSON object per line) or Hugging Face datasets by name.

Field names are configurable: ``fields={"question": "problem", "answer": "solution"}`` reads
the environment's ``question`` from each record's ``problem`` field, and so on. Other fields
are kept as they are, so environments can read extra keys.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from drift_engine.envs.base import Environment, Problem
from drift_engine.errors import EnvironmentSpecError

HF_PREFIX = "hf:"


def _rename(record: dict[str, Any], fields: Mapping[str, str], where: str) -> Problem:
    missing = [src for src in fields.values() if src not in record]
    if missing:
        raise EnvironmentSpecError(
            f"{where}: field(s) {', '.join(repr(m) for m in missing)} not found (the record has "
            f"{', '.join(repr(k) for k in record) or 'no fields'}); fix the field mapping "
            "(--field NAME=FILE_FIELD)."
        )
    problem = dict(record)
    for name, src in fields.items():
        problem[name] = record[src]
    return problem


class _NonFinite(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400
        raise _NonFinite(text)
    return value


def _no_constant(name: str) -> float:  # NaN, Infinity, -Infinity
    raise _NonFinite(name)


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise EnvironmentSpecError(f"cannot read the problem file {str(path)!r}: {err}") from None
    records = []
    for line_number, raw in enumerate(data.splitlines(), start=1):
        where = f"{path}:{line_number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise EnvironmentSpecError(
                f"{where}: not UTF-8 text (byte {err.start + 1} of the line); save the problem "
                "file as UTF-8."
            ) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_float=_finite_float, parse_constant=_no_constant)
        except json.JSONDecodeError as err:
            raise EnvironmentSpecError(
                f"{where}: not valid JSON ({err.msg}); a problem file has one JSON object per line."
            ) from None
        except _NonFinite as err:
            raise EnvironmentSpecError(
                f"{where}: {err} is not a finite number; problem values must be finite "
                "(write it as a string if it is text)."
            ) from None
        if not isinstance(record, dict):
            raise EnvironmentSpecError(
                f"{where}: expected a JSON object per line, got {type(record).__name__}."
            )
        records.append((where, record))
    return records


def _read_hf(name: str, split: str, subset: str | None) -> list[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise EnvironmentSpecError(
            f"loading the Hugging Face dataset {name!r} needs the `datasets` package: "
            "pip install datasets (or export the problems to a JSONL file)."
        ) from None
    try:
        data = datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # network, unknown name, unknown split: all user-fixable
        raise EnvironmentSpecError(
            f"could not load the Hugging Face dataset {name!r} (subset={subset!r}, "
            f"split={split!r}): {err}"
        ) from None
    return [(f"{name}[{split}][{i}]", dict(row)) for i, row in enumerate(data)]


def load_problems(
    source: str | Path,
    *,
    fields: Mapping[str, str] | None = None,
    env: Environment | None = None,
    limit: int | None = None,
    split: str = "test",
    subset: str | None = None,
) -> list[Problem]:
    """Read problems from a JSONL file, or from ``hf:NAME`` (a Hugging Face dataset).

    fields: environment field name → name in the source records.
    env: when given, each problem is checked with ``env.validate_problem``.
    limit: keep the first ``limit`` problems.
    split, subset: for Hugging Face datasets.
    """
    source_str = str(source)
    if source_str.startswith(HF_PREFIX):
        records = _read_hf(source_str[len(HF_PREFIX) :], split, subset)
    else:
        path = Path(source)
        if not path.is_file():
            raise EnvironmentSpecError(
                f"problem file {source_str!r} not found; pass a JSONL file (one JSON object per "
                f"line) or {HF_PREFIX}NAME for a Hugging Face dataset."
            )
        records = _read_jsonl(path)
    if limit is not None:
        if limit < 1:
            raise EnvironmentSpecError(f"limit must be at least 1, got {limit}.")
        records = records[:limit]
    if not records:
        raise EnvironmentSpecError(
            f"no problems in {source_str!r}: the source is empty (one JSON object per line "
            "expected)."
        )
    problems = []
    for where, record in records:
        problem = _rename(record, fields or {}, where)
        if env is not None:
            try:
                env.validate_problem(problem)
            except EnvironmentSpecError as err:
                raise EnvironmentSpecError(f"{where}: {err}") from None
        problems.append(problem)
    return problems


def parse_field_mapping(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["question=problem", "answer=solution"]`` → ``{"question": "problem", ...}``."""
    mapping = {}
    for item in items:
        name, sep, src = item.partition("=")
        if not sep or not name.strip() or not src.strip():
            raise EnvironmentSpecError(
                f"field mapping {item!r} must look like NAME=FILE_FIELD, e.g. question=problem."
            )
        mapping[name.strip()] = src.strip()
    return mapping
