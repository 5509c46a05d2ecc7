"""Packed forward + fused loss of tiny random HF models against per-trajectory eager references."""

import copy

import hf_utils
import pytest
import torch
import torch.nn.functional as F

from drift_engine.data.packing import PackedBatch
from drift_engine.errors import ConfigError, DriftError
from drift_engine.models import (
    apply_lora,
    hf_trainer_loss,
    lm_head_parameters,
    load_model,
    model_hidden_states,
    padded_weighted_sft_loss,
    parse_dtype,
    weighted_sft_loss,
)

VOCAB = 101
LENGTHS = [6, 11, 3, 9]


def make_config(kind, **overrides):
    return hf_utils.make_config(kind, vocab_size=VOCAB, **overrides)


def model_pair(config):
    """The same random weights twice: drift_varlen (packed) and eager (the reference)."""
    torch.manual_seed(0)
    packed = load_model(copy.deepcopy(config), dtype=torch.float32)
    eager = load_model(copy.deepcopy(config), dtype=torch.float32, attn_implementation="eager")
    eager.load_state_dict(packed.state_dict())
    return packed, eager


def make_batch(lengths=LENGTHS, seed=0, weights=None):
    """A packed batch training the second half of each trajectory (as the packer lays it out)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    input_ids = torch.randint(0, VOCAB, (1, total), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    if weights is None:
        weights = torch.rand(len(lengths), generator=g) * 2
    labels = torch.full((total,), -100)
    token_weights = torch.zeros(total)
    for i, (start, n) in enumerate(zip(cu[:-1].tolist(), lengths, strict=True)):
        trained = range(start + n // 2, start + n - 1)  # next-token targets inside the trajectory
        for t in trained:
            labels[t] = input_ids[0, t + 1]
            token_weights[t] = weights[i] / len(trained)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=cu,
        max_seqlen=max(lengths),
        labels=labels,
        token_weights=token_weights,
        trajectory_index=torch.arange(len(lengths)),
        trajectory_weights=weights.float(),
        num_trajectories=len(lengths),
        num_tokens=total,
        num_trained_tokens=int((labels != -100).sum()),
    )


def reference_loss(eager, batch):
    """DRIFT's loss with full logits, one trajectory at a time: Σ_i w_i·mean CE_i / B."""
    total = 0.0
    bounds = batch.cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        logits = eager(input_ids=batch.input_ids[:, start:end]).logits[0]  # (n, V)
        labels = batch.labels[start:end]
        per_token = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
        total = total + (per_token * batch.token_weights[start:end]).sum()
    return total / batch.num_trajectories


def reference_hidden(eager, batch):
    bounds = batch.cu_seqlens.tolist()
    return torch.cat(
        [
            eager.model(input_ids=batch.input_ids[:, s:e]).last_hidden_state[0]
            for s, e in zip(bounds[:-1], bounds[1:], strict=True)
        ]
    )


# fp32 throughout (the fused loss runs in fp32/fp16/bf16): packed and per-trajectory results
# differ only by summation order.
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma2"])
def test_packed_loss_and_gradients_match_per_trajectory_eager(kind):
    packed, eager = model_pair(make_config(kind))
    batch = make_batch()

    hidden, weight, bias, softcap = model_hidden_states(packed, batch)
    assert hidden.shape == (batch.num_tokens, 32) and weight.shape == (VOCAB, 32) and bias is None
    assert softcap == (3.0 if kind == "gemma2" else None)
    torch.testing.assert_close(hidden, reference_hidden(eager, batch), **TOL)

    loss = weighted_sft_loss(packed, batch, impl="torch")
    ref = reference_loss(eager, batch)
    torch.testing.assert_close(loss, ref, **TOL)
    loss.backward()
    ref.backward()
    ref_grads = dict(eager.named_parameters())
    for name, param in packed.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name].grad, **TOL, msg=name)


def test_trajectories_do_not_attend_to_each_other():
    packed, _ = model_pair(make_config("llama"))
    batch = make_batch()
    changed = copy.deepcopy(batch)
    changed.input_ids[0, 6:17] = (changed.input_ids[0, 6:17] + 1) % VOCAB  # trajectory 1 only
    with torch.no_grad():
        before = model_hidden_states(packed, batch)[0]
        after = model_hidden_states(packed, changed)[0]
    assert torch.equal(before[:6], after[:6]) and torch.equal(before[17:], after[17:])
    assert not torch.allclose(before[6:17], after[6:17])


def test_tied_embeddings_share_the_head_weight():
    packed, eager = model_pair(make_config("llama", tie_word_embeddings=True))
    weight, _, _ = lm_head_parameters(packed)
    assert weight is packed.get_input_embeddings().weight
    batch = make_batch(seed=1)
    weighted_sft_loss(packed, batch, 2.5, impl="torch").backward()
    (reference_loss(eager, batch) * batch.num_trajectories / 2.5).backward()
    torch.testing.assert_close(weight.grad, eager.get_input_embeddings().weight.grad, **TOL)


