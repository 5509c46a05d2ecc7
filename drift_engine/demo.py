"""The embedded end-to-end demo: DRIFT on guess-a-number with a tiny model, on a CPU.

Two parts:

* the toy reference policy: a word-level tokenizer with a ChatML-style template and a tiny
  Llama, pretrained on synthetic games played by a mixture of scripted habits (bisect,
  step by one, repeat the last guess, guess at random). Sampled, it explores: sometimes it
  uses the feedback well, often not; greedy, it follows its most common habit.
  ``scripts/build_toy_model.py`` builds it (seeded) into ``drift_engine/assets/guess-model``,
  which ships in the package;
  ``build_toy_model`` is the same code.
* ``run_demo``: reference policy -> multi-turn rollouts -> returns and DRIFT weights ->
  importance-weighted SFT, plus a rejection-sampling baseline (unweighted SFT on the
  successful trajectories of the same rollouts) -> multi@1..K of all three on held-out
  secrets, written as JSON, a table and a PNG plot.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from drift_engine.envs.base import Message
from drift_engine.envs.guess import (
    PLAYER_STYLES,
    GuessNumberEnv,
    guess_problems,
    scripted_guess,
)
from drift_engine.errors import ConfigError
from drift_engine.kernels.labels import IGNORE_INDEX
from drift_engine.weighting_config import WeightingConfig

if TYPE_CHECKING:
    from drift_engine.evaluate import MultiAtKResult

# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

PAD, UNK, IM_START, IM_END = "<pad>", "<unk>", "<|im_start|>", "<|im_end|>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# ChatML without a system prompt. Newlines are for humans: the word-level pre-tokenizer
# drops whitespace, so every message boundary is a token boundary and the template applied
# to a conversation tokenizes to the concatenation of its messages' tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Words of the environment's messages and of the malformed answers the habits produce.
_WORDS = "system user assistant Guess my number between and Higher Lower Answer with . ,"


def build_toy_tokenizer(max_number: int = 99):
    """A word-level tokenizer for guess-a-number: one token per word, punctuation run,
    integer 0..`max_number`, answer tag and ChatML marker. Unknown words map to <unk>."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, UNK, IM_START, IM_END]
    tags = [ANSWER_OPEN, ANSWER_CLOSE]
    vocab: dict[str, int] = {}
    for word in specials + tags + _WORDS.split() + [str(n) for n in range(max_number + 1)]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # The tags are ordinary (decoded) tokens, matched before pre-tokenization.
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=IM_END,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def encode_conversation(tokenizer, messages: list[Message]) -> tuple[list[int], list[bool]]:
    """Token ids of `messages` under the chat template, and which ids an assistant produced
    (its answer and the closing <|im_end|>): the tokens a policy is trained on."""
    ids: list[int] = []
    trained: list[bool] = []
    for message in messages:
        head = tokenizer.encode(f"{IM_START}{message['role']}\n", add_special_tokens=False)
        body = tokenizer.encode(f"{message['content']}{IM_END}", add_special_tokens=False)
        ids += head + body
        trained += [False] * len(head) + [message["role"] == "assistant"] * len(body)
    return ids, trained


# --------------------------------------------------------------------------------------
# The reference policy's pretraining games
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyModelConfig:
    """Everything that determines the shipped toy model (with the seed, it is reproducible)."""

    low: int = 1
    high: int = 32
    max_turns: int = 5
    # Share of pretraining games played by each habit (PLAYER_STYLES order).
    style_mix: tuple[float, ...] = (0.30, 0.15, 0.35, 0.20)
    # Per-turn slips of every habit: a uniform random guess, or a malformed answer.
    slip_random: float = 0.05
    slip_malformed: float = 0.03
    num_games: int = 12_000
    # Llama shape
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_number: int = 99
    # pretraining
    epochs: int = 3
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0


