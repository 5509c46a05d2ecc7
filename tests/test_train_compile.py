"""Regional compilation (``model.compile``): compiled decoder layers train exactly as eager
ones, packed micro-batches of new sizes reuse the compiled code, and the option reaches the
trainer from the command line.

Most tests compile with ``aot_eager`` (dynamo and AOT autograd, no code generation) through
a counting backend, so they are quick and can tell how many graphs were compiled; one test
runs inductor. On CPU the attention's exact SDPA fallback runs eagerly between compiled
graphs; ``kernel_path`` instead stands in for the CUDA varlen kernel so that whole layers
are traced, as on a GPU.

Tolerances: both sides are fp32 with the same weights and data; aot_eager runs the same
ATen ops, decomposed, and inductor fuses them and reorders reductions. Measured: losses
equal, gradients within 1.3e-7 of eager (largest entries ~0.7), so rtol 1e-5 and atol
1e-6. One layer's MLP output off by 1% moves gradients by ~6e-4, far outside.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import base_config, make_model_dir, make_rollouts

from drift_engine.attention import varlen as varlen_module
from drift_engine.cli import cli
from drift_engine.data.rollouts import save_rollouts
from drift_engine.errors import ConfigError
from drift_engine.models.compile import compile_decoder_layers
from drift_engine.train.config import config_from_dict, load_config

COUNTING_BACKEND = "drift_test_counting_aot_eager"
compiled_graphs: list[torch.fx.GraphModule] = []


def _counting_aot_eager(graph: torch.fx.GraphModule, example_inputs):
    compiled_graphs.append(graph)
    return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)


if COUNTING_BACKEND not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(_counting_aot_eager, name=COUNTING_BACKEND)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code is cached on the (shared) code objects of transformers' layers: start
    and end every test without it."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_graphs.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("compile")
    models = {arch: make_model_dir(root / arch, arch) for arch in ("qwen2", "llama")}
    rollouts = make_rollouts(tokenizer=AutoTokenizer.from_pretrained(models["qwen2"]))
    data = root / "rollouts.safetensors"
    save_rollouts(data, rollouts)
    return {"root": root, "models": models, "data": data, "rollouts": rollouts}


def make_trainer(workspace, out: Path, arch: str = "qwen2", **overrides):
    from drift_engine.train.loop import Trainer

    overrides = {
        "model.name_or_path": str(workspace["models"][arch]),
        "optim.grad_clip": 0.0,  # compare raw gradients
        **overrides,
    }
    trainer = Trainer(base_config(workspace, out, **overrides))
    trainer.model.train()  # as fit() does
    return trainer


def compiled_trainer(workspace, out: Path, arch: str = "qwen2", **overrides):
    return make_trainer(
        workspace,
        out,
        arch,
        **{"model.compile": True, "model.compile_backend": COUNTING_BACKEND, **overrides},
    )


def train_steps(trainer, micro_batches: list[list[int]]) -> tuple[list[float], dict]:
    """Losses of one optimizer step per micro-batch, and the gradients of the last step
    (taken just before the optimizer applies them)."""
    gradients: dict[str, torch.Tensor] = {}

    def keep_gradients(optimizer, args, kwargs):
        gradients.clear()
        for name, param in trainer.model.named_parameters():
            if param.grad is not None:
                gradients[name] = param.grad.detach().clone()

    handle = trainer.optimizer.register_step_pre_hook(keep_gradients)
    try:
        losses = [trainer.train_step([mb])["loss"] for mb in micro_batches]
    finally:
        handle.remove()
    return losses, gradients


def assert_same_training(compiled, eager):
    (compiled_losses, compiled_grads), (eager_losses, eager_grads) = compiled, eager
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def packed_shapes(trainer, micro_batch: list[int]) -> tuple[int, int, int]:
    """(tokens, sequences, longest sequence) of a micro-batch as the trainer packs it."""
    batch = trainer.pack_micro_batch(micro_batch)
    return batch.num_tokens, batch.cu_seqlens.numel() - 1, batch.max_seqlen


# ----------------------------------------------------------------------------- training


def test_compiled_llama_trains_like_eager(workspace, tmp_path):
    eager = make_trainer(workspace, tmp_path / "eager", "llama")  # tied embeddings
    compiled = compiled_trainer(workspace, tmp_path / "compiled", "llama")
    layers = compiled.model.model.layers
    assert all("forward" in vars(layer) for layer in layers)  # each layer compiled in place
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()

    micro_batches = eager.epoch_plan(0).micro_batches[:2]
    assert len({packed_shapes(eager, mb)[0] for mb in micro_batches}) == 2
    eager_run = train_steps(eager, micro_batches)
    compiled_run = train_steps(compiled, micro_batches)
    assert compiled_graphs, "the layers did not run compiled code"
    assert_same_training(compiled_run, eager_run)


def test_new_micro_batch_sizes_do_not_recompile(workspace, tmp_path):
    eager = make_trainer(workspace, tmp_path / "eager")
    compiled = compiled_trainer(workspace, tmp_path / "compiled")
    # Micro-batches (rollout rows) of distinct token counts. The two warmup ones differ in
    # every dimension that varies: the first compile has the token and sequence dimensions
    # dynamic already; the change of the integer longest length makes it dynamic too (one
    # recompile). After that nothing may recompile.
    warmup = [[0, 1], [2, 3, 4]]
    later = [[5], [6, 7], [8, 9, 10], [11, 1]]
    shapes = [packed_shapes(compiled, mb) for mb in warmup + later]
    assert all(a != b for a, b in zip(*shapes[:2], strict=True))
    assert len({tokens for tokens, _, _ in shapes}) == len(shapes)

    compiled_warmup = train_steps(compiled, warmup)
    warm = len(compiled_graphs)
    assert warm > 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled_later = train_steps(compiled, later)
    assert len(compiled_graphs) == warm

    eager_warmup, eager_later = train_steps(eager, warmup), train_steps(eager, later)
    assert_same_training(compiled_warmup, eager_warmup)
    assert_same_training(compiled_later, eager_later)


# ----------------------------------------------------------------------------- kernel path


# The CPU kernels below stay registered for the session (an op's kernel cannot be
# unregistered); outside the kernel_path fixture they refuse to run.
kernel_path_state = {"active": False}


def _attention_reference(query, key, value, cu_seqlens, scale, causal, window):
    """Dense attention of each packed sequence in fp32, simple enough to differentiate by
    hand: (T, H, D) inputs, key/value heads repeated for GQA. Yields
    (start, end, q, k, v, probs (H, L, L)) per sequence."""
    if not kernel_path_state["active"]:
        raise RuntimeError("the CPU varlen attention kernel is a test stand-in (kernel_path)")
    groups = query.shape[1] // key.shape[1]
    q = query.float()
    k = key.float().repeat_interleave(groups, dim=1)
    v = value.float().repeat_interleave(groups, dim=1)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        pos = torch.arange(end - start)
        distance = pos[:, None] - pos[None, :]
        allowed = torch.ones_like(distance, dtype=torch.bool)
        if causal:
            allowed &= distance >= 0
        if window >= 0:
            allowed &= distance <= window
        scores = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # (H, L, L)
        yield start, end, q, k, v, probs


def _varlen_forward_cpu(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                        scale=None, window_size=None, *rest, **kwargs):  # fmt: skip
    left, right = window_size if window_size is not None else (-1, -1)
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    out = torch.zeros(query.shape, dtype=torch.float32)
    for s, e, _, _, v, probs in _attention_reference(
        query, key, value, cu_seq_q, scale, is_causal or right == 0, left
    ):
        out[s:e] = torch.einsum("hqk,khd->qhd", probs, v[s:e])
    lse = torch.zeros(query.shape[1], query.shape[0], dtype=torch.float32)
    return out.to(query.dtype), lse, torch.zeros(2, dtype=torch.uint64)


def _varlen_backward_cpu(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q,
                         max_k, is_causal, rng_state, scale=None, window_size=None, *rest,
                         **kwargs):  # fmt: skip
    left, right = window_size if window_size is not None else (-1, -1)
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    do = grad_out.float()
    dq = torch.zeros(query.shape, dtype=torch.float32)
    dk = torch.zeros(query.shape[:2] + key.shape[2:], dtype=torch.float32)
    dv = torch.zeros(query.shape[:2] + value.shape[2:], dtype=torch.float32)
    for s, e, q, k, v, probs in _attention_reference(
        query, key, value, cu_seq_q, scale, is_causal or right == 0, left
    ):
        dv[s:e] = torch.einsum("hqk,qhd->khd", probs, do[s:e])
        dprobs = torch.einsum("qhd,khd->hqk", do[s:e], v[s:e])
        dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True))
        dq[s:e] = torch.einsum("hqk,khd->qhd", dscores, k[s:e]) * scale
        dk[s:e] = torch.einsum("hqk,qhd->khd", dscores, q[s:e]) * scale
    tokens, kv_heads = key.shape[:2]
    dk = dk.view(tokens, kv_heads, -1, key.shape[-1]).sum(2)
    dv = dv.view(tokens, kv_heads, -1, value.shape[-1]).sum(2)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


_FORWARD_ARGS = ["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal"]


@pytest.fixture
def kernel_path(monkeypatch):
    """PyTorch's varlen attention op (the CUDA path) with a CPU kernel, chosen on CPU.

    The op is opaque to torch.compile, as on a GPU, so the decoder layers trace whole; the
    model calls it through the same code as on CUDA (backend selection, the op's own
    autograd, the sequence metadata)."""
    ops = pytest.importorskip("torch.nn.attention.varlen")
    forward_op = getattr(ops, "_varlen_attn", None)
    backward_op = getattr(ops, "_varlen_attn_backward", None)
    if forward_op is None or backward_op is None:
        pytest.skip("this torch has no varlen attention custom op")
    names = [a.name for a in forward_op._opoverload._schema.arguments]
    if names[: len(_FORWARD_ARGS)] != _FORWARD_ARGS:
        pytest.skip(f"unexpected varlen attention op signature: {names}")
    forward_op.register_kernel("cpu", _varlen_forward_cpu)
    backward_op.register_kernel("cpu", _varlen_backward_cpu)
    monkeypatch.setattr(varlen_module, "_lookups", {"flash_attn": None})  # looked up again
    monkeypatch.setattr(varlen_module, "_kernel_eligible", lambda query, key: True)
    monkeypatch.setitem(kernel_path_state, "active", True)
    yield


@pytest.mark.usefixtures("kernel_path")
def test_kernel_path_traces_whole_layers_with_checkpointing_and_lora(workspace, tmp_path):
    pytest.importorskip("peft")
    options = {"model.gradient_checkpointing": True, "model.lora.r": 4, "optim.lr": 1e-2}
    compiled = compiled_trainer(workspace, tmp_path / "compiled", **options)
    eager = make_trainer(workspace, tmp_path / "eager", **options)
    # (tokens, sequences, longest): 37/2/27, then the token count changes, then the
    # sequence count, each without a recompile: both are dynamic from the first compile.
    # The longest length (an int) changes next: one recompile. Then nothing recompiles.
    first, same_longest, longest_changes = [[0, 1]], [[10, 2], [0, 5, 6]], [[2, 3, 4]]
    later = [[5], [6, 7], [8, 9, 10], [11, 1]]
    shapes = [packed_shapes(compiled, mb) for mb in first + same_longest + longest_changes]
    assert [s[2] for s in shapes] == [27, 27, 27, 33]
    assert len({s[0] for s in shapes}) == 4 and shapes[0][1] == shapes[1][1] != shapes[2][1]

    runs = [train_steps(compiled, first)]
    assert len(compiled_graphs) == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        runs.append(train_steps(compiled, same_longest))
    runs.append(train_steps(compiled, longest_changes))
    assert len(compiled_graphs) == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        runs.append(train_steps(compiled, later))

    assert not torch._dynamo.utils.counters["graph_break"]  # whole layers, as on CUDA
    # transformers 5.24 checkpoints inside the layer's forward, so the checkpoint is part of
    # the compiled code; 5.17 checkpoints around __call__, outside it.
    from transformers.modeling_layers import GradientCheckpointingLayer

    checkpoint_inside = "__call__" not in vars(GradientCheckpointingLayer)
    checkpoint_op = torch.ops.higher_order.tag_activation_checkpoint
    for graph in compiled_graphs:
        has_checkpoint = any(node.target is checkpoint_op for node in graph.graph.nodes)
        assert has_checkpoint == checkpoint_inside
    for micro_batches, compiled_run in zip(
        (first, same_longest, longest_changes, later), runs, strict=True
    ):
        eager_run = train_steps(eager, micro_batches)
        assert any("lora_B" in name for name in eager_run[1])
        assert_same_training(compiled_run, eager_run)


@pytest.mark.usefixtures("kernel_path")  # whole-layer graphs: fewer, faster C++ compiles
def test_inductor(workspace, tmp_path):
    if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        pytest.skip("inductor needs a C++ compiler on CPU")
    eager = make_trainer(workspace, tmp_path / "eager")
    compiled = make_trainer(workspace, tmp_path / "compiled", **{"model.compile": True})
    assert compiled.config.model.compile_backend == "inductor"
    micro_batches = eager.epoch_plan(0).micro_batches[:1]
    eager_run = train_steps(eager, micro_batches)
    compiled_run = train_steps(compiled, micro_batches)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert_same_training(compiled_run, eager_run)


# ----------------------------------------------------------------------------- options


def test_cli_flag_and_toml_reach_the_trainer(workspace, tmp_path, monkeypatch):
    import drift_engine.train.loop as loop

    calls = []
    monkeypatch.setattr(
        loop, "compile_decoder_layers", lambda model, backend: calls.append((model, backend))
    )
    common = [
        "train", "--data", str(workspace["data"]), "--model", str(workspace["models"]["qwen2"]),
        "--max-steps", "1", "--device", "cpu",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "a"), "--compile"])
    assert result.exit_code == 0, result.output
    assert len(calls) == 1 and calls[0][1] == "inductor"
    assert type(calls[0][0]).__name__ == "Qwen2ForCausalLM"
    run_info = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run_info["config"]["model"]["compile"] is True

    toml = tmp_path / "train.toml"
    toml.write_text('[model]\ncompile = true\ncompile_backend = "aot_eager"\n')
    assert load_config(toml).model.compile is True
    result = CliRunner().invoke(
        cli, [*common, "--out", str(tmp_path / "b"), "--config", str(toml), "--no-compile"]
    )
    assert result.exit_code == 0, result.output
    assert len(calls) == 1  # --no-compile overrides the file

    result = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "c"), "--config", str(toml)])
    assert result.exit_code == 0, result.output
    assert len(calls) == 2 and calls[1][1] == "aot_eager"
    assert "--compile / --no-compile" in CliRunner().invoke(cli, ["train", "--help"]).output


def test_compile_errors(workspace, tmp_path, monkeypatch):
    config = {"out": "o", "data": {"path": "d"}, "model": {"name_or_path": "m", "compile": True}}
    config_from_dict(config).validate()
    config["model"]["compile_backend"] = "nope"
    with pytest.raises(ConfigError, match="model.compile_backend 'nope' is not a torch.compile"):
        config_from_dict(config).validate()
    config["model"]["compile"] = False  # the backend only matters when compiling
    config_from_dict(config).validate()

    # A model whose repeated blocks cannot be found.
    with pytest.raises(ConfigError, match="model.compile: cannot find the decoder layers"):
        compile_decoder_layers(torch.nn.Linear(2, 2), backend="aot_eager")

    toml = tmp_path / "bad.toml"
    toml.write_text('[model]\ncompile_backend = "nope"\n')
    result = CliRunner().invoke(
        cli,
        [
            "train", "--data", str(workspace["data"]), "--model", str(workspace["models"]["qwen2"]),
            "--out", str(tmp_path / "out"), "--config", str(toml), "--compile", "--device", "cpu",
        ],
    )  # fmt: skip
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.compile_backend 'nope'" in errors[0], result.output

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(ConfigError, match="model.compile needs torch.compile"):
        config_from_dict({**config, "model": {"name_or_path": "m", "compile": True}}).validate()


# ----------------------------------------------------------------------------- CUDA


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.gpu
def test_compiled_layers_on_cuda_train_like_eager_in_bf16(workspace, tmp_path):
    """On CUDA (bf16 autocast over fp32 weights, the CUDA varlen attention, the Triton loss),
    layers compiled by inductor train as eager ones do, up to bf16 rounding: losses of three
    steps and the last step's gradients. Broken boundaries or a dropped checkpoint would
    move the losses by far more."""
    on_cuda = {"device": "cuda", "model.dtype": "bfloat16", "model.gradient_checkpointing": True}
    eager = make_trainer(workspace, tmp_path / "eager", **on_cuda)
    compiled = make_trainer(workspace, tmp_path / "compiled", **on_cuda, **{"model.compile": True})
    micro_batches = eager.epoch_plan(0).micro_batches[:3]
    eager_losses, eager_grads = train_steps(eager, micro_batches)
    compiled_losses, compiled_grads = train_steps(compiled, micro_batches)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-2)
    assert compiled_grads.keys() == eager_grads.keys() and eager_grads
    worst = max(relative_error(compiled_grads[n], g) for n, g in eager_grads.items())
    assert worst < 5e-2, worst