def test_normalizer_and_untrained_batch():
    packed, _ = model_pair(make_config("qwen2"))
    batch = make_batch(seed=2)
    default = weighted_sft_loss(packed, batch, impl="torch")
    torch.testing.assert_close(
        weighted_sft_loss(packed, batch, torch.tensor(8.0), impl="torch"),
        default * batch.num_trajectories / 8.0,
    )
    nothing = copy.deepcopy(batch)
    nothing.labels.fill_(-100)
    nothing.token_weights.zero_()
    nothing.num_trained_tokens = 0
    loss = weighted_sft_loss(packed, nothing, impl="torch")
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in packed.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    config = make_config("llama")
    torch.manual_seed(0)
    plain = load_model(copy.deepcopy(config), dtype=torch.float32)
    checkpointed = load_model(
        copy.deepcopy(config), dtype=torch.float32, gradient_checkpointing=True
    )
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    batch = make_batch(seed=3)
    for model in (plain, checkpointed):
        weighted_sft_loss(model, batch, impl="torch").backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)


def padded_inputs(lengths, side, seed=0):
    """A right- or left-padded batch: each row trains its last few tokens (HF label layout)."""
    g = torch.Generator().manual_seed(seed)
    rows, width = len(lengths), max(lengths)
    input_ids = torch.zeros(rows, width, dtype=torch.long)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), -100)
    for b, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        tokens = torch.randint(0, VOCAB, (n,), generator=g)
        input_ids[b, cols] = tokens
        attention_mask[b, cols] = 1
        row_labels = torch.full((n,), -100)
        row_labels[n // 2 :] = tokens[n // 2 :]
        labels[b, cols] = row_labels
    weights = torch.rand(rows, generator=g) * 2
    return input_ids, attention_mask, labels, weights


def test_padded_trainer_loss_matches_dense_drift_loss():
    packed, eager = model_pair(make_config("qwen2"))
    lengths = [7, 12, 2, 9]
    input_ids, attention_mask, labels, weights = padded_inputs(lengths, "right")

    # The reference trainer's computation: padded forward, full logits, per-row token mean.
    logits = eager(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V)
    per_token = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100
    )  # (B, L-1)
    counts = (labels[:, 1:] != -100).sum(1)
    ref = ((per_token.sum(1) / counts.clamp_min(1)) * weights).mean()

    loss = hf_trainer_loss(
        packed,
        {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "weights": weights,
        },
        impl="torch",
    )
    torch.testing.assert_close(loss, ref, **TOL)
    loss.backward()
    ref.backward()
    for (name, a), b in zip(packed.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=name)

    # Left padding packs to the same tokens, positions and loss.
    left = padded_inputs(lengths, "left")
    torch.testing.assert_close(padded_weighted_sft_loss(packed, *left, impl="torch"), loss)


class _Wrapper(torch.nn.Module):
    """Stands for DDP: forward calls the wrapped module."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_trainer_loss_runs_through_a_wrapper_and_checks_inputs():
    packed, _ = model_pair(make_config("llama"))
    input_ids, attention_mask, labels, weights = padded_inputs([5, 8], "right", seed=1)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "w": weights,
    }
    wrapped = _Wrapper(packed)
    loss = hf_trainer_loss(wrapped, inputs, weights_key="w", impl="torch")
    assert wrapped.calls == 1 and "forward" not in packed.__dict__
    torch.testing.assert_close(loss, hf_trainer_loss(packed, inputs, weights_key="w", impl="torch"))
    with pytest.raises(DriftError, match="'weights'"):
        hf_trainer_loss(packed, {"input_ids": input_ids, "labels": labels})
    with pytest.raises(DriftError, match="one importance weight per trajectory"):
        padded_weighted_sft_loss(packed, input_ids, attention_mask, labels, weights[:1])


def test_lora_trains_only_adapters():
    packed, _ = model_pair(make_config("llama"))
    lora = apply_lora(packed, r=4, target_modules=["q_proj", "v_proj"])
    batch = make_batch(seed=4)
    weighted_sft_loss(lora, batch, impl="torch").backward()
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(lora.get_parameter(n).grad is not None for n in trainable)
    with pytest.raises(ConfigError, match="lm_head"):
        apply_lora(packed, r=4, target_modules=["q_proj", "lm_head"])


def test_generation_with_drift_varlen_matches_eager():
    packed, eager = model_pair(make_config("gemma2"))
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(packed.generate(prompt, **kwargs), eager.generate(prompt, **kwargs))


def test_loading_errors():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(None) is None
    with pytest.raises(ConfigError, match="unknown dtype"):
        parse_dtype("float8")
    with pytest.raises(DriftError, match="cannot load model"):
        load_model("/nonexistent/model-dir")
