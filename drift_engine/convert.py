"""Import the DRIFT reference implementation's rollout JSONL into a ``RolloutSet``.

One JSON object per line, as the reference's generator
(src/generate_weighted_data_vllm_metamathqa.py) writes it::

    {"prompt_id": "sample_17", "gold": "12",
     "messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...},
                  {"role": "user", ...}, {"role": "assistant", ...}],
     "verifier": {"t1": 0, "t2": 1, "t3": 0, "t4": 0, "t5": 0},
     "turn_rewards": {"t1": 0.0, "t2": 1.0, "t3": 0.0, "t4": 0.0, "t5": 0.0},
     "reward_details": {"t1": {"env_reward": 0.0, "format_penalty": 0.0, "actions": ["7"], ...},
                        "t2": {...}},
     "t_star": 2, "answer_norms": ["7", "12"], "format_penalty": 0.0}

``verifier`` and ``turn_rewards`` cover every turn 1..max_turns, zero for turns the
trajectory never took (it stops at its first correct turn, ``t_star``, or when its actions
run out); ``reward_details`` covers the turns taken; ``answer_norms`` holds one normalised
answer per executed action (a turn whose format failed executes none and adds
``format_penalty``'s per-turn term; a turn may execute several). ``prompt_id``,
``messages``, ``turn_rewards``, ``answer_norms`` and ``format_penalty`` are required; the
other fields are checked against them when present. Returns and weights follow the
reference's src/weight_sft.py: R = Σ_t γ^(t-1) r_t + format_penalty − 0.5·(1 − distinct
non-empty answer_norms / len(answer_norms)), self-normalised within ``str(prompt_id)``.

Each conversation is tokenised exactly as ``tokenizer.apply_chat_template(messages,
tokenize=True)`` gives it. The k-th assistant message's tokens are the ones its message
adds after the generation prompt: tokens of ``apply_chat_template(messages[:m + 1])``
beyond ``apply_chat_template(messages[:m], add_generation_prompt=True)``, ending at the
turn's end-of-turn token (the tokenizer's eos) when the template appends scaffolding after
it. Both renderings must be prefixes of the full one; templates that re-render earlier
turns once later ones exist (for example by stripping reasoning) are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from drift_engine.data.rollouts import (
    META_REFERENCE_MODEL,
    META_SAMPLING,
    RolloutSet,
    tokenizer_fingerprint,
    validate_rollouts,
)
from drift_engine.errors import DriftError, RolloutFormatError
from drift_engine.weighting import (
    REPEAT_PENALTY_COEF,
    WeightingConfig,
    attach_weights,
    compute_returns,
)

REQUIRED_FIELDS = ("prompt_id", "messages", "turn_rewards", "answer_norms", "format_penalty")
ROLES = ("system", "user", "assistant")
META_SOURCE = "source"
_TURN_KEY = re.compile(r"t([1-9][0-9]*)")


@dataclass(frozen=True)
class ConvertReport:
    num_trajectories: int
    num_groups: int
    num_tokens: int
    num_assistant_turns: int
    num_trained_tokens_last: int  # tokens of the last assistant turns
    num_trained_tokens_all: int  # tokens of all assistant turns
    max_turns: tuple[int, ...] = ()  # distinct max_turns (reward keys per record) in the file
    solved_at: tuple[int, ...] = ()  # solved_at[k-1]: trajectories whose t_star is k
    num_with_t_star: int = 0  # records that say whether they were solved

    def summary(self) -> str:
        text = (
            f"{self.num_trajectories} trajectories in {self.num_groups} prompt groups, "
            f"{self.num_tokens} tokens, {self.num_assistant_turns} assistant turns "
            f"({self.num_trained_tokens_last} tokens in last turns, "
            f"{self.num_trained_tokens_all} in all turns)"
        )
        if self.num_with_t_star:
            by_turn = ", ".join(f"turn {k}: {n}" for k, n in enumerate(self.solved_at, 1) if n)
            text += f"; solved {sum(self.solved_at)} of {self.num_with_t_star}" + (
                f" ({by_turn})" if by_turn else ""
            )
        if self.max_turns:
            text += f"; max_turns {', '.join(map(str, self.max_turns))}"
        return text


@dataclass(frozen=True)
class _Record:
    group_key: str  # str(prompt_id), the reference's grouping
    rewards: list[float]  # one per assistant turn
    max_turns: int  # reward keys t1..t{max_turns}
    format_penalty: float
    repeat_penalty: float  # signed, <= 0
    t_star: int | None | bool  # False: the record does not say


def convert_reference_jsonl(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    weighting: WeightingConfig | None = None,
    reference_model: str | None = None,
) -> tuple[RolloutSet, ConvertReport]:
    """Read the reference JSONL at ``path`` into a validated ``RolloutSet``.

    Trajectories keep file order; group ids number the distinct ``str(prompt_id)`` values in
    order of first appearance. With ``weighting``, returns and weights are computed (in
    float64, from the file's values) and stored.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DriftError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; use the "
            "tokenizer of the chat model that produced the rollouts (its tokenizer_config.json "
            "or chat_template.jinja carries the template)"
        )
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RolloutFormatError(f"cannot read {str(path)!r}: {err}") from err

    eos_id = getattr(tokenizer, "eos_token_id", None)
    token_ids, turn_ids, records = [], [], []
    group_of: dict[str, int] = {}
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{line_no}"
        raw = _parse_json(line, where)
        tokens, turns, n_assistant = _tokenise(raw["messages"], tokenizer, eos_id, where)
        records.append(_check_record(raw, n_assistant, where))
        token_ids.append(tokens)
        turn_ids.append(turns)
        group_of.setdefault(records[-1].group_key, len(group_of))
    if not records:
        raise RolloutFormatError(f"{str(path)!r} holds no records (one JSON object per line)")

    max_turns = sorted({r.max_turns for r in records})
    metadata = {**tokenizer_fingerprint(tokenizer), META_SOURCE: path.name}
    if len(max_turns) == 1:
        metadata[META_SAMPLING] = json.dumps({"max_turns": max_turns[0]})
    if reference_model:
        metadata[META_REFERENCE_MODEL] = reference_model
    rollouts = RolloutSet.from_trajectories(
        token_ids,
        turn_ids,
        [group_of[r.group_key] for r in records],
        [r.rewards for r in records],
        format_penalty=[r.format_penalty for r in records],
        repeat_penalty=[r.repeat_penalty for r in records],
        metadata=metadata,
    )
    if weighting is not None:
        width = rollouts.max_turns
        rewards = torch.tensor(
            [r.rewards + [math.nan] * (width - len(r.rewards)) for r in records],
            dtype=torch.float64,
        )  # (S, K), the file's values (the stored ones are float32)
        returns = compute_returns(
            rewards,
            weighting.gamma,
            torch.tensor([r.format_penalty for r in records], dtype=torch.float64),
            torch.tensor([r.repeat_penalty for r in records], dtype=torch.float64),
            dtype=torch.float64,
        )
        rollouts = attach_weights(rollouts, weighting, returns=returns)
    validate_rollouts(rollouts, tokenizer=tokenizer)
    solved = Counter(r.t_star for r in records if r.t_star is not False and r.t_star is not None)
    turns_t = rollouts.turn_ids
    report = ConvertReport(
        num_trajectories=rollouts.num_trajectories,
        num_groups=len(group_of),
        num_tokens=rollouts.num_tokens,
        num_assistant_turns=sum(len(r.rewards) for r in records),
        num_trained_tokens_last=int(rollouts.trained_mask("last").sum()),
        num_trained_tokens_all=int((turns_t > 0).sum()),
        max_turns=tuple(max_turns),
        solved_at=tuple(solved.get(k, 0) for k in range(1, max(solved, default=0) + 1)),
        num_with_t_star=sum(1 for r in records if r.t_star is not False),
    )
    return rollouts, report