def play_scripted_game(
    env: GuessNumberEnv, problem: dict, style: str, config: ToyModelConfig, rng: random.Random
) -> list[Message]:
    """One conversation of a scripted player of `style` (with slips) against `env`."""
    low, high = env.bounds(problem)
    messages = env.initial_messages(problem)
    history: list[tuple[int | None, str]] = []
    for turn in range(1, config.max_turns + 1):
        guess = scripted_guess(style, low, high, history, rng)
        slip = rng.random()
        if slip < config.slip_random:
            guess = rng.randint(low, high)
        if slip > 1.0 - config.slip_malformed:
            # The two malformed answers a model imitating the prompt tends to produce.
            answer = rng.choice([f"{ANSWER_OPEN}number{ANSWER_CLOSE}", f"{ANSWER_OPEN}{guess}"])
        else:
            answer = f"{ANSWER_OPEN}{guess}{ANSWER_CLOSE}"
        result = env.step(problem, answer, turn)
        messages.append({"role": "assistant", "content": answer})
        if result.done:
            break
        guessed = None if result.answer is None else int(result.answer)
        history.append((guessed, result.feedback))
        if turn < config.max_turns:
            messages.append({"role": "user", "content": result.feedback})
    return messages


def pretraining_games(config: ToyModelConfig, rng: random.Random) -> list[list[Message]]:
    env = GuessNumberEnv(low=config.low, high=config.high)
    games = []
    for _ in range(config.num_games):
        problem = {"secret": rng.randint(config.low, config.high)}
        style = rng.choices(PLAYER_STYLES, weights=config.style_mix)[0]
        games.append(play_scripted_game(env, problem, style, config, rng))
    return games


# --------------------------------------------------------------------------------------
# The tiny model and its pretraining
# --------------------------------------------------------------------------------------


def new_toy_model(config: ToyModelConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(model_config)


def _padded_batch(rows: list[tuple[list[int], list[bool]]], pad_id: int):
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, L)
    for row, (ids, trained) in enumerate(rows):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids)
        attention_mask[row, :n] = 1
        # HF shifts labels inside the model: labels[t] is the target of position t-1.
        labels[row, :n] = torch.where(torch.tensor(trained), torch.tensor(ids), IGNORE_INDEX)
    return input_ids, attention_mask, labels


def pretrain_toy_model(
    model, tokenizer, games: list[list[Message]], config: ToyModelConfig, log=print
) -> float:
    """Causal-LM pretraining on the assistant turns of `games`; returns the last epoch's
    mean loss per trained token."""
    rows = [encode_conversation(tokenizer, game) for game in games]
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(rows) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98)
    )
    warmup = max(1, total_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / total_steps))),
    )
    model.train()
    epoch_loss = float("nan")
    for epoch in range(config.epochs):
        order = torch.randperm(len(rows), generator=generator).tolist()
        loss_sum, token_sum = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            batch = [rows[i] for i in order[start : start + config.batch_size]]
            input_ids, attention_mask, labels = _padded_batch(batch, tokenizer.pad_token_id)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            trained_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
            loss_sum += loss.item() * trained_tokens
            token_sum += trained_tokens
        epoch_loss = loss_sum / max(token_sum, 1)
        log(f"pretraining epoch {epoch + 1}/{config.epochs}: loss {epoch_loss:.4f} per token")
    model.eval()
    return epoch_loss


@torch.no_grad()
def bisection_agreement(model, tokenizer, config: ToyModelConfig) -> dict[int, float]:
    """Per turn, how often the model's greedy guess is the bisection guess, fed the games
    of a bisecting player (one per secret). After a first bisecting move the history shows
    which habit is being played, so a model that has learned the habits bisects from turn
    3 on; at turn 2 the reference's greedy choice is its most common habit instead."""
    env = GuessNumberEnv(low=config.low, high=config.high)
    open_answer = tokenizer.encode(f"{IM_START}assistant\n{ANSWER_OPEN}", add_special_tokens=False)
    hits: dict[int, list[bool]] = {}
    for secret in range(config.low, config.high + 1):
        problem = {"secret": secret}
        messages = env.initial_messages(problem)
        history: list[tuple[int | None, str]] = []
        for turn in range(1, config.max_turns + 1):
            guess = scripted_guess("bisect", config.low, config.high, history, random.Random(0))
            ids, _ = encode_conversation(tokenizer, messages)
            logits = model(torch.tensor([ids + open_answer])).logits[0, -1]  # (V,)
            predicted = tokenizer.convert_ids_to_tokens(int(logits.argmax()))
            hits.setdefault(turn, []).append(predicted == str(guess))
            answer = f"{ANSWER_OPEN}{guess}{ANSWER_CLOSE}"
            result = env.step(problem, answer, turn)
            if result.done:
                break
            messages += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": result.feedback},
            ]
            history.append((guess, result.feedback))
    return {turn: sum(h) / len(h) for turn, h in sorted(hits.items())}


