"""Training throughput: the DRIFT reference step and plain Hugging Face packing vs this
trainer, same model, same data.

All sides train the same random-initialised model on the same synthetic trajectories
(multi-turn, last assistant turn trained, lengths log-normal), once each, after a short
untimed warmup:

- reference: as the DRIFT reference trains (Hugging Face Trainer step): batches of 8
  trajectories right-padded to the longest, SDPA attention, full-vocabulary logits cast to
  fp32, per-trajectory token-mean cross-entropy × weight averaged over the batch, AdamW
  (fused on CUDA), parameters in the compute dtype;
- HF packed (``--no-hf-packed`` skips it): the best assembly a user could make from peers
  without drift-engine: the trainer's packed micro-batches (same sequences, same order) fed
  to the Hugging Face model as one row with restarting position ids and no attention mask,
  so that transformers builds its packed-sequence (block-diagonal causal) mask for SDPA;
  the same per-token weighted cross-entropy, AdamW as the reference's. On CUDA the loss is
  Liger-Kernel's fused linear cross-entropy on the final hidden states (reduction "none",
  times the token weights: Liger >= 0.8.5 recomputes in backward with each token's upstream
  gradient) when liger-kernel is importable; otherwise, and on CPU (Liger's kernels are
  Triton), full-vocabulary logits cast to fp32 and dense cross-entropy, the row labelled
  with the loss it ran. transformers' flex_attention would skip the masked blocks, but it
  compiles flex_attention for static shapes (a recompile per packed length), so SDPA it is
  unless ``--hf-attention`` says otherwise;
- drift-engine: ``drift_engine.train.Trainer`` (packed micro-batches under a token budget,
  varlen attention, fused weighted loss, fp32 master weights with 16-bit autocast on GPU);
  with ``--compile``, its decoder layers compiled (``model.compile``), compile time excluded.

Reported per side: real (non-padding) tokens/s, the padding fraction of what the model
processed, peak memory (CUDA), and MFU = (6·P·tokens + attention FLOPs) / time / peak,
where P counts the parameters used in matrix products (the LM head, not the embedding
lookup), attention FLOPs are 6·layers·heads·head_dim·L² per trajectory of L real tokens
(causal QKᵀ and AV, forward + backward), and peak is the card's dense bf16 TFLOP/s from
the table below. Only real tokens count as useful work.

    python bench/train_throughput.py --preset cpu
    python bench/train_throughput.py --preset cpu-smollm2-135m
    python bench/train_throughput.py --preset gpu --json bench/results/train_throughput_h100.json
    python bench/train_throughput.py --preset gpu --compile --batch-tokens 32768
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from drift_engine.data.rollouts import RolloutSet, save_rollouts
from drift_engine.train.config import config_from_dict
from drift_engine.train.loop import Trainer

# Dense bf16 peak of the card (TFLOP/s, no sparsity), matched against the device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
}

# Qwen2-0.5B's architecture (no download: random initialisation).
QWEN2_0_5B = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}

TINY = {
    "model_type": "qwen2",
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}

# SmolLM2-135M's architecture (Llama; no download: random initialisation).
SMOLLM2_135M = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}

PRESETS = {
    # finishes in well under 2 minutes on 2 CPU cores
    "cpu": dict(
        model=TINY,
        dtype="float32",
        trajectories=32,
        median_tokens=128,
        max_tokens=512,
        # 32 trajectories of ~128 tokens: a 1024-token budget keeps the number of optimizer
        # steps comparable to the reference's padded batches of 8.
        batch_tokens=1024,
        reference_batch=8,
        reference_gradient_checkpointing=False,
        hf_packed=True,
        warmup_steps=1,
        repeats=3,
    ),
    # a real small architecture on short trajectories: a few minutes on 2 CPU cores
    "cpu-smollm2-135m": dict(
        model=SMOLLM2_135M,
        dtype="float32",
        trajectories=16,
        median_tokens=128,
        max_tokens=512,
        batch_tokens=1024,
        reference_batch=8,
        reference_gradient_checkpointing=False,
        hf_packed=True,
        warmup_steps=1,
        # the second pass sees every micro-batch shape a second time (first calls of a new
        # shape cost up to 2x on CPU)
        repeats=2,
    ),
    "gpu": dict(
        model=QWEN2_0_5B,
        dtype="bfloat16",
        trajectories=512,
        median_tokens=900,
        max_tokens=2048,  # longer padded batches of 8 exhaust 80 GB in the reference
        batch_tokens=16384,
        reference_batch=8,
        # the reference runs out of memory on an 80 GB card without it
        reference_gradient_checkpointing=True,
        # Hugging Face packed with Liger's fused loss (the dense loss if liger is absent)
        hf_packed=True,
        warmup_steps=2,
        repeats=1,
    ),
}


# ----------------------------------------------------------------------------- data


def synthetic_rollouts(
    num: int, median_tokens: int, max_tokens: int, vocab: int, seed: int
) -> RolloutSet:
    """``num`` trajectories with log-normal lengths (median ``median_tokens``, σ = 0.6),
    1-3 assistant turns separated by context; the last turn is ~25% of the tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(median_tokens) + 0.6 * torch.randn(num, generator=g))
    lengths = lengths.round().clamp(32, max_tokens).long().tolist()
    tokens, turns, groups, rewards = [], [], [], []
    for i, length in enumerate(lengths):
        n_turns = int(torch.randint(1, 4, (1,), generator=g))
        last = max(2, length // 4)
        prefix = length - last
        # context, (answer, context) * (n_turns - 1), then the last answer
        cuts = torch.linspace(0, prefix, 2 * n_turns).round().long().tolist()
        tids: list[int] = []
        for seg in range(2 * n_turns - 1):
            size = cuts[seg + 1] - cuts[seg]
            tids += [0 if seg % 2 == 0 else seg // 2 + 1] * size
        tids += [n_turns] * last
        tokens.append(torch.randint(0, vocab, (length,), generator=g).tolist())
        turns.append(tids)
        groups.append(i // 8)
        rewards.append([0.0] * (n_turns - 1) + [float(torch.rand(1, generator=g) < 0.5)])
    rs = RolloutSet.from_trajectories(tokens, turns, groups, rewards)
    weights = torch.exp(torch.randn(num, generator=g) * 0.5).to(torch.float32)
    return dataclasses.replace(rs, weights=weights)


def write_workspace(
    root: Path, preset: dict, trajectories: int, seed: int
) -> tuple[Path, Path, RolloutSet, int]:
    """The preset's random-initialised model and synthetic rollouts, saved under ``root``:
    ``(model_dir, rollouts_file, rollouts, parameters counted for FLOPs)``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir, data = root / "model", root / "rollouts.safetensors"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**preset["model"]))
    params_for_flops = matmul_params(model)
    model.save_pretrained(model_dir)
    del model
    rollouts = synthetic_rollouts(
        trajectories,
        preset["median_tokens"],
        preset["max_tokens"],
        preset["model"]["vocab_size"],
        seed,
    )
    save_rollouts(data, rollouts)
    return model_dir, data, rollouts, params_for_flops


# ----------------------------------------------------------------------------- FLOPs


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters taking part in matrix products: all but the input embedding, plus the
    LM head when it is tied to the embedding."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    return total - embedding.numel() + (embedding.numel() if tied else 0)


def training_flops(model_config: dict, params: int, lengths: list[int]) -> float:
    head_dim = model_config["hidden_size"] // model_config["num_attention_heads"]
    attention = sum(
        6
        * model_config["num_hidden_layers"]
        * model_config["num_attention_heads"]
        * head_dim
        * L**2
        for L in lengths
    )
    return 6.0 * params * sum(lengths) + attention


def peak_tflops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu (no bf16 peak stated; MFU not reported)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, name
    return None, f"{name} (peak unknown; MFU not reported)"


# ----------------------------------------------------------------------------- reference


def reference_pass(model_dir: Path, rollouts: RolloutSet, preset: dict, device, seed: int) -> dict:
    """The DRIFT reference's step over every trajectory in padded batches; returns timings."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, preset["dtype"])
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa"
    ).to(device)
    model.config.use_cache = False
    if preset["reference_gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-6, weight_decay=0.1, fused=device.type == "cuda"
    )
    trained = rollouts.trained_mask("last")  # (T,)
    order = torch.randperm(rollouts.num_trajectories, generator=torch.Generator().manual_seed(seed))
    size = preset["reference_batch"]
    batches = [order[i : i + size].tolist() for i in range(0, len(order), size)]

    def step(rows: list[int]) -> tuple[int, int]:
        seqs = [rollouts.input_ids[rollouts.trajectory_slice(i)].long() for i in rows]
        masks = [trained[rollouts.trajectory_slice(i)] for i in rows]
        longest = max(len(s) for s in seqs)
        input_ids = torch.zeros(len(rows), longest, dtype=torch.long)  # (B, L)
        attention = torch.zeros(len(rows), longest, dtype=torch.long)  # (B, L)
        labels = torch.full((len(rows), longest), -100, dtype=torch.long)  # (B, L)
        for b, (s, m) in enumerate(zip(seqs, masks, strict=True)):
            input_ids[b, : len(s)] = s
            attention[b, : len(s)] = 1
            labels[b, : len(s)] = torch.where(m, s, -100)
        input_ids, attention, labels = (t.to(device) for t in (input_ids, attention, labels))
        weights = rollouts.weights[rows].to(device)  # (B,)
        logits = model(input_ids=input_ids, attention_mask=attention).logits.float()  # (B, L, V)
        # Shift the labels, not the logits (as transformers' causal-LM loss does): position
        # t predicts token t+1, and no (B, L, V) copy is made.
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, L)
        ce = F.cross_entropy(
            logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        ).view(len(rows), longest)  # (B, L), 0 where ignored
        counts = (targets != -100).sum(1).clamp_min(1)  # (B,)
        loss = (weights * ce.sum(1) / counts).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(len(s) for s in seqs), len(rows) * longest

    for rows in batches[: preset["warmup_steps"]]:
        step(rows)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one_pass() -> tuple[int, int]:
        real = padded = 0
        for rows in batches:
            r, p = step(rows)
            real += r
            padded += p
        return real, padded

    seconds, (real, padded), cpu_seconds = _fastest(one_pass, preset["repeats"], device)
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "real_tokens": real,
        "processed_tokens": padded,
        "padding_fraction": 1 - real / padded,
        "optimizer_steps": len(batches),
        "peak_memory_gb": _peak_gb(device),
    }
    return result


