"""Tiny random-initialised Hugging Face causal LMs and padded SFT rows, for the integration
tests (Trainer, TRL, the loss patch). Built in memory: no downloads."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

VOCAB = 97
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma2")


def make_config(kind: str, **overrides):
    """A tiny config of architecture ``kind`` (SMALL's sizes; ``overrides`` replace them)."""
    import transformers

    sizes = {**SMALL, **overrides}
    if kind == "llama":
        return transformers.LlamaConfig(**sizes)
    if kind == "qwen2":
        return transformers.Qwen2Config(**sizes)
    if kind == "mistral":  # sliding window shorter than most rows
        return transformers.MistralConfig(**{"sliding_window": 4, **sizes})
    if kind == "gemma2":  # attention + final logit softcap, alternating sliding layers, tied head
        return transformers.Gemma2Config(
            **{
                "sliding_window": 5,
                "attn_logit_softcapping": 5.0,
                "final_logit_softcapping": 3.0,
                "query_pre_attn_scalar": 8,
                **sizes,
            }
        )
    raise ValueError(kind)


def make_model(kind: str = "qwen2", attn_implementation: str = "drift_varlen", seed: int = 0):
    from drift_engine.models import load_model

    torch.manual_seed(seed)
    return load_model(
        make_config(kind), dtype=torch.float32, attn_implementation=attn_implementation
    )


def clone_model(model, attn_implementation: str = "eager"):
    """The same weights with another attention implementation (the full-logits reference)."""
    from drift_engine.models import load_model

    other = load_model(
        copy.deepcopy(model.config), dtype=torch.float32, attn_implementation=attn_implementation
    )
    other.load_state_dict(model.state_dict())
    return other


def make_rows(lengths, seed=0, token_weights=False):
    """SFT rows: tokens, labels training the second half of each row, a random weight."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 2] = -100
        row = {
            "input_ids": ids.tolist(),
            "labels": labels.tolist(),
            "weights": float(torch.rand((), generator=g) * 2),
        }
        if token_weights:
            row["token_weights"] = (torch.rand(n, generator=g) + 0.5).tolist()
        rows.append(row)
    return rows


def reference_loss(model, rows, loss_mode="trajectory"):
    """The weighted loss with full logits, one row at a time (no padding)."""
    sums, counts, weights = [], [], []
    for row in rows:
        ids = torch.tensor(row["input_ids"])[None]
        labels = torch.tensor(row["labels"])
        logits = model(input_ids=ids).logits[0, :-1].float()  # (n-1, V)
        targets = labels[1:]
        ce = F.cross_entropy(logits, targets.clamp_min(0), reduction="none")
        u = torch.tensor(row.get("token_weights", [1.0] * len(labels)))[1:]
        mask = targets != -100
        sums.append((ce * u * mask).sum())
        counts.append(mask.sum())
        weights.append(row.get("weights", 1.0))
    w = torch.tensor(weights)
    sums, counts = torch.stack(sums), torch.stack(counts).float()
    if loss_mode == "token":
        return (w * sums).sum() / counts.sum()
    per_row = w * sums / counts.clamp_min(1)
    return per_row.sum() / (len(rows) if loss_mode == "trajectory" else w.sum())
