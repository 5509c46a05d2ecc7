"""Multi-process training: DDP and FSDP2 (2 gloo processes) against one process.

Tolerances. Every run is fp32 on CPU with the same global batches and initial weights,
so two processes differ from one only in the order of floating-point sums: which rank
sums which micro-batches' gradients, the all-reduce / reduce-scatter sum, the per-shard
partial norms of the clipping norm (the x2 loss scale and the /2 average are exact). Each
reordering moves a value by a few fp32 ulps (~1e-7 relative).
- Gradients of the first step: rtol 1e-5, atol 5e-7 (largest entries ~0.7; measured
  differences <= 6e-8).
- Losses and grad norms: rtol 1e-5 (measured ~1e-7).
- Parameters after three AdamW steps at lr 1e-2: atol 2e-5 (measured <= 4e-6; Adam's
  m/sqrt(v) amplifies the relative error of small gradients).
A real fault (a rank's micro-batch missed or counted twice, an LM-head gradient left
unreduced on its shard, a padding micro-batch that trains) changes gradients by ~1e-2 and
parameters by ~lr, far outside these bounds; scale faults, to which Adam is blind, show in
the gradients and grad norms.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drift_engine.errors import ConfigError
from drift_engine.train.distributed import (
    DistributedContext,
    all_reduce_sum_,
    clip_grad_norm_,
    full_model_state_dict,
    init_distributed,
    is_padding_micro_batch,
    prepare_model,
    run_forward,
    shard_micro_batches,
)

WORKERS = Path(__file__).parent / "dist_workers"
REPO = Path(__file__).resolve().parents[1]


def _load_common():
    spec = importlib.util.spec_from_file_location("dist_common", WORKERS / "dist_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load_common()


def _ctx(rank: int, world_size: int) -> DistributedContext:
    return DistributedContext(rank, world_size, rank, torch.device("cpu"), "ddp", "gloo")


# ----------------------------------------------------------------------------- setup


def test_single_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed("fsdp", device="cpu")
    assert ctx == DistributedContext(0, 1, 0, torch.device("cpu"), "none", None)
    assert ctx.is_main and not ctx.is_distributed


def test_init_rejects_bad_strategy_and_none_on_many_ranks(monkeypatch):
    with pytest.raises(ConfigError, match="strategy must be one of"):
        init_distributed("zero3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="use strategy 'ddp' or 'fsdp'"):
        init_distributed("none", device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        init_distributed("auto", device="cpu")


def test_one_process_helpers_are_identities():
    ctx = common.SINGLE
    model = common.build_model(tied=True)
    assert prepare_model(model, ctx) is model
    assert run_forward(model, lambda m: m) is model
    x = torch.tensor([3.0])
    assert all_reduce_sum_(x, ctx) is x and x.item() == 3.0
    batches = common.global_batches(1)
    assert shard_micro_batches(batches, ctx) == batches


# ----------------------------------------------------------------------------- data sharding


def _sized(tokens: list[int]) -> list[list[int]]:
    return [[i, t] for i, t in enumerate(tokens)]  # items: [id, num_tokens]


@pytest.mark.parametrize(
    "tokens, world",
    [
        ([900, 120, 870, 450, 460, 30, 610], 2),
        ([100] * 8, 4),
        ([5000, 10, 10, 10, 10, 10], 2),  # one huge micro-batch: count cap keeps counts equal
        ([300, 200], 3),  # fewer micro-batches than ranks
    ],
)
def test_shard_micro_batches_partition_and_balance(tokens, world):
    items = _sized(tokens)
    shards = [
        shard_micro_batches(
            items, _ctx(r, world), num_tokens=lambda b: b[1], padding=lambda b: None
        )
        for r in range(world)
    ]
    counts = {len(s) for s in shards}
    assert counts == {-(-len(tokens) // world)}  # same count on every rank
    real = [b for s in shards for b in s if b is not None]
    assert sorted(b[0] for b in real) == list(range(len(tokens)))  # a partition
    for s in shards:  # longest first on each rank
        sizes = [b[1] for b in s if b is not None]
        assert sizes == sorted(sizes, reverse=True)
    loads = [sum(b[1] for b in s if b is not None) for s in shards]
    # greedy LPT bound: the heaviest rank exceeds the lightest by at most one micro-batch
    assert max(loads) - min(loads) <= max(tokens)
    if tokens == [900, 120, 870, 450, 460, 30, 610]:
        # longest first to the lighter rank: 900→0, 870→1, 610→1, 460→0, 450→0, 120→1, 30→1
        assert loads == [1810, 1630]


def test_shard_micro_batches_is_deterministic_and_needs_sizes():
    items = _sized([7, 7, 7, 3, 9])
    first = shard_micro_batches(items, _ctx(1, 2), num_tokens=lambda b: b[1], padding=lambda b: b)
    again = shard_micro_batches(items, _ctx(1, 2), num_tokens=lambda b: b[1], padding=lambda b: b)
    assert first == again
    with pytest.raises(TypeError, match="pass num_tokens="):
        shard_micro_batches(items, _ctx(0, 2))


def test_padding_micro_batch_trains_nothing():
    batches = common.global_batches(1)  # 5 micro-batches
    shards = [shard_micro_batches(batches, _ctx(r, 2)) for r in range(2)]
    assert [len(s) for s in shards] == [3, 3]
    pads = [b for s in shards for b in s if is_padding_micro_batch(b)]
    assert len(pads) == 1
    pad = pads[0]
    smallest = min(batches, key=lambda b: b.num_tokens)
    assert torch.equal(pad.input_ids, smallest.input_ids)
    assert torch.equal(pad.cu_seqlens, smallest.cu_seqlens)
    assert (pad.labels == -100).all() and (pad.token_weights == 0).all()
    assert pad.num_trajectories == pad.num_tokens == pad.num_trained_tokens == 0
    assert pad.trajectory_index.numel() == 0 and pad.trajectory_weights.numel() == 0
    assert sum(b.num_tokens for s in shards for b in s) == sum(b.num_tokens for b in batches)

    # Its loss is 0 and every parameter still gets a (zero) gradient, so FSDP2's
    # reduce-scatter covers the same parameters as on the ranks with real batches.
    model = common.build_model(tied=False)
    loss = common.micro_batch_loss(model, pad, torch.tensor(1.0))
    loss.backward()
    assert loss.item() == 0.0
    for name, p in model.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


def test_clip_grad_norm_one_process_matches_torch():
    model = common.build_model(tied=False)
    reference = common.build_model(tied=False)
    for m in (model, reference):
        common.micro_batch_loss(m, common.global_batches(0)[0], torch.tensor(1.0)).backward()
    norm = clip_grad_norm_(model, 0.01, common.SINGLE)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
    torch.testing.assert_close(norm, expected)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


# ----------------------------------------------------------------------------- 2 processes


def _torchrun(script: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--standalone", str(script), *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _dcp_save(model, optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path), no_dist=True)


def _dcp_load(model, optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    bundle = {"model": model_sd, "optim": optim_sd}
    dcp.load(bundle, checkpoint_id=str(path), no_dist=True)
    set_state_dict(
        model, optimizer, model_state_dict=bundle["model"], optim_state_dict=bundle["optim"]
    )


PARAM_ATOL = 2e-5
GRAD_RTOL, GRAD_ATOL = 1e-5, 5e-7
LOSS_RTOL = 1e-5


def _assert_all_close(values: dict, reference: dict, label: str, **tolerance) -> None:
    assert values.keys() == reference.keys(), label
    for name, ref in reference.items():
        message = f"{label}: {name}"
        torch.testing.assert_close(
            values[name], ref, **tolerance, msg=lambda m, h=message: f"{h}: {m}"
        )


def _assert_params_close(params: dict, reference: dict, label: str) -> None:
    _assert_all_close(params, reference, label, atol=PARAM_ATOL, rtol=0)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """One torchrun launch doing every 2-rank check; the one-process side runs here."""
    out = tmp_path_factory.mktemp("dist")
    # One process: 2 steps, checkpoint (resumed on 2 ranks by the worker), then step 3.
    model = common.build_model(tied=False)
    optimizer = common.build_optimizer(model)
    losses, norms = common.train_single(model, optimizer, range(2))
    _dcp_save(model, optimizer, out / "single-step2")
    more_losses, more_norms = common.train_single(model, optimizer, range(2, 3))
    uninterrupted = {
        "losses": losses + more_losses,
        "norms": norms + more_norms,
        "params": {k: v.clone() for k, v in model.state_dict().items()},
    }
    proc = _torchrun(
        WORKERS / "train_worker.py", "--out", str(out), "--resume-from", str(out / "single-step2")
    )
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return out, torch.load(out / "results.pt", weights_only=True), uninterrupted


@pytest.mark.parametrize("case", ["fsdp-untied", "fsdp-tied", "ddp-untied", "ddp-tied"])
def test_two_ranks_match_one_process(two_rank_run, case):
    _, results, _ = two_rank_run
    r = results[case]
    _assert_all_close(
        r["grads"], r["ref_grads"], f"{case} gradient", atol=GRAD_ATOL, rtol=GRAD_RTOL
    )
    torch.testing.assert_close(r["losses"], r["ref_losses"], rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(r["norms"], r["ref_norms"], rtol=LOSS_RTOL, atol=0)
    assert all(n > common.MAX_NORM for n in r["norms"])  # clipping was active
    _assert_params_close(r["params"], r["ref_params"], case)
    if case.endswith("-tied"):
        assert torch.equal(r["params"]["lm_head.weight"], r["params"]["model.embed_tokens.weight"])


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_resume_one_process_checkpoint_on_two_ranks(two_rank_run, strategy):
    _, results, uninterrupted = two_rank_run
    r = results[f"{strategy}-resumed"]
    torch.testing.assert_close(r["losses"], uninterrupted["losses"][2:], rtol=LOSS_RTOL, atol=0)
    _assert_params_close(r["params"], uninterrupted["params"], f"{strategy} resumed")


def test_resume_two_rank_fsdp_checkpoint_in_one_process(two_rank_run):
    out, _, uninterrupted = two_rank_run
    model = common.build_model(tied=False, seed=1)  # weights come from the checkpoint
    optimizer = common.build_optimizer(model)
    _dcp_load(model, optimizer, out / "fsdp-step2")
    losses, _ = common.train_single(model, optimizer, range(2, 3))
    torch.testing.assert_close(losses, uninterrupted["losses"][2:], rtol=LOSS_RTOL, atol=0)
    _assert_params_close(
        full_model_state_dict(model, common.SINGLE), uninterrupted["params"], "resumed on 1"
    )


# ----------------------------------------------------------------------------- the trainer


def _trainer_workspace(root: Path) -> tuple[Path, Path]:
    """A tiny random Qwen2 model folder (untied head) and a rollouts file for it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from drift_engine.data.rollouts import RolloutSet, save_rollouts

    config = Qwen2Config(
        vocab_size=common.VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(root / "model")

    gen = torch.Generator().manual_seed(0)
    tokens, turns, groups, rewards = [], [], [], []
    for i in range(24):  # 8 prompt groups of 3 trajectories, 1 to 3 turns each
        n_turns = int(torch.randint(1, 4, (), generator=gen))
        toks, tids = [], []
        for k in range(1, n_turns + 1):
            context, answer = (
                int(torch.randint(a, b, (), generator=gen)) for a, b in ((3, 12), (2, 9))
            )
            toks += torch.randint(0, common.VOCAB, (context + answer,), generator=gen).tolist()
            tids += [0] * context + [k] * answer
        tokens.append(toks)
        turns.append(tids)
        groups.append(i // 3)
        rewards.append([0.0] * (n_turns - 1) + [float(torch.rand((), generator=gen) < 0.5)])
    data = root / "rollouts.safetensors"
    save_rollouts(data, RolloutSet.from_trajectories(tokens, turns, groups, rewards))
    return root / "model", data


def _train_args(model: Path, data: Path, out: Path, grad_accum: int) -> list[str]:
    return [
        "train", "--data", str(data), "--model", str(model), "--out", str(out),
        "--device", "cpu", "--dtype", "float32", "--batch-tokens", "64",
        "--grad-accum", str(grad_accum), "--max-steps", "3", "--lr", "3e-3",
        "--seed", "0",
    ]  # fmt: skip


def _run_metrics(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _exported(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (checkpoint,) = sorted(out.glob("checkpoint-*"))
    adapter = checkpoint / "model" / "adapter_model.safetensors"  # LoRA runs: the adapters
    return load_file(adapter if adapter.exists() else checkpoint / "model" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("compiled", "lora"),
    [(False, False), (True, False), (False, True)],
    ids=["eager", "compiled", "lora"],
)
def test_trainer_cli_two_ranks_fsdp_match_one_process(tmp_path, compiled, lora):
    """`torchrun -m drift_engine train` on 2 ranks (FSDP2, one micro-batch per rank and
    step, gradient checkpointing inside the sharded layers; also with the decoder layers
    compiled after fully_shard, and with LoRA adapters) equals one eager process
    accumulating the same two micro-batches per step without checkpointing."""
    from drift_engine.cli import main

    model, data = _trainer_workspace(tmp_path)
    lora_flags = ["--lora-r", "4"] if lora else []
    compile_flags = []
    if compiled:
        # aot_eager: dynamo and AOT autograd without code generation (quick on 2 cores)
        config = tmp_path / "compile.toml"
        config.write_text('[model]\ncompile = true\ncompile_backend = "aot_eager"\n')
        compile_flags = ["--config", str(config)]
    with pytest.raises(SystemExit) as done:
        main(
            [
                *_train_args(model, data, tmp_path / "one", grad_accum=2),
                "--no-gradient-checkpointing",
                *lora_flags,
            ]
        )
    assert done.value.code in (0, None)

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "drift_engine", *_train_args(model, data, tmp_path / "two", grad_accum=1),
           "--strategy", "fsdp", "--gradient-checkpointing", *compile_flags,
           *lora_flags]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    if compiled:
        import json

        run = json.loads((tmp_path / "two" / "run.json").read_text())
        assert run["config"]["model"]["compile"] is True, run["config"]["model"]

    one, two = _run_metrics(tmp_path / "one"), _run_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for key in ("tokens", "trained_tokens", "trajectories"):
        assert [r[key] for r in two] == [r[key] for r in one], key
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(
            [r[key] for r in two], [r[key] for r in one], rtol=LOSS_RTOL, atol=0, msg=key
        )
    _assert_params_close(_exported(tmp_path / "two"), _exported(tmp_path / "one"), "trainer")


@pytest.mark.slow
def test_trainer_resumes_two_rank_ddp_checkpoint_under_fsdp(tmp_path):
    """Two steps under DDP, then step 3 resumed from that checkpoint under FSDP2, equal
    three steps in one process."""
    import json

    from drift_engine.cli import main

    model, data = _trainer_workspace(tmp_path)
    no_warmup = ["--warmup-ratio", "0"]  # the schedule then does not depend on --max-steps
    with pytest.raises(SystemExit) as done:
        main([*_train_args(model, data, tmp_path / "one", grad_accum=2), *no_warmup])
    assert done.value.code in (0, None)

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    two = [*_train_args(model, data, tmp_path / "two", grad_accum=1), *no_warmup,
           "--keep-last", "1"]  # fmt: skip
    for extra in (["--strategy", "ddp", "--max-steps", "2"], ["--strategy", "fsdp", "--resume"]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "drift_engine", *two, *extra]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
        assert proc.returncode == 0, f"{extra}:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"

    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["strategy"] == "fsdp" and run["world_size"] == 2
    one, two = _run_metrics(tmp_path / "one"), _run_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(
            [r[key] for r in two], [r[key] for r in one], rtol=LOSS_RTOL, atol=0, msg=key
        )
    _assert_params_close(_exported(tmp_path / "two"), _exported(tmp_path / "one"), "resumed")
