"""DriftTrainer: a real transformers.Trainer with the weighted fused loss, exact under
gradient accumulation (equal to a full-logits reference and to accumulation 1)."""

import pytest
import torch
from hf_utils import clone_model, make_model, make_rows, reference_loss

from drift_engine.errors import ConfigError, DriftError
from drift_engine.models import DriftDataCollator, DriftTrainer, hf_trainer_loss

transformers = pytest.importorskip("transformers")

# Uneven trained-token counts, so that per-micro-batch means differ from the step's.
LENGTHS = [9, 4, 13, 6]
TOL = dict(rtol=2e-5, atol=2e-6)


class _Recorder(transformers.TrainerCallback):
    """Gradients before each optimizer step, and the logged losses and grad norms."""

    def __init__(self):
        self.grads, self.logs = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(logs)


def _train(tmp_path, rows, model, *, batch_size, accumulation, steps=3, **trainer_kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1e9,  # computed and logged, never clipping
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    recorder = _Recorder()
    trainer = DriftTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=DriftDataCollator(pad_token_id=0),
        callbacks=[recorder],
        loss_impl="torch",
        **trainer_kwargs,
    )
    trainer.train()
    return recorder


@pytest.mark.parametrize(
    "loss_mode, token_weights",
    [("trajectory", False), ("weighted", True), ("token", False)],
)
def test_trainer_accumulation_matches_full_logits_reference(tmp_path, loss_mode, token_weights):
    rows = make_rows(LENGTHS, seed=1, token_weights=token_weights)
    base = make_model("qwen2")
    reference = clone_model(base)
    ref_loss = reference_loss(reference, rows, loss_mode)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}

    # Each optimizer step sees all four rows: one micro-batch of 4, or two of 2.
    runs = {
        accumulation: _train(
            tmp_path / str(accumulation),
            rows,
            clone_model(base, "drift_varlen"),
            batch_size=4 // accumulation,
            accumulation=accumulation,
            loss_mode=loss_mode,
        )
        for accumulation in (1, 2)
    }
    for accumulation, run in runs.items():
        assert len(run.logs) == 3 and len(run.grads) == 3
        assert run.logs[0]["loss"] == pytest.approx(ref_loss.item(), rel=1e-5), accumulation
        ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()]))
        assert run.logs[0]["grad_norm"] == pytest.approx(ref_norm.item(), rel=1e-4), accumulation
        for name, grad in run.grads[0].items():
            torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=name)
    # The following steps (after identical updates) agree between the two runs too.
    one, two = runs[1], runs[2]
    for step in range(1, 3):
        assert two.logs[step]["loss"] == pytest.approx(one.logs[step]["loss"], rel=1e-4)
        for name, grad in one.grads[step].items():
            torch.testing.assert_close(two.grads[step][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_collator_pads_weights_and_masks_labels():
    rows = make_rows([3, 5], token_weights=True)
    rows[0].pop("token_weights")
    rows[1].pop("weights")  # default weight 1
    for side in ("right", "left"):
        batch = DriftDataCollator(pad_token_id=7, padding_side=side, pad_to_multiple_of=4)(rows)
        assert batch["input_ids"].shape == (2, 8)
        real = batch["attention_mask"].bool()
        assert real.sum(1).tolist() == [3, 5]
        assert (batch["input_ids"][~real] == 7).all() and (batch["labels"][~real] == -100).all()
        assert batch["input_ids"][1][real[1]].tolist() == rows[1]["input_ids"]
        assert batch["weights"].tolist() == [pytest.approx(rows[0]["weights"]), 1.0]
        assert batch["token_weights"][0].tolist() == [1.0] * 8  # a row without them: 1
        assert batch["token_weights"][1][real[1]].tolist() == pytest.approx(
            rows[1]["token_weights"]
        )
        if side == "left":
            assert real[0].tolist() == [False] * 5 + [True] * 3
    # Left and right padding give the same loss.
    model = make_model("llama")
    losses = [
        hf_trainer_loss(model, DriftDataCollator(padding_side=side)(rows), impl="torch")
        for side in ("right", "left")
    ]
    torch.testing.assert_close(losses[0], losses[1])


def test_collator_and_trainer_reject_bad_input(tmp_path):
    collate = DriftDataCollator()
    with pytest.raises(DriftError, match="'labels' has 2 entries but input_ids 3"):
        collate([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(DriftError, match="must be finite and >= 0"):
        collate([{"input_ids": [1, 2], "weights": -1.0}])
    with pytest.raises(ConfigError, match="padding_side"):
        DriftDataCollator(padding_side="middle")
    with pytest.raises(ConfigError, match="loss_mode"):
        DriftTrainer(model=make_model(), loss_mode="mean")
    with pytest.raises(DriftError, match="lacks weights"):
        DriftTrainer(
            model=make_model(),
            args=transformers.TrainingArguments(
                output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True
            ),
            train_dataset=[{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 2,
            data_collator=lambda feats: {
                "input_ids": torch.tensor([f["input_ids"] for f in feats]),
                "labels": torch.tensor([f["labels"] for f in feats]),
            },
        ).train()


def test_evaluate_reports_the_weighted_loss(tmp_path):
    rows = make_rows(LENGTHS, seed=5)
    model = make_model("mistral")
    expected = reference_loss(clone_model(model), rows, "weighted")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True
    )
    trainer = DriftTrainer(
        model=model,
        args=args,
        eval_dataset=rows,
        data_collator=DriftDataCollator(),
        loss_mode="weighted",
        loss_impl="torch",
    )
    for prediction_loss_only in (True, False):
        trainer.args.prediction_loss_only = prediction_loss_only
        metrics = trainer.evaluate()
        assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)
