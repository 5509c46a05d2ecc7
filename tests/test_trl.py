"""The TRL recipe: SFTTrainer with DriftLossMixin trains with the weighted fused loss, exact
under gradient accumulation (the logged step loss equals a full-logits reference)."""

import pytest
import torch
from hf_utils import SMALL, clone_model, reference_loss
from tokenizer_utils import make_chat_tokenizer

trl = pytest.importorskip("trl", reason="trl is in the dev extra (pip install -e '.[dev]')")
datasets = pytest.importorskip("datasets")

from drift_engine.models import DriftDataCollator, DriftLossMixin, load_model  # noqa: E402


class DriftSFTTrainer(DriftLossMixin, trl.SFTTrainer):
    """The recipe of docs/embedding.md."""


def test_sft_trainer_trains_with_weighted_fused_loss(tmp_path):
    import transformers

    tokenizer = make_chat_tokenizer()
    tokenizer.pad_token = "<|endoftext|>"
    config = transformers.Qwen2Config(**{**SMALL, "vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    model = load_model(config, dtype=torch.float32)
    reference = clone_model(model)
    rows = datasets.Dataset.from_list(
        [
            {"prompt": "the answer is", "completion": " in the end", "weights": 1.7},
            {"prompt": "what then", "completion": " nothing at all here", "weights": 0.2},
            {"prompt": "tea", "completion": " then her", "weights": 1.1},
            {"prompt": "one more prompt", "completion": " x", "weights": 0.0},
        ]
    )
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = DriftSFTTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
        data_collator=DriftDataCollator(pad_token_id=tokenizer.pad_token_id),
        loss_impl="torch",
    )
    # SFTTrainer tokenised the rows and masked the prompts; the weights column survives.
    prepared = [dict(r) for r in trainer.train_dataset]
    assert all("weights" in r and -100 in r["labels"] for r in prepared)
    expected = reference_loss(reference, prepared, "trajectory")
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2
    assert losses[0] == pytest.approx(expected.item(), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_sft_packing_is_refused(tmp_path):
    from drift_engine.errors import ConfigError

    tokenizer = make_chat_tokenizer()
    tokenizer.pad_token = "<|endoftext|>"
    import transformers

    config = transformers.Qwen2Config(**{**SMALL, "vocab_size": len(tokenizer)})
    rows = datasets.Dataset.from_list([{"prompt": "a", "completion": " b", "weights": 1.0}])
    args = trl.SFTConfig(output_dir=str(tmp_path), packing=True, report_to="none", use_cpu=True)
    with pytest.raises(ConfigError, match="packing/padding_free would merge rows"):
        DriftSFTTrainer(
            model=load_model(config, dtype=torch.float32),
            args=args,
            train_dataset=rows,
            processing_class=tokenizer,
            data_collator=DriftDataCollator(),
        )