# ----------------------------------------------------------------------------- HF packed


def liger_loss(device: torch.device) -> tuple[torch.nn.Module | None, str]:
    """(Liger's fused linear cross-entropy, reduction "none", or None; the loss's label).
    Only on CUDA: Liger's kernels are Triton kernels."""
    if device.type != "cuda":
        return None, "dense fp32 logits"
    try:
        import liger_kernel
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )
    except ImportError as error:
        print(f"liger-kernel is not importable ({error}): the HF packed side uses the dense loss")
        return None, "dense fp32 logits; liger-kernel not importable"
    version = getattr(liger_kernel, "__version__", None)
    if version is None:
        from importlib.metadata import version as package_version

        version = package_version("liger-kernel")
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="none")
    return loss, f"Liger FLCE {version}, reduction none x token weights"


def hf_packed_loss(
    model: torch.nn.Module, batch, fused_loss: torch.nn.Module | None = None
) -> torch.Tensor:
    """Σ token_weights·CE / trajectories of one PackedBatch with plain transformers: restarting
    position ids and no attention mask make transformers mask each packed sequence from the
    others (only without a KV cache: ``model.config.use_cache`` must be False).

    With ``fused_loss`` (Liger's, reduction "none") the per-token CE comes from the final
    hidden states and the LM head's weight, without logits; otherwise from dense fp32 logits.
    """
    if fused_loss is None:
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
        ce = F.cross_entropy(logits[0].float(), batch.labels, reduction="none")  # (T,)
    else:
        hidden = model.get_decoder()(
            input_ids=batch.input_ids, position_ids=batch.position_ids
        ).last_hidden_state[0]  # (T, H)
        weight = model.get_output_embeddings().weight  # (V, H)
        ce = fused_loss(weight, hidden, batch.labels).float()  # (T,)
    return (batch.token_weights * ce).sum() / batch.num_trajectories