def build_toy_model(out_dir: str | Path, config: ToyModelConfig | None = None, log=print) -> Path:
    """Build the toy reference policy into `out_dir` (tokenizer, config, safetensors weights,
    build_info.json). Deterministic for a given config (seed included) on a given machine."""
    from transformers import GenerationConfig

    config = config or ToyModelConfig()
    out_dir = Path(out_dir)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    started = time.perf_counter()

    tokenizer = build_toy_tokenizer(config.max_number)
    games = pretraining_games(config, rng)
    model = new_toy_model(config, tokenizer)
    num_params = sum(p.numel() for p in model.parameters())
    log(
        f"toy model: {num_params:,} parameters, {len(tokenizer)} tokens, "
        f"{len(games):,} pretraining games"
    )
    final_loss = pretrain_toy_model(model, tokenizer, games, config, log=log)
    agreement = bisection_agreement(model, tokenizer, config)
    log(
        "greedy agreement with bisection along bisecting games, per turn: "
        + " ".join(f"{turn}:{100 * value:.0f}%" for turn, value in agreement.items())
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    build_info = {
        "config": asdict(config),
        "parameters": num_params,
        "final_pretraining_loss": final_loss,
        "bisection_agreement_per_turn": agreement,
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
    }
    (out_dir / "build_info.json").write_text(json.dumps(build_info, indent=2) + "\n")
    log(f"wrote {out_dir} in {build_info['seconds']} s")
    return out_dir


# --------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------


def split_secrets(low: int, high: int, num_eval: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of the secrets low..high into (train, held-out eval), each sorted."""
    secrets = list(range(low, high + 1))
    if not 0 < num_eval < len(secrets):
        raise ConfigError(
            f"num_eval must be between 1 and {len(secrets) - 1} for secrets {low}..{high}, "
            f"got {num_eval}"
        )
    random.Random(seed).shuffle(secrets)
    return sorted(secrets[num_eval:]), sorted(secrets[:num_eval])


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------
# The end-to-end demo
# --------------------------------------------------------------------------------------


def default_model_dir() -> Path:
    """The toy reference model shipped in the package (drift_engine/assets/guess-model)."""
    from drift_engine.assets import asset_path

    return asset_path("guess-model")


@dataclass(frozen=True)
class DemoConfig:
    """The demo's sizes and DRIFT settings; every number in its output is measured."""

    model_dir: str = ""  # "" = the shipped model, default_model_dir()
    num_eval: int = 16  # held-out secrets; the other secrets of the range are trained on
    split_seed: int = 0
    # rollouts from the reference policy
    samples_per_prompt: int = 64
    temperature: float = 1.0
    max_new_tokens: int = 8
    # DRIFT weights (the library's defaults)
    gamma: float = WeightingConfig().gamma
    beta: float = WeightingConfig().beta
    # weighted SFT; the rejection-sampling baseline gets the same number of optimizer steps
    train_turns: str = "all"
    steps: int = 120
    # Short packed micro-batches keep CPU steps cheap; 4 of them (about 32 trajectories)
    # make one optimizer step.
    batch_tokens: int = 512
    grad_accum: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        WeightingConfig(gamma=self.gamma, beta=self.beta)  # bad values fail now, not later

    def resolved_model_dir(self) -> Path:
        return Path(self.model_dir) if self.model_dir else default_model_dir()


def check_demo_out(out: Path) -> None:
    """Refuse an output folder that holds an earlier run's training runs."""
    for run_dir in ("drift", "rejection"):
        if (out / run_dir).exists():
            raise ConfigError(f"{out / run_dir} exists from an earlier run; choose another --out")


@dataclass
class DemoResult:
    results: list[MultiAtKResult]  # the reference, DRIFT and rejection sampling, in order
    rollout_summary: dict
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


@contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to seconds[name]."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - started, 2)


def _toy_config_of(model_dir: Path) -> ToyModelConfig:
    """The game the model at `model_dir` was pretrained on (range, turns), from its
    build_info.json; the defaults for a model built elsewhere."""
    info_path = model_dir / "build_info.json"
    if not info_path.is_file():
        return ToyModelConfig()
    saved = json.loads(info_path.read_text(encoding="utf-8"))["config"]
    known = {f for f in ToyModelConfig.__dataclass_fields__}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known}
    return ToyModelConfig(**values)


def run_demo(
    out_dir: str | Path, config: DemoConfig | None = None, log=print, progress: bool = False
) -> DemoResult:
    """Reference policy -> rollouts -> DRIFT weights -> weighted SFT (and the rejection-
    sampling baseline) -> multi@k on held-out secrets. Writes into `out_dir`:
    problems-{train,eval}.jsonl, rollouts.safetensors (with DRIFT weights),
    rollouts-rejection.safetensors, rollouts-preview.jsonl, drift/ and rejection/ (training
    runs with their checkpoints), results.json, results.md and multi_at_k.png."""
    from drift_engine.data.rollouts import save_rollouts
    from drift_engine.evaluate import evaluate_multi_at_k, format_table, plot_multi_at_k
    from drift_engine.rollout import (
        SamplingParams,
        collect_trajectories,
        load_tokenizer,
        to_rollout_set,
        turn_stats,
        write_preview,
    )
    from drift_engine.rollout.hf import HFEngine
    from drift_engine.train import train
    from drift_engine.train.config import fixed_steps_config
    from drift_engine.weighting import attach_weights, solved_trajectories, uniform_set

    config = config or DemoConfig()
    out = Path(out_dir)
    model_dir = config.resolved_model_dir()
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"no toy model in {model_dir} (no config.json): pass the folder of one with "
            "--model, or run the demo with --rebuild-model to pretrain one"
        )
    check_demo_out(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    toy = _toy_config_of(model_dir)
    max_turns = toy.max_turns
    env = GuessNumberEnv(low=toy.low, high=toy.high)
    train_secrets, eval_secrets = split_secrets(
        toy.low, toy.high, config.num_eval, config.split_seed
    )
    train_problems = guess_problems(train_secrets, toy.low, toy.high)
    eval_problems = guess_problems(eval_secrets, toy.low, toy.high)
    files = {
        "problems_train": str(write_jsonl(out / "problems-train.jsonl", train_problems)),
        "problems_eval": str(write_jsonl(out / "problems-eval.jsonl", eval_problems)),
    }
    benchmark = f"guess {toy.low}..{toy.high}, {len(eval_problems)} held-out secrets"
    log(
        f"guess-a-number in {toy.low}..{toy.high}, {max_turns} turns: "
        f"{len(train_problems)} training secrets, {len(eval_problems)} held-out secrets"
    )

    tokenizer = load_tokenizer(str(model_dir))
    batch = max(len(train_problems) * config.samples_per_prompt, len(eval_problems))

    def evaluate(engine, name: str):
        with _timed(seconds, f"eval_{name}"):
            result = evaluate_multi_at_k(
                engine,
                tokenizer,
                env,
                eval_problems,
                max_turns,
                max_new_tokens=config.max_new_tokens,
                model=name,
                benchmark=benchmark,
            )
        log(
            f"{name}: multi@1..{max_turns} = "
            + " ".join(f"{100 * v:.1f}" for v in result.multi_at_k)
        )
        return result

    # 1. the reference policy, greedy
    reference = HFEngine.from_pretrained(str(model_dir), max_batch_size=batch)
    results = [evaluate(reference, "reference")]

    # 2. rollouts: n samples per training secret, up to K turns, temperature 1
    log(f"rollouts: {config.samples_per_prompt} per secret x {len(train_problems)} secrets")
    with _timed(seconds, "rollout"):
        run = collect_trajectories(
            reference,
            tokenizer,
            env,
            train_problems,
            n=config.samples_per_prompt,
            max_turns=max_turns,
            sampling=SamplingParams(
                temperature=config.temperature, max_new_tokens=config.max_new_tokens
            ),
            seed=config.seed,
            progress=progress,
        )
        rollouts = to_rollout_set(run, {"reference_model": str(model_dir)})
    files["rollouts_preview"] = str(write_preview(run, out / "rollouts-preview.jsonl"))
    stats = turn_stats(run.trajectories, max_turns)
    answers = [a for t in run.trajectories for a in t.answers]

    # 3. returns and DRIFT weights
    with _timed(seconds, "weights"):
        weighted = attach_weights(rollouts, WeightingConfig(gamma=config.gamma, beta=config.beta))
        files["rollouts"] = str(save_rollouts(out / "rollouts.safetensors", weighted)[-1])
        hint = "raise --samples-per-prompt or rebuild the toy model"
        rejection = uniform_set(rollouts, solved_only=True, hint=hint)
        solved = solved_trajectories(rollouts)
        files["rollouts_rejection"] = str(
            save_rollouts(out / "rollouts-rejection.safetensors", rejection)[-1]
        )
    weights = weighted.weights  # (S,)
    rollout_summary = {
        "trajectories": rollouts.num_trajectories,
        "tokens": rollouts.num_tokens,
        "solved_trajectories": len(solved),
        "sampled_solved_within_k": {s.turn: s.solved_fraction for s in stats},
        "unparseable_answers": sum(a is None for a in answers) / max(len(answers), 1),
        "weights_max": float(weights.max()),
        "weight_share_of_solved": float(weights[solved].sum() / weights.sum()),
        "template_mismatches": run.report.mismatched,
    }
    log(
        f"rollouts: {len(solved)}/{rollouts.num_trajectories} trajectories solved "
        f"(sampled, within {max_turns} turns); solved ones carry "
        f"{100 * rollout_summary['weight_share_of_solved']:.0f}% of the DRIFT weight"
    )

    # 4. weighted SFT (DRIFT) and unweighted SFT on the solved trajectories (baseline)
    def finetune(name: str, data_path: str):
        train_config = fixed_steps_config(
            out / name,
            data_path,
            model_dir,
            config.steps,
            data={
                "train_turns": config.train_turns,
                "batch_tokens": config.batch_tokens,
                "grad_accum": config.grad_accum,
            },
            optim={"lr": config.lr, "weight_decay": config.weight_decay},
            seed=config.seed,
            progress=progress,
        )
        with _timed(seconds, f"train_{name}"):
            trained = train(train_config)
        log(f"{name}: {trained.steps} steps, final loss {trained.last_metrics['loss']:.4f}")
        return HFEngine.from_pretrained(str(trained.model), max_batch_size=batch)

    results.append(evaluate(finetune("drift", files["rollouts"]), "DRIFT"))
    results.append(
        evaluate(finetune("rejection", files["rollouts_rejection"]), "rejection sampling")
    )

    # 5. report
    seconds["total"] = round(time.perf_counter() - started, 1)
    table = format_table(results)
    files["plot"] = str(plot_multi_at_k(results, out / "multi_at_k.png", title=benchmark))
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    files["table"] = str(out / "results.md")
    report = {
        "benchmark": benchmark,
        "max_turns": max_turns,
        "train_secrets": train_secrets,
        "eval_secrets": eval_secrets,
        "demo_config": asdict(config) | {"model_dir": str(model_dir)},
        "toy_model": asdict(toy),
        "rollouts": rollout_summary,
        "results": [r.to_json() for r in results],
        "seconds": seconds,
        "versions": _versions(),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    files["results"] = str(out / "results.json")
    return DemoResult(results, rollout_summary, seconds, files)


def _versions() -> dict[str, str]:
    import platform

    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": str(torch.get_num_threads()),
    }
