"""The DRIFT reference's rollout records and weights, transcribed for tests.

``generate_records`` builds trajectories record by record with the logic of the reference's
generator (2020-qqtcg/DRIFT: src/generate_weighted_data_vllm_metamathqa.py, ``process_turn``
and ``main``, with src/prompting.py's prompts, answer parsing and ``MultiTurnAnswerEpisode``),
with a seeded scripted policy in place of vLLM. ``reference_weights`` is src/weight_sft.py's
``add_weights_to_dataset`` arithmetic on the same rows, in plain Python floats.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any

# ------------------------------------------------------------------ src/prompting.py

SYSTEM_MESSAGE = "You're a helpful assistant. "
ENV_INSTRUCTION = (
    "You are solving Math problems. Only give the final answer between <answer> and </answer>."
)
ACTION_SEP = "||"
SPECIAL_TOKENS = ("<think>", "</think>", "<answer>", "</answer>", "<|im_start|>", "<|im_end|>")
INCORRECT_OBS = "Incorrect. Please think again."


def normalize_answer(text: str) -> str:
    if not text:
        return ""
    return re.sub(r"\s+", "", text.strip().lower())


def _format_prompt(enable_think: bool) -> str:
    if enable_think:
        return "<think> [Your thoughts] </think> <answer> [your answer] </answer>"
    return "<answer> [your answer] </answer>"


def build_turn_block(turn, state, actions_left, instruction_max_tokens, enable_think) -> str:
    return (
        f"Turn {turn}:\nState:\n{state}\n"
        f"You have {actions_left} actions left. Always output: {_format_prompt(enable_think)} "
        f"with no extra text. Strictly follow this format. "
        f"Max response length: {instruction_max_tokens} words (tokens).\n"
    )


def build_initial_messages(state, actions_left, instruction_max_tokens, enable_think, mode):
    if mode == "simple":
        user = (
            ENV_INSTRUCTION + "\n\nProblem:\n" + state + "\n\n"
            f"Always output: {_format_prompt(enable_think)} with no extra text. "
            "Strictly follow this format."
        )
    else:
        user = (
            ENV_INSTRUCTION
            + "\n"
            + build_turn_block(1, state, actions_left, instruction_max_tokens, enable_think)
        )
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": user}]


def build_reward_message(reward, turn, state, actions_left, instruction_max_tokens, enable_think,
                         mode):  # fmt: skip
    if mode == "simple":
        return {"role": "user", "content": INCORRECT_OBS}
    content = f"Reward:\n{reward}\n" + build_turn_block(
        turn, state, actions_left, instruction_max_tokens, enable_think
    )
    return {"role": "user", "content": content}


def parse_response(response, enable_think, action_sep, max_actions_per_turn):
    pattern = (
        r"<think>(.*?)</think>\s*<answer>(.*?)</answer>"
        if enable_think
        else r"<answer>(.*?)</answer>"
    )
    match = re.search(pattern, response, re.DOTALL)
    if not match:
        return response, []
    think = match.group(1) if enable_think else ""
    action_content = match.group(2) if enable_think else match.group(1)
    for token in SPECIAL_TOKENS:
        think = think.replace(token, "").strip()
        action_content = action_content.replace(token, "").strip()
    actions = [a.strip() for a in action_content.split(action_sep) if a.strip()]
    if max_actions_per_turn > 0 and len(actions) > max_actions_per_turn:
        actions = actions[:max_actions_per_turn]
        action_content = (" " + action_sep + " ").join(actions)
    if enable_think:
        return f"<think>{think}</think><answer>{action_content}</answer>", actions
    return f"<answer>{action_content}</answer>", actions


class Episode:
    """``MultiTurnAnswerEpisode`` with the default checker (normalised exact match)."""

    def __init__(self, question: str, answer: str, max_steps: int):
        self.correct_answer = answer or ""
        self.max_steps = max_steps
        self.step_num = 0
        self.unique: dict[str, int] = {}
        self.total_valid = 0
        self.state = question

    def step(self, action: str):
        normalized = normalize_answer(action.strip())
        is_valid = normalized != ""
        is_correct = bool(self.correct_answer) and normalized == normalize_answer(
            self.correct_answer
        )
        reward = 1.0 if is_correct else 0.0
        info: dict[str, Any] = {"action_is_valid": is_valid, "success": is_correct}
        if is_valid:
            key = normalize_answer(action)
            self.unique[key] = self.unique.get(key, 0) + 1
            self.total_valid += 1
            info["per_question_unique_answers_ratio"] = len(self.unique) / self.total_valid
            self.step_num += 1
        if is_correct or self.step_num >= self.max_steps:
            penalty = 0.5 * (1 - len(self.unique) / self.total_valid) if self.total_valid else 0.0
            info["global_repetition_penalty"] = penalty
            self.state = "Correct!"
            return self.state, reward, True, info
        self.state = INCORRECT_OBS
        return self.state, reward, False, info


def run_actions(episode: Episode, actions: list[str]):
    acc, done, info, executed = 0.0, False, {}, []
    for action in actions:
        _, reward, done, info = episode.step(action)
        acc += reward
        executed.append(action)
        if done:
            break
    return acc, done, info, executed


# ------------------------------------------- src/generate_weighted_data_vllm_metamathqa.py


@dataclass(frozen=True)
class Args:
    max_turns: int = 5
    max_actions_per_traj: int = 5
    max_actions_per_turn: int = 5
    format_penalty: float = -0.1
    instruction_max_tokens: int = 1000
    prompt_mode: str = "full"
    enable_think: bool = True


def process_turn(traj: dict, raw_output: str, turn_idx: int, args: Args) -> bool:
    prefix = "<think>" if args.enable_think else "<answer>"
    llm_response, actions = parse_response(
        prefix + (raw_output or ""), args.enable_think, ACTION_SEP, args.max_actions_per_turn
    )
    env_reward, done, info, executed, format_penalty = 0.0, False, {}, [], 0.0
    if actions and traj["actions_left"] > 0:
        available = min(traj["actions_left"], len(actions))
        env_reward, done, info, executed = run_actions(traj["episode"], actions[:available])
    else:
        format_penalty = args.format_penalty
    traj["actions_left"] = max(args.max_actions_per_traj - traj["episode"].step_num, 0)
    if traj["actions_left"] <= 0 and not done:
        done = True
    for action in executed:
        traj["answer_norms"].append(normalize_answer(action))
    traj["format_penalty"] += format_penalty
    traj["messages"].append({"role": "assistant", "content": llm_response})
    traj["turn_rewards"][f"t{turn_idx}"] = env_reward
    traj["reward_details"][f"t{turn_idx}"] = {
        "env_reward": env_reward,
        "format_penalty": format_penalty,
        "actions": executed,
        "parsed_actions": actions,
        "info": info,
    }
    correct = bool(info.get("success"))
    traj["verifier"][f"t{turn_idx}"] = 1 if correct else 0
    if correct and traj["t_star"] is None:
        traj["t_star"] = turn_idx
        done = True
    if not done and turn_idx < args.max_turns:
        traj["messages"].append(
            build_reward_message(
                env_reward, turn_idx + 1, traj["episode"].state, traj["actions_left"],
                args.instruction_max_tokens, args.enable_think, args.prompt_mode,
            )
        )  # fmt: skip
    traj["done"] = done or turn_idx >= args.max_turns
    return correct


def scripted_output(rng: random.Random, gold: str, turn: int) -> str:
    """What the model writes after the "<think>" the generator appends to the prompt: a
    correct or wrong answer, several answers at once, a repeated answer, or no parseable
    answer at all (the format penalty)."""
    wrong = str(rng.randint(0, 20))
    kinds = ["right", "wrong", "repeat", "multi", "unparsed"]
    kind = rng.choices(kinds, weights=[3, 4, 2, 1, 2])[0]
    if kind == "right":
        answer = gold
    elif kind == "repeat":
        answer = "7"
    elif kind == "multi":
        answer = f"{wrong} || 7 ||  {gold if rng.random() < 0.3 else wrong} "
    elif kind == "unparsed":
        return f"I think it is {wrong}"
    else:
        answer = wrong
    return f"Step {turn}: compute.</think> <answer>{answer}</answer>"


def generate_records(num_prompts: int, n: int, seed: int, args: Args = Args()) -> list[str]:
    """JSONL lines exactly as ``main`` writes them, for ``num_prompts`` arithmetic questions
    with ``n`` trajectories each."""
    rng = random.Random(seed)
    lines = []
    for idx in range(num_prompts):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        question, gold = f"What is {a} + {b}?", str(a + b)
        prompt_id = f"sample_{idx}"
        messages = build_initial_messages(
            question, args.max_actions_per_traj, args.instruction_max_tokens, args.enable_think,
            args.prompt_mode,
        )  # fmt: skip
        trajectories = []
        for _ in range(n):
            traj = {
                "prompt_id": prompt_id, "gold": gold,
                "messages": [dict(m) for m in messages],
                "verifier": {}, "turn_rewards": {}, "reward_details": {}, "t_star": None,
                "done": False, "episode": Episode(question, gold, args.max_actions_per_traj),
                "actions_left": args.max_actions_per_traj, "answer_norms": [],
                "format_penalty": 0.0,
            }  # fmt: skip
            process_turn(traj, scripted_output(rng, gold, 1), 1, args)
            trajectories.append(traj)
        for turn in range(2, args.max_turns + 1):
            for traj in [t for t in trajectories if not t["done"]]:
                process_turn(traj, scripted_output(rng, gold, turn), turn, args)
        for traj in trajectories:
            for turn in range(1, args.max_turns + 1):
                traj["verifier"].setdefault(f"t{turn}", 0)
                traj["turn_rewards"].setdefault(f"t{turn}", 0.0)
        for traj in trajectories:
            record = {
                "prompt_id": traj["prompt_id"],
                "gold": traj["gold"],
                "messages": traj["messages"],
                "verifier": {k: int(v) for k, v in traj["verifier"].items()},
                "turn_rewards": traj["turn_rewards"],
                "reward_details": traj["reward_details"],
                "t_star": traj["t_star"],
                "answer_norms": traj["answer_norms"],
                "format_penalty": traj["format_penalty"],
            }
            lines.append(json.dumps(record))
    return lines


# ------------------------------------------------------------------ src/weight_sft.py


def _compute_weights(returns: list[float], beta: float) -> list[float]:
    scaled = [r / beta for r in returns]
    m = max(scaled) if scaled else 0.0
    exp_shift = [math.exp(s - m) for s in scaled]
    denom = (sum(exp_shift) / max(len(exp_shift), 1)) + 1e-12
    return [v / denom for v in exp_shift]


def _trajectory_penalty(answer_norms: Any) -> float:
    if not isinstance(answer_norms, list) or not answer_norms:
        return 0.0
    seen: set[str] = set()
    new_count = 0
    for answer_norm in answer_norms:
        if not answer_norm:
            continue
        if str(answer_norm) in seen:
            continue
        seen.add(str(answer_norm))
        new_count += 1
    return max(0.0, 0.5 * (1.0 - new_count / len(answer_norms)))


def _discounted_return(turn_rewards: Any, gamma: float) -> float:
    turns = []
    for key, value in turn_rewards.items():
        if not isinstance(key, str) or not key.startswith("t") or not key[1:].isdigit():
            continue
        try:
            reward = float(value)
        except (TypeError, ValueError):
            reward = 0.0
        turns.append((int(key[1:]), reward))
    total = 0.0
    for turn_idx, reward in sorted(turns, key=lambda item: item[0]):
        total += (gamma ** (turn_idx - 1)) * reward
    return total


def reference_returns(rows: list[dict], gamma: float) -> list[float]:
    returns = []
    for row in rows:
        penalty = float(row.get("format_penalty") or 0.0)
        returns.append(
            _discounted_return(row["turn_rewards"], gamma)
            + penalty
            - _trajectory_penalty(row.get("answer_norms"))
        )
    return returns


def reference_weights(rows: list[dict], gamma: float, beta: float) -> list[float]:
    """``add_weights_to_dataset``: one weight per row, normalised within ``str(prompt_id)``."""
    returns = reference_returns(rows, gamma)
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(str(row["prompt_id"]), []).append(i)
    weights = [1.0] * len(rows)
    for indices in groups.values():
        for i, w in zip(
            indices, _compute_weights([returns[i] for i in indices], beta), strict=True
        ):
            weights[i] = float(w)
    return weights