def hf_packed_pass(model_dir: Path, batches: list, preset: dict, device, seed: int) -> dict:
    """Plain transformers on the trainer's packed micro-batches (``batches``: PackedBatch):
    one row with restarting position ids and no attention mask (transformers' packed-sequence
    masking, ``preset["hf_attention"]``), Liger's fused loss on CUDA when importable or dense
    fp32 logits, Σ token_weights·CE / trajectories, AdamW as the reference's. Returns
    timings, with the attention and loss that ran."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, preset["dtype"])
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=preset["hf_attention"]
    ).to(device)
    fused_loss, loss_name = liger_loss(device)
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-6, weight_decay=0.1, fused=device.type == "cuda"
    )
    batches = [batch.to(device) for batch in batches]

    def step(batch) -> int:
        hf_packed_loss(model, batch, fused_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch.num_tokens

    for batch in batches[: preset["warmup_steps"]]:
        step(batch)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, real, cpu_seconds = _fastest(
        lambda: sum(step(b) for b in batches), preset["repeats"], device
    )
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "real_tokens": real,
        "processed_tokens": real,
        "padding_fraction": 0.0,
        "optimizer_steps": len(batches),
        "peak_memory_gb": _peak_gb(device),
        "attention": preset["hf_attention"],
        "loss": loss_name,
    }


def packed_micro_batches(model_dir: Path, data: Path, out: Path, preset: dict, device, seed):
    """The trainer's packed micro-batches of one epoch, in its order (on the CPU)."""
    trainer = make_trainer(model_dir, data, out, preset, device, seed)
    batches = [trainer.pack_micro_batch(mb) for mb in trainer.epoch_plan(0).micro_batches]
    del trainer
    return batches