def reference_repeat_penalty(answer_norms: list[str | None]) -> float:
    """weight_sft.py's repetition penalty, signed: −0.5·(1 − distinct non-empty answers /
    all entries); empty or null entries count in the denominator only."""
    if not answer_norms:
        return 0.0
    distinct = {str(a) for a in answer_norms if a}
    return -max(0.0, REPEAT_PENALTY_COEF * (1.0 - len(distinct) / len(answer_norms)))


def normalize_answer(text: str) -> str:
    """The reference's answer normalisation: stripped, lower-cased, whitespace removed."""
    return re.sub(r"\s+", "", text.strip().lower()) if text else ""


def _parse_json(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise RolloutFormatError(
            f"{where}: not valid JSON ({err.msg} at column {err.colno})"
        ) from err
    if not isinstance(record, dict):
        raise RolloutFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise RolloutFormatError(
            f"{where}: missing field(s) {missing}; each line needs {list(REQUIRED_FIELDS)}"
        )
    messages = record["messages"]
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise RolloutFormatError(
            f"{where}: messages must be a non-empty list of {{'role': 'system'|'user'|"
            "'assistant', 'content': string}} objects"
        )
    if messages[-1]["role"] != "assistant":
        raise RolloutFormatError(
            f"{where}: the conversation ends with a {messages[-1]['role']!r} message; the "
            "reference's trajectories end with the assistant turn that is trained"
        )
    return record


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RolloutFormatError(f"{where}: {what} must be a finite number, got {value!r}")
    return float(value)


def _turn_map(raw: Any, name: str, n_assistant: int, where: str) -> dict[int, Any]:
    """{k: value} of a ``{"t1": ..., "tM": ...}`` object with M >= n_assistant."""
    turns = {}
    if isinstance(raw, dict):
        for key, value in raw.items():
            match = _TURN_KEY.fullmatch(key)
            if match is None:
                turns = None
                break
            turns[int(match.group(1))] = value
    if (
        not isinstance(raw, dict)
        or turns is None
        or sorted(turns) != list(range(1, len(turns) + 1))
    ):
        raise RolloutFormatError(
            f"{where}: {name} must map 't1', 't2', ... 'tM' (every turn up to max_turns, "
            f"as the reference writes), got {raw!r}"
        )
    if len(turns) < n_assistant:
        raise RolloutFormatError(
            f"{where}: {name} covers turns t1..t{len(turns)} but the conversation has "
            f"{n_assistant} assistant turns; it needs one entry per turn up to max_turns"
        )
    return turns


def _check_record(raw: dict[str, Any], n: int, where: str) -> _Record:
    """The record's values, checked against its ``n`` assistant turns and each other."""
    prompt_id = raw["prompt_id"]
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)) or prompt_id == "":
        raise RolloutFormatError(
            f"{where}: prompt_id must be a non-empty string (or an integer), got {prompt_id!r}"
        )
    if "gold" in raw and not isinstance(raw["gold"], str):
        raise RolloutFormatError(f"{where}: gold must be a string, got {raw['gold']!r}")

    rewards = {
        k: _number(v, f"turn_rewards['t{k}']", where)
        for k, v in _turn_map(raw["turn_rewards"], "turn_rewards", n, where).items()
    }
    max_turns = len(rewards)
    for k in range(n + 1, max_turns + 1):
        if rewards[k] != 0.0:
            raise RolloutFormatError(
                f"{where}: turn_rewards['t{k}'] is {rewards[k]!r} but the conversation has only "
                f"{n} assistant turns; the reference writes 0 for turns never taken"
            )
    format_penalty = _number(raw["format_penalty"], "format_penalty", where)

    answers = raw["answer_norms"]
    if not isinstance(answers, list) or not all(a is None or isinstance(a, str) for a in answers):
        raise RolloutFormatError(
            f"{where}: answer_norms must be a list of strings (one normalised answer per "
            f"executed action), got {answers!r}"
        )

    t_star: int | None | bool = False
    solved = None  # turn the verifier marks correct
    if "verifier" in raw:
        verifier = _turn_map(raw["verifier"], "verifier", n, where)
        if sorted(verifier) != sorted(rewards):
            raise RolloutFormatError(
                f"{where}: verifier covers turns t1..t{len(verifier)} but turn_rewards covers "
                f"t1..t{max_turns}; the reference writes both for every turn up to max_turns"
            )
        if not all(type(v) is int and v in (0, 1) for v in verifier.values()):
            raise RolloutFormatError(
                f"{where}: verifier values must be 0 or 1, got {raw['verifier']!r}"
            )
        correct = [k for k, v in sorted(verifier.items()) if v == 1]
        if correct and correct != [n]:
            raise RolloutFormatError(
                f"{where}: verifier marks turn(s) {correct} correct in a conversation of {n} "
                "assistant turns; the reference stops at the first correct turn, so only the "
                "last assistant turn can be marked"
            )
        solved = correct[0] if correct else None
    if "t_star" in raw:
        t_star = raw["t_star"]
        if t_star is not None and (type(t_star) is not int or t_star != n):
            raise RolloutFormatError(
                f"{where}: t_star is {t_star!r} in a conversation of {n} assistant turns; it "
                f"is null (never solved) or the last assistant turn ({n}), where the "
                "reference stopped"
            )
        if "verifier" in raw and t_star != solved:
            raise RolloutFormatError(
                f"{where}: t_star is {t_star!r} but the verifier marks "
                f"{'turn ' + str(solved) if solved else 'no turn'} correct"
            )
    elif "verifier" in raw:
        t_star = solved

    if "reward_details" in raw:
        _check_details(raw["reward_details"], n, rewards, format_penalty, answers, where)

    return _Record(
        group_key=str(prompt_id),
        rewards=[rewards[k] for k in range(1, n + 1)],
        max_turns=max_turns,
        format_penalty=format_penalty,
        repeat_penalty=reference_repeat_penalty(answers),
        t_star=t_star,
    )


