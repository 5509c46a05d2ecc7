"""Factories shared by the test modules: tiny tokenizers, random models, rollout sets,
trainer configs, a scripted engine and the fused losses' inputs (no downloads; built in the
test)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drift_engine.data.rollouts import RolloutSet, tokenizer_fingerprint
from drift_engine.rollout import Engine, Generation
from drift_engine.train.config import TrainConfig, apply_overrides, config_from_dict

# ---- trainer: a word-level tokenizer, tiny Qwen2/Llama models, multi-turn rollouts ---------

VOCAB = 61  # prime, so no block size divides it


def make_tokenizer(path: Path):
    """A word-level tokenizer over t0 ... t60 (t0 unknown, t1 padding, t2 end of text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="t0", pad_token="t1", eos_token="t2"
    )
    tokenizer.save_pretrained(path)
    return tokenizer


def make_model_dir(path: Path, arch: str = "qwen2", seed: int = 0) -> Path:
    """A tiny random HF causal LM (and tokenizer) saved to ``path``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if arch == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=False)
    else:  # llama with tied embeddings: the loss must use the embedding matrix as head
        config = LlamaConfig(**common, tie_word_embeddings=True)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    make_tokenizer(path)
    return path


def make_rollouts(
    num_groups: int = 4, per_group: int = 3, seed: int = 0, tokenizer=None
) -> RolloutSet:
    """Multi-turn trajectories [prompt][answer 1][feedback][answer 2]... of 14-60 tokens,
    with explicit non-uniform weights."""
    g = torch.Generator().manual_seed(seed)
    tokens, turns, groups, rewards = [], [], [], []
    for group in range(num_groups):
        for _ in range(per_group):
            n_turns = int(torch.randint(1, 4, (1,), generator=g))
            toks, tids = [], []
            for k in range(1, n_turns + 1):
                context = int(torch.randint(3, 10, (1,), generator=g))
                answer = int(torch.randint(2, 9, (1,), generator=g))
                toks += torch.randint(3, VOCAB, (context + answer,), generator=g).tolist()
                tids += [0] * context + [k] * answer
            tokens.append(toks)
            turns.append(tids)
            groups.append(group)
            rewards.append([0.0] * (n_turns - 1) + [float(torch.rand(1, generator=g) < 0.5)])
    metadata = tokenizer_fingerprint(tokenizer) if tokenizer is not None else {}
    rs = RolloutSet.from_trajectories(tokens, turns, groups, rewards, metadata=metadata)
    weights = 0.25 + 1.5 * torch.rand(rs.num_trajectories, generator=g)  # (S,)
    return dataclasses.replace(rs, weights=weights.to(torch.float32))


def base_config(workspace, out: Path, **overrides) -> TrainConfig:
    config = config_from_dict(
        {
            "out": str(out),
            "progress": False,
            "device": "cpu",
            "data": {"path": str(workspace["data"]), "batch_tokens": 96},
            "model": {"name_or_path": str(workspace["models"]["qwen2"]), "dtype": "float32"},
            "optim": {"lr": 1e-3},
            "schedule": {"warmup_ratio": 0.0},
        }
    )
    return apply_overrides(config, overrides)


def run(config: TrainConfig, stop_at: int | None = None) -> list[dict]:
    from drift_engine.train.loop import Trainer

    records = []

    def on_step_end(record):
        records.append(record)
        if record["step"] == stop_at:
            raise KeyboardInterrupt

    trainer = Trainer(config, on_step_end=on_step_end)
    if stop_at is None:
        trainer.fit()
    else:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
    return records


def exported_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model" / "model.safetensors")


# ---- rollout: a chat tokenizer, a tiny Llama, problems and a scripted engine ---------

CHATML = (
    "{%- for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "system user assistant Incorrect Please think again reason step by and put your final "
    "answer within What is plus boxed the"
).split()
PUNCT = [".", ",", "?", "{", "}", "\\", "{}."]


def build_tokenizer(chat_template: str | None = CHATML):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab: dict[str, int] = {}
    for word in specials + ["<answer>", "</answer>"] + WORDS + PUNCT + [str(i) for i in range(21)]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    core.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in ["<answer>", "</answer>"]]
    )
    kwargs = {"chat_template": chat_template} if chat_template else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        **kwargs,
    )


def build_model(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(path, chat_template: str | None = CHATML):
    tokenizer = build_tokenizer(chat_template)
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PROBLEMS = [
    {"question": "What is 1 plus 2 ?", "answer": "3"},
    {"question": "What is 2 plus 2 ?", "answer": "4"},
    {"question": "What is 3 plus 4 ?", "answer": "7"},
]


class ScriptedEngine(Engine):
    """Answers from a table: (question's first number, turn) -> answer text."""

    name = "scripted"

    def __init__(self, tokenizer, answers: dict[tuple[str, int], str]):
        self.tokenizer = tokenizer
        self.answers = answers
        self.calls: list[int] = []  # batch sizes

    def generate(self, prompts, params, seeds):
        self.calls.append(len(prompts))
        out = []
        im_start = self.tokenizer.convert_tokens_to_ids("<|im_start|>")
        for prompt in prompts:
            text = self.tokenizer.decode(prompt)
            key = text.split("What is ")[1].split()[0]
            turn = sum(1 for t in prompt if t == im_start) // 2  # user+assistant per turn
            ids = self.tokenizer.encode(
                self.answers.get((key, turn), "no idea"), add_special_tokens=False
            )
            ids.append(self.tokenizer.eos_token_id)
            out.append(Generation(token_ids=ids, finish_reason="stop"))
        return out


# ---- engine ---------------------------------------------------------------------------------


# ---- the fused losses: hidden states, LM head, labels, token weights ---------------------


def linear_loss_inputs(
    num_tokens,
    hidden_size,
    vocab_size,
    dtype=torch.float32,
    *,
    bias=False,
    seed=0,
    device="cpu",
    ignored=0.2,
    scale=1.0,
):
    """hidden (N, H), weight (V, H), bias (V,) | None, labels (N,) with ~`ignored` of rows
    ignored (-100), token_weights (N,) non-uniform; logits of standard deviation ~2·scale."""
    gen = torch.Generator().manual_seed(seed)
    # scale 1: a realistic spread, far from uniform or one-hot
    hidden = torch.randn(num_tokens, hidden_size, generator=gen) / hidden_size**0.25
    weight = 2 * scale * torch.randn(vocab_size, hidden_size, generator=gen) / hidden_size**0.25
    bias_t = torch.randn(vocab_size, generator=gen) if bias else None
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=gen)
    labels[torch.rand(num_tokens, generator=gen) < ignored] = -100
    token_weights = torch.rand(num_tokens, generator=gen) * 2 + 0.05
    cast = lambda t: None if t is None else t.to(device, dtype)
    return cast(hidden), cast(weight), cast(bias_t), labels.to(device), token_weights.to(device)