# ----------------------------------------------------------------------------- trainer


def make_trainer(model_dir: Path, data: Path, out: Path, preset: dict, device, seed: int):
    """This trainer on the preset (one packed micro-batch per optimizer step), in training
    mode as ``Trainer.fit`` puts it."""
    config = config_from_dict(
        {
            "out": str(out),
            "seed": seed,
            "device": str(device),
            "progress": False,
            "data": {"path": str(data), "batch_tokens": preset["batch_tokens"], "grad_accum": 1},
            "model": {
                "name_or_path": str(model_dir),
                "dtype": preset["dtype"],
                "compile": preset["compile"],
            },
            "optim": {"lr": 1e-6},
        }
    )
    trainer = Trainer(config)
    trainer.model.train()
    return trainer


def trainer_pass(model_dir: Path, data: Path, out: Path, preset: dict, device, seed: int) -> dict:
    """This trainer over every trajectory: one packed micro-batch per optimizer step."""
    trainer = make_trainer(model_dir, data, out, preset, device, seed)
    plan = trainer.epoch_plan(0)
    warmup = plan.micro_batches[: preset["warmup_steps"]]
    if preset["compile"]:
        warmup.append(_recompiling_micro_batch(trainer, plan.micro_batches))
    for micro_batch in warmup:
        trainer.train_step([micro_batch])
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one_pass() -> int:
        return sum(trainer.train_step([mb])["tokens"] for mb in plan.micro_batches)

    graphs_before = _compiled_graphs()
    seconds, real, cpu_seconds = _fastest(one_pass, preset["repeats"], device)
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "real_tokens": real,
        "processed_tokens": real,
        "padding_fraction": 0.0,
        "packing_efficiency": plan.stats.efficiency,
        "optimizer_steps": len(plan.micro_batches),
        "peak_memory_gb": _peak_gb(device),
    }
    if preset["compile"]:
        result["graphs_compiled_while_timed"] = _compiled_graphs() - graphs_before
    return result


def _recompiling_micro_batch(trainer: Trainer, micro_batches: list[list[int]]) -> list[int]:
    """A micro-batch that differs from the first one in its token count, sequence count and
    longest sequence: after both, every size that varies between micro-batches is dynamic
    in the compiled layers (see drift_engine/models/compile.py), so the timed passes do not
    compile."""

    def shape(indices: list[int]) -> tuple[int, int, int]:
        batch = trainer.pack_micro_batch(indices)
        return batch.num_tokens, batch.num_trajectories, batch.max_seqlen

    first = shape(micro_batches[0])
    shapes = [(mb, shape(mb)) for mb in micro_batches[1:]]
    for mb, other in shapes:
        if all(a != b for a, b in zip(first, other, strict=True)):
            return mb
    return next((mb for mb, other in shapes if other[2] != first[2]), micro_batches[0])


def _compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# ----------------------------------------------------------------------------- main


