"""apply_fused_loss: a patched model's loss and gradients equal the unpatched model's (full
logits), for every architecture the packed attention is tested with, without per-model code."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from hf_utils import ARCHITECTURES, VOCAB, clone_model, make_model

from drift_engine.errors import DriftError
from drift_engine.models import apply_fused_loss, remove_fused_loss

TOL = dict(rtol=2e-5, atol=2e-6)


def padded_batch(lengths, seed=0):
    """Right-padded rows; labels ignore padding and each row's first third (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        input_ids[b, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[b, :n] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    for b, n in enumerate(lengths):
        labels[b, : n // 3] = -100
    return input_ids, mask, labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_patched_loss_and_gradients_equal_unpatched(kind):
    reference = make_model(kind, attn_implementation="eager")
    patched = apply_fused_loss(clone_model(reference, "drift_varlen"), impl="torch")
    input_ids, mask, labels = padded_batch([11, 6, 9])

    ref = reference(input_ids=input_ids, attention_mask=mask, labels=labels)
    out = patched(input_ids=input_ids, attention_mask=mask, labels=labels)
    assert out.logits is None and ref.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    ref.loss.backward()
    out.loss.backward()
    ref_grads = grads(reference)
    got = grads(patched)
    assert got.keys() == ref_grads.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=name)

    # num_items_in_batch (what the Trainer passes under gradient accumulation) replaces the
    # count; per-token weights (aligned with labels) scale each token's cross-entropy.
    u = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3))
    out = patched(
        input_ids=input_ids,
        attention_mask=mask,
        labels=labels,
        token_weights=u,
        num_items_in_batch=torch.tensor(7),
    )
    logits = ref.logits.detach()[:, :-1].float()
    ce = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")  # (B, L-1)
    torch.testing.assert_close(out.loss, (ce * u[:, 1:]).sum() / 7, **TOL)


def test_patch_leaves_generation_and_can_be_removed():
    model = make_model("gemma2")
    input_ids, mask, labels = padded_batch([7, 7], seed=2)
    before = model(input_ids=input_ids).logits
    full_loss = model(input_ids=input_ids, labels=labels).loss
    apply_fused_loss(model, impl="torch")
    apply_fused_loss(model, impl="torch")  # twice: still one patch
    torch.testing.assert_close(model(input_ids=input_ids).logits, before)  # no labels: logits
    assert "token_weights" in inspect.signature(model.forward).parameters
    generated = model.generate(input_ids[:1, :3], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)
    torch.testing.assert_close(model(input_ids=input_ids, labels=labels).loss, full_loss, **TOL)
    with pytest.raises(DriftError, match="token_weights were given without labels"):
        model(input_ids=input_ids, token_weights=torch.ones_like(input_ids, dtype=torch.float))
    with pytest.raises(DriftError, match="one weight per label"):
        model(input_ids=input_ids, labels=labels, token_weights=torch.ones(2, 3))
    remove_fused_loss(model)
    assert "forward" not in model.__dict__
    assert model(input_ids=input_ids, labels=labels).logits is not None


def test_patched_model_in_a_plain_trainer_is_exact_under_accumulation(tmp_path):
    """transformers.Trainer passes num_items_in_batch to models taking loss kwargs: the
    patched model divides by it, so accumulation 1 and 2 give the same loss and update."""
    transformers = pytest.importorskip("transformers")
    input_ids, mask, labels = padded_batch([12, 5, 9, 7], seed=4)
    rows = [
        {"input_ids": i, "attention_mask": m, "labels": lab}
        for i, m, lab in zip(input_ids, mask, labels, strict=True)
    ]
    base = make_model("llama")
    reference = clone_model(base)
    # The whole batch in one full-logits forward: the token mean over its labelled tokens.
    ref_loss = reference(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    results = []
    for accumulation in (1, 2):
        model = apply_fused_loss(clone_model(base, "drift_varlen"), impl="torch")
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(accumulation)),
            per_device_train_batch_size=4 // accumulation,
            gradient_accumulation_steps=accumulation,
            max_steps=2,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=lambda feats: {k: torch.stack([f[k] for f in feats]) for k in feats[0]},
        )
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (loss1, params1), (loss2, params2) = results
    assert loss1[0] == pytest.approx(ref_loss.item(), rel=1e-5)
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    for a, b in zip(params1, params2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