def _check_details(
    raw: Any,
    n: int,
    rewards: dict[int, float],
    format_penalty: float,
    answers: list[str | None],
    where: str,
) -> None:
    """``reward_details`` (one entry per turn taken) agrees with the record's totals."""
    details = _turn_map(raw, "reward_details", n, where)
    if len(details) != n:
        raise RolloutFormatError(
            f"{where}: reward_details covers turns t1..t{len(details)} but the conversation has "
            f"{n} assistant turns; the reference writes one entry per turn taken"
        )
    total_penalty, actions = 0.0, []
    for k, entry in sorted(details.items()):
        what = f"reward_details['t{k}']"
        if not isinstance(entry, dict) or not {"env_reward", "format_penalty", "actions"} <= set(
            entry
        ):
            raise RolloutFormatError(
                f"{where}: {what} must be an object with env_reward, format_penalty and actions"
            )
        env_reward = _number(entry["env_reward"], f"{what}['env_reward']", where)
        if env_reward != rewards[k]:
            raise RolloutFormatError(
                f"{where}: {what}['env_reward'] is {env_reward!r} but turn_rewards['t{k}'] is "
                f"{rewards[k]!r}"
            )
        total_penalty += _number(entry["format_penalty"], f"{what}['format_penalty']", where)
        executed = entry["actions"]
        if not isinstance(executed, list) or not all(isinstance(a, str) for a in executed):
            raise RolloutFormatError(f"{where}: {what}['actions'] must be a list of strings")
        actions += executed
    if not math.isclose(total_penalty, format_penalty, rel_tol=1e-9, abs_tol=1e-12):
        raise RolloutFormatError(
            f"{where}: format_penalty is {format_penalty!r} but the turns' format penalties in "
            f"reward_details sum to {total_penalty!r}"
        )
    if [normalize_answer(a) for a in actions] != answers:
        raise RolloutFormatError(
            f"{where}: answer_norms {answers!r} are not the normalised actions of "
            f"reward_details {actions!r} (one entry per executed action, in order)"
        )