def _fastest(fn, repeats: int, device: torch.device):
    """(seconds, result, cpu_seconds) of the fastest of ``repeats`` timed calls of ``fn``: on
    a shared machine the fastest pass is the one least disturbed by other processes;
    cpu_seconds is that pass's process CPU time (all threads)."""
    best = None
    for _ in range(repeats):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = fn()
        _sync(device)
        seconds = time.perf_counter() - start
        if best is None or seconds < best[0]:
            best = (seconds, result, time.process_time() - cpu_start)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--trajectories", type=int, help="override the preset's count")
    parser.add_argument(
        "--max-tokens", type=int, help="override the preset's longest trajectory (tokens)"
    )
    parser.add_argument(
        "--batch-tokens", type=int, help="override the preset's packed micro-batch budget"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile drift-engine's decoder layers (model.compile); the reference stays eager",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="measure only this trainer (e.g. a second run of the same preset)",
    )
    parser.add_argument(
        "--no-hf-packed",
        action="store_true",
        help="skip the Hugging Face packed-sequence side",
    )
    parser.add_argument(
        "--hf-attention",
        default="sdpa",
        help="attn_implementation of the Hugging Face packed side (default: sdpa)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    preset = dict(PRESETS[args.preset])
    if args.trajectories:
        preset["trajectories"] = args.trajectories
    if args.max_tokens:
        preset["max_tokens"] = args.max_tokens
    if args.batch_tokens:
        preset["batch_tokens"] = args.batch_tokens
    if preset["batch_tokens"] < preset["max_tokens"]:
        parser.error(
            f"--batch-tokens {preset['batch_tokens']} is below the longest trajectory "
            f"({preset['max_tokens']}): the trainer would truncate what the reference trains whole"
        )
    preset["compile"] = args.compile
    preset["hf_packed"] = preset["hf_packed"] and not args.no_hf_packed
    preset["hf_attention"] = args.hf_attention
    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("the gpu preset needs CUDA")

    model_config = preset["model"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, data, rollouts, params_for_flops = write_workspace(
            tmp, preset, preset["trajectories"], args.seed
        )
        lengths = rollouts.lengths().tolist()

        reference = None
        if not args.no_reference:
            try:
                reference = reference_pass(model_dir, rollouts, preset, device, args.seed)
            except torch.cuda.OutOfMemoryError as error:
                # Padded fp32 logits of long trajectories: report it, still measure the trainer.
                reference = {"error": f"out of memory: {str(error).splitlines()[0]}"}
            _free(device)  # the reference's model and optimizer went out of scope
        hf_packed = None
        if preset["hf_packed"]:
            batches = packed_micro_batches(model_dir, data, tmp / "pack", preset, device, args.seed)
            hf_packed = hf_packed_pass(model_dir, batches, preset, device, args.seed)
            del batches
            _free(device)
        ours = trainer_pass(model_dir, data, tmp / "out", preset, device, args.seed)

    peak, card = peak_tflops(device)
    flops = training_flops(model_config, params_for_flops, lengths)
    measured = [ours] + [r for r in (reference, hf_packed) if r and "error" not in r]
    for result in measured:
        result["real_tokens_per_s"] = result["real_tokens"] / result["seconds"]
        # Per second of process CPU time (all threads): on a shared CPU machine this moves far
        # less with the other processes' load than the wall-clock figure.
        result["real_tokens_per_cpu_s"] = result["real_tokens"] / result["cpu_seconds"]
        result["tflops_per_s"] = flops / result["seconds"] / 1e12
        result["mfu"] = result["tflops_per_s"] / peak if peak else None
    # MFU counts the LM head on every token, as model-FLOP conventions do; this trainer runs it
    # only on the rows that reach the loss (the trained turn), so it executes fewer FLOPs.
    trained_tokens = int(rollouts.trained_mask("last").sum())
    lm_head_flops_skipped = (
        6.0
        * model_config["vocab_size"]
        * model_config["hidden_size"]
        * (sum(lengths) - trained_tokens)
    )
    executed_tflops = (flops - lm_head_flops_skipped) / ours["seconds"] / 1e12
    ours["executed_tflops_per_s"] = executed_tflops
    ours["executed_flop_utilization"] = executed_tflops / peak if peak else None
    report = {
        "benchmark": "train_throughput",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "preset": args.preset,
        "machine": machine_info(device),
        "peak_bf16_tflops": peak,
        "card": card,
        "setup": {
            "model": model_config,
            "dtype": preset["dtype"],
            "trajectories": len(lengths),
            "tokens": sum(lengths),
            "median_tokens": preset["median_tokens"],
            "max_tokens": preset["max_tokens"],
            "batch_tokens": preset["batch_tokens"],
            "compile": preset["compile"],
            "reference_batch": preset["reference_batch"],
            "reference_gradient_checkpointing": preset["reference_gradient_checkpointing"],
            "hf_packed": preset["hf_packed"],
            "hf_attention": preset["hf_attention"],
            "timed_passes": f"fastest of {preset['repeats']} passes over all trajectories",
            "flops_formula": "6*P*tokens + 6*layers*heads*head_dim*sum(L^2)",
            "params_for_flops": params_for_flops,
            "trained_tokens": trained_tokens,
        },
        "reference": reference,
        "hf_packed": hf_packed,
        "drift_engine": ours,
        "speedup": (
            ours["real_tokens_per_s"] / reference["real_tokens_per_s"]
            if reference and "error" not in reference
            else None
        ),
        "speedup_vs_hf_packed": (
            ours["real_tokens_per_s"] / hf_packed["real_tokens_per_s"] if hf_packed else None
        ),
    }
    if device.type == "cpu":
        report["cpu_time_speedup"] = {
            name: ours["real_tokens_per_cpu_s"] / other["real_tokens_per_cpu_s"]
            for name, other in (("reference", reference), ("hf_packed", hf_packed))
            if other and "error" not in other
        }
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_json = args.json.with_name(args.json.name + ".tmp")
        tmp_json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_json, args.json)
    return report


def _hf_packed_name(result: dict | None, setup: dict) -> str:
    attention = setup.get("hf_attention", "sdpa")
    loss = (result or {}).get("loss", "dense fp32 logits")
    return f"HF packed + {attention} ({loss})"


def markdown(report: dict) -> str:
    def row(name: str, r: dict | None) -> str:
        if r is None:
            return f"| {name} | not run (--no-reference) | | | | | | |"
        if "error" in r:
            return f"| {name} | {r['error']} | | | | | | |"
        mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        return (
            f"| {name} | {r['real_tokens_per_s']:,.0f} | {100 * r['padding_fraction']:.1f}% | "
            f"{mem} | {r['tflops_per_s']:.3f} | {mfu} | {r['optimizer_steps']} "
            f"| {r['real_tokens_per_cpu_s']:,.0f} |"
        )

    s = report["setup"]
    m = report["machine"]
    lines = [
        f"## Training throughput ({report['preset']} preset, {report['date']})",
        "",
        f"Machine: {m.get('gpu', m['cpu'])}, {m['cpu_threads']} CPU threads, torch {m['torch']}, "
        f"transformers {m['transformers']}. Peak: {report['card']}"
        + (
            f" = {report['peak_bf16_tflops']:.0f} bf16 TFLOP/s."
            if report["peak_bf16_tflops"]
            else "."
        ),
        f"Model: {s['model']['model_type']} hidden {s['model']['hidden_size']}, "
        f"{s['model']['num_hidden_layers']} layers, vocab {s['model']['vocab_size']}, {s['dtype']}. "
        f"Data: {s['trajectories']} trajectories, {s['tokens']:,} tokens (median length "
        f"{s['median_tokens']}, at most {s['max_tokens']}). Reference: padded batches of "
        f"{s['reference_batch']}"
        + (", gradient checkpointing" if s["reference_gradient_checkpointing"] else "")
        + f". drift-engine: {s['batch_tokens']}-token packed micro-batches "
        f"(packing efficiency {100 * report['drift_engine']['packing_efficiency']:.1f}%)"
        + (", decoder layers compiled (torch.compile, inductor)" if s["compile"] else "")
        + ".",
        "",
        "| | real tokens/s | padding | peak GB | TFLOP/s | MFU | optimizer steps "
        "| real tokens per CPU-second |",
        "|---|---|---|---|---|---|---|---|",
        row("reference (padded, fp32 logits)", report["reference"]),
        *(
            [row(_hf_packed_name(report["hf_packed"], s), report["hf_packed"])]
            if s["hf_packed"]
            else []
        ),
        row(
            "drift-engine (packed, fused loss" + (", compiled layers)" if s["compile"] else ")"),
            report["drift_engine"],
        ),
        "",
        (
            f"Speedup (real tokens/s): **{report['speedup']:.2f}x**"
            if report["speedup"] is not None
            else "Speedup: n/a (no reference measured)"
        )
        + (
            f"; against HF packed **{report['speedup_vs_hf_packed']:.2f}x**"
            if report["speedup_vs_hf_packed"] is not None
            else ""
        )
        + (
            "; per CPU-second: "
            + ", ".join(f"{x:.2f}x the {k}" for k, x in report["cpu_time_speedup"].items())
            if report.get("cpu_time_speedup")
            else ""
        ),
        "",
        f"MFU counts the LM head on every token; drift-engine runs it only on the "
        f"{s['trained_tokens']:,} trained tokens "
        f"({100 * s['trained_tokens'] / max(1, s['tokens']):.0f}%), so it executes "
        f"{report['drift_engine']['executed_tflops_per_s']:.3f} TFLOP/s"
        + (
            f" ({100 * report['drift_engine']['executed_flop_utilization']:.1f}% of peak)."
            if report["drift_engine"]["executed_flop_utilization"] is not None
            else "."
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
