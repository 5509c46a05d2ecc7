"""Rollout throughput: the vLLM engine against the Hugging Face engine, same model, same work.

Both engines roll out the same multi-turn workload through the same loop
(``drift_engine.rollout.collect_trajectories``): guess-a-number problems, ``n`` seeded
samples per problem, up to ``max_turns`` turns with Higher/Lower feedback, from the same
random-initialised Llama (seeded, head_dim 32 or more as vLLM's CPU attention needs; the
guess-a-number word tokenizer, so no download). A random model rarely closes its turn, so
nearly every answer runs to ``max_new_tokens``: the amount of work hardly depends on the
sampled text. Reported per engine: start-up seconds (building the engine: loading the
model, and for vLLM its processes and KV cache) apart from the rollout, rollout seconds,
generated tokens (the answers' tokens, end-of-turn tokens included) and generated tokens/s,
and the trajectories' total tokens. The two engines sample with different random streams,
so their trajectories differ; the token counts show the work was alike.

    python bench/rollout_throughput.py --preset cpu --json bench/results/rollout_throughput_cpu.json
    python bench/rollout_throughput.py --preset gpu --json bench/results/rollout_throughput_gpu.json
    python bench/rollout_throughput.py --preset cpu-tiny          # what the tests run

vLLM starts worker processes: run this file as a script (it has the ``__main__`` guard
vLLM needs), not from an interactive session.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    max_position_embeddings: int
    problems: int
    n: int
    max_turns: int
    max_new_tokens: int
    dtype: str = "auto"  # float32 on a CPU in both engines, the model's (bf16) on a GPU
    hf_batch_size: int = 64


PRESETS = {
    # The tests' run: seconds.
    "cpu-tiny": Preset(64, 128, 2, 2, 32, 256, 8, 2, 3, 8),
    # Measured on a 2-core CPU.
    "cpu": Preset(256, 688, 4, 4, 64, 1024, 32, 4, 5, 32),
    # A 0.5B-class shape on one GPU (bf16).
    "gpu": Preset(
        1024, 2816, 24, 16, 64, 4096, 256, 8, 5, 256, dtype="bfloat16", hf_batch_size=256
    ),
}


def write_model(
    out: str | Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 32,
    max_position_embeddings: int = 256,
    initializer_range: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A seeded random Llama with the guess-a-number tokenizer and chat template, saved
    as a model folder both engines load. ``head_dim`` 32 is the smallest vLLM's CPU
    attention runs (the shipped toy model's 16 is not supported there). A wide
    ``initializer_range`` gives peaked next-token distributions, so greedy decoding has no
    near-ties that the two engines' rounding could break differently."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from drift_engine.demo import build_toy_tokenizer

    out = Path(out)
    tokenizer = build_toy_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def workload(preset: Preset) -> list[dict]:
    from drift_engine.envs.guess import guess_problems

    return guess_problems([1 + (7 * i) % 32 for i in range(preset.problems)])


def measure(engine: Any, model_dir: str | Path, preset: Preset, seed: int = 0) -> dict[str, Any]:
    """Roll the preset's workload out with ``engine``; the figures of one engine."""
    from drift_engine.envs import load_environment
    from drift_engine.rollout import SamplingParams, collect_trajectories, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    sampling = SamplingParams(temperature=1.0, max_new_tokens=preset.max_new_tokens, logprobs=True)
    start = time.perf_counter()
    run = collect_trajectories(
        engine,
        tokenizer,
        load_environment("guess"),
        workload(preset),
        n=preset.n,
        max_turns=preset.max_turns,
        sampling=sampling,
        seed=seed,
        progress=False,
    )
    seconds = time.perf_counter() - start
    generated = sum(sum(1 for k in t.turn_ids if k > 0) for t in run.trajectories)
    return {
        "rollout_s": round(seconds, 3),
        "generated_tokens": generated,
        "generated_tokens_per_s": round(generated / seconds, 1),
        "answers": sum(t.num_turns for t in run.trajectories),
        "trajectory_tokens": sum(len(t.token_ids) for t in run.trajectories),
        "trajectories": len(run.trajectories),
        "engine": engine.describe(),
    }


def run_engine(kind: str, model_dir: Path, preset: Preset) -> dict[str, Any]:
    from drift_engine.rollout import create_engine

    start = time.perf_counter()
    engine = create_engine(
        kind, str(model_dir), dtype=preset.dtype, max_batch_size=preset.hf_batch_size
    )
    startup = time.perf_counter() - start
    with engine:
        figures = measure(engine, model_dir, preset)
    return {"startup_s": round(startup, 2), **figures}


def versions() -> dict[str, str]:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__}
    out["transformers"] = transformers.__version__
    try:
        import vllm

        out["vllm"] = vllm.__version__
    except ImportError:
        out["vllm"] = "not installed"
    return out


def machine() -> dict[str, Any]:
    import os

    info: dict[str, Any] = {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0))}
    info["load_average_1m"] = round(os.getloadavg()[0], 2)  # other work sharing the cores
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--engines", default="vllm,hf", help="comma-separated: vllm, hf")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    on_gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(
            Path(tmp) / "model",
            hidden_size=preset.hidden_size,
            intermediate_size=preset.intermediate_size,
            num_layers=preset.num_layers,
            num_heads=preset.num_heads,
            head_dim=preset.head_dim,
            max_position_embeddings=preset.max_position_embeddings,
            dtype=torch.bfloat16 if on_gpu and preset.dtype == "bfloat16" else torch.float32,
        )
        results = {kind: run_engine(kind, model_dir, preset) for kind in args.engines.split(",")}
    report: dict[str, Any] = {
        "preset": args.preset,
        "setup": asdict(preset),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "engines": results,
    }
    if "vllm" in results and "hf" in results:
        report["vllm_over_hf_generated_tokens_per_s"] = round(
            results["vllm"]["generated_tokens_per_s"] / results["hf"]["generated_tokens_per_s"],
            2,
        )
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