def _chat_ids(
    tokenizer: Any, messages: list[dict], add_generation_prompt: bool, where: str
) -> list[int]:
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
    except Exception as err:  # Jinja errors and the template's own raise_exception calls
        raise RolloutFormatError(
            f"{where}: the chat template failed on this conversation: {err}"
        ) from err
    if isinstance(out, Mapping):
        out = out["input_ids"]
    return list(out)


def _tokenise(
    messages: list[dict], tokenizer: Any, eos_id: int | None, where: str
) -> tuple[list[int], list[int], int]:
    """(token ids, turn ids, number of assistant turns) of one conversation."""
    full = _chat_ids(tokenizer, messages, False, where)
    turns = [0] * len(full)
    k = 0
    for m, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        k += 1
        before = _chat_ids(tokenizer, messages[:m], True, where) if m else []
        upto = _chat_ids(tokenizer, messages[: m + 1], False, where)
        for name, prefix in (("before", before), ("through", upto)):
            if full[: len(prefix)] != prefix:
                raise RolloutFormatError(
                    f"{where}: the chat template renders the conversation {name} assistant "
                    f"turn {k} differently from the full conversation, so turn boundaries "
                    "cannot be found by prefix tokenisation (templates that rewrite earlier "
                    "turns, e.g. by dropping reasoning, are not supported)"
                )
        start, end = len(before), len(upto)
        # Scaffolding the template adds after the end-of-turn token (e.g. a newline) was
        # not produced by the policy: keep it as context.
        if eos_id is not None and eos_id in full[start:end]:
            end = start + max(i for i, t in enumerate(full[start:end]) if t == eos_id) + 1
        if end <= start:
            raise RolloutFormatError(
                f"{where}: assistant turn {k} adds no tokens after the generation prompt"
            )
        turns[start:end] = [k] * (end - start)
    if k == 0:
        raise RolloutFormatError(f"{where}: the conversation has no assistant message")
    return full, turns, k
