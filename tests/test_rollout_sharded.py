"""Sharded rollouts: a 2-process torchrun run against one process, and shard merging.

Tolerance. Both runs use the same fp32 model on CPU and the same per-request seeds; they
differ only in which prompts share a generate batch (a shard holds fewer prompts, so the
padding and batch shapes differ). Token ids, boundaries, turn ids, group ids, rewards and
penalties must be identical. Log-probs may move by a few fp32 ulps through the different
batch shapes: atol 1e-5 (they are around -5, a wrong token or position is off by ~1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import build_model
from tokenizer_utils import make_chat_tokenizer

from drift_engine.cli import cli
from drift_engine.data.rollouts import load_rollouts, save_rollouts
from drift_engine.envs import load_environment
from drift_engine.errors import RolloutFormatError
from drift_engine.rollout import SamplingParams, merge_rollout_sets, run_rollouts, shard_path
from drift_engine.rollout.hf import HFEngine
from drift_engine.weighting import WeightingConfig, attach_weights

# The random model's sampled tokenisations are rarely the canonical ones: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:token bookkeeping")

REPO = Path(__file__).resolve().parents[1]
PROBLEMS = [
    {"question": "What is 1 plus 2?", "answer": "3"},
    {"question": "What is 2 plus 2?", "answer": "4"},
    {"question": "What is 3 plus 4?", "answer": "7"},
]  # 3 prompts over 2 ranks: blocks of 2 and 1
EXACT = ("input_ids", "cu_seqlens", "turn_ids", "group_ids", "format_penalty", "repeat_penalty")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tokenizer = make_chat_tokenizer()
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("problems") / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def _rollout_args(model_dir, problems_file, out, preview):
    return [
        "rollout",
        "--model", str(model_dir), "--env", "math", "--problems", str(problems_file),
        "--out", str(out), "--preview", str(preview), "--engine", "hf",
        "-n", "2", "--max-turns", "2", "--max-new-tokens", "6", "--seed", "5",
        "--temperature", "1.0", "--gamma", "0.7", "--beta", "0.2", "--quiet",
    ]  # fmt: skip


def _assert_same_rollouts(got, want):
    for name in EXACT:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    torch.testing.assert_close(got.turn_rewards, want.turn_rewards, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(got.behavior_logprobs, want.behavior_logprobs, atol=1e-5, rtol=0)
    assert (got.weights is None) == (want.weights is None)
    if want.weights is not None:
        torch.testing.assert_close(got.weights, want.weights, atol=1e-6, rtol=1e-6)


def _table(output: str) -> list[str]:
    """The per-turn table and bookkeeping line of the command's output."""
    lines = output.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("turn  answered")))
    return lines[start : start + 4]


@pytest.mark.slow
def test_torchrun_rollout_merges_into_the_single_process_run(model_dir, problems_file, tmp_path):
    single_out, single_preview = tmp_path / "one" / "r.safetensors", tmp_path / "one" / "p.jsonl"
    result = CliRunner().invoke(
        cli, _rollout_args(model_dir, problems_file, single_out, single_preview)
    )
    assert result.exit_code == 0, result.output

    out, preview = tmp_path / "two" / "r.safetensors", tmp_path / "two" / "p.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "drift_engine", *_rollout_args(model_dir, problems_file, out, preview),
           "--keep-shards"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"

    single, merged = load_rollouts(single_out), load_rollouts(out)
    assert merged.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    _assert_same_rollouts(merged, single)
    assert merged.metadata == single.metadata  # summaries combined, shard "0/1"
    assert not list(out.parent.glob("*.partial"))  # finished parts are gone once merged
    # Rank 0 prints the summary of the whole set, once.
    assert proc.stdout.count("turn  answered") == 1
    assert _table(proc.stdout) == _table(result.output)
    one_lines = single_preview.read_text().splitlines()
    two_lines = preview.read_text().splitlines()
    assert [json.loads(x)["messages"] for x in two_lines] == [
        json.loads(x)["messages"] for x in one_lines
    ]

    # The kept per-rank shards merge again, in any order, through the CLI.
    shards = [shard_path(out, r, 2) for r in (1, 0)]
    assert [load_rollouts(s).group_ids.tolist() for s in shards] == [[2, 2], [0, 0, 1, 1]]
    again = tmp_path / "again.safetensors"
    args = ["rollout", "--merge", *map(str, shards), "--out", str(again), "--max-shard-mb", "0.001"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert _table(result.output) == _table(proc.stdout)
    assert len(list(tmp_path.glob("again-*-of-*.safetensors"))) > 1  # the format's own shards
    remerged = load_rollouts(again)
    for name, tensor in merged.tensors().items():
        torch.testing.assert_close(getattr(remerged, name), tensor, equal_nan=True, atol=0, rtol=0)
    assert all(s.exists() for s in shards)  # --merge keeps its inputs by default
    # An existing output is never replaced without --overwrite (nor a sharded one).
    before = out.read_bytes()
    for target in (out, again):
        merge_args = ["rollout", "--merge", *map(str, shards), "--out", str(target)]
        result = CliRunner().invoke(cli, [*merge_args, "--delete-shards"])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error:") and "--overwrite" in result.output
        assert result.output.count("\n") == 1
    assert out.read_bytes() == before and all(s.exists() for s in shards)
    result = CliRunner().invoke(
        cli,
        [
            "rollout",
            "--merge",
            *map(str, shards),
            "--out",
            str(out),
            "--delete-shards",
            "--overwrite",
        ],
    )
    assert result.exit_code == 0, result.output
    assert not any(s.exists() for s in shards)


# ---- merging shards in process ------------------------------------------------------------


@pytest.fixture(scope="module")
def make_shards():
    """``make_shards(world, seed)``: the ``world`` shards of one run (memoised)."""
    tokenizer = make_chat_tokenizer()
    engine = HFEngine(build_model(tokenizer), pad_token_id=tokenizer.pad_token_id)
    cache = {}

    def make(world: int = 2, seed: int = 1):
        if (world, seed) not in cache:
            cache[world, seed] = [
                run_rollouts(
                    engine,
                    tokenizer,
                    load_environment("math"),
                    PROBLEMS,
                    n=2,
                    max_turns=2,
                    sampling=SamplingParams(temperature=1.0, max_new_tokens=4, logprobs=True),
                    seed=seed,
                    shard_rank=rank,
                    shard_world=world,
                    progress=False,
                )
                for rank in range(world)
            ]
        return cache[world, seed]

    return make


def test_merge_refuses_shards_with_different_metadata(make_shards):
    first, _ = make_shards(seed=1)
    _, second_other_seed = make_shards(seed=2)
    with pytest.raises(RolloutFormatError, match="differ in metadata 'sampling'"):
        merge_rollout_sets([first, second_other_seed])
    _, second = make_shards(seed=1)
    other_tokenizer = replace(
        second, metadata={**second.metadata, "tokenizer_vocab_hash": "0" * 64}
    )
    with pytest.raises(RolloutFormatError, match="'tokenizer_vocab_hash'"):
        merge_rollout_sets([first, other_tokenizer])
    other_problems = replace(second, metadata={**second.metadata, "problems": "{}"})
    with pytest.raises(RolloutFormatError, match="'problems'"):
        merge_rollout_sets([first, other_problems])


def test_merge_refuses_overlapping_group_ids(make_shards):
    first, second = make_shards()
    overlapping = replace(second, group_ids=torch.ones_like(second.group_ids))
    with pytest.raises(RolloutFormatError, match="group id 1 is in"):
        merge_rollout_sets([first, overlapping], ["a", "b"])


def test_merge_refuses_missing_duplicate_and_unsharded_sets(make_shards):
    first, second = make_shards()
    with pytest.raises(RolloutFormatError, match=r"shards \[1\] of 2 are missing"):
        merge_rollout_sets([first])
    with pytest.raises(RolloutFormatError, match="given twice"):
        merge_rollout_sets([first, first, second])
    third = make_shards(world=3)[2]
    with pytest.raises(RolloutFormatError, match="split \\[2, 3\\] ways"):
        merge_rollout_sets([first, second, third])
    unsharded = replace(first, metadata={k: v for k, v in first.metadata.items() if k != "shard"})
    with pytest.raises(RolloutFormatError, match="not written by a sharded rollout run"):
        merge_rollout_sets([unsharded, second])


def test_merge_equals_single_process_and_recomputes_global_weights(make_shards):
    (single,) = make_shards(world=1)
    shards = make_shards(world=2)
    merged = merge_rollout_sets(shards[::-1])  # any order
    _assert_same_rollouts(merged, single)
    assert merged.metadata == single.metadata

    # Returns that differ between groups, so normalising over a shard is not normalising
    # over the whole set.
    def spread(rs):
        return replace(rs, format_penalty=-0.5 * rs.group_ids.to(torch.float32))

    config = WeightingConfig(gamma=0.7, beta=0.2, normalize="global")
    per_shard = [attach_weights(spread(s), config) for s in shards]
    expected = attach_weights(spread(single), config)
    assert not torch.allclose(torch.cat([s.weights for s in per_shard]), expected.weights)
    weighted = merge_rollout_sets(per_shard)
    torch.testing.assert_close(weighted.weights, expected.weights, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(weighted.returns, expected.returns, atol=0, rtol=0)


def test_cli_merge_errors_exit_2(make_shards, tmp_path):
    first, second = make_shards()
    _, other_seed = make_shards(seed=2)
    paths = []
    for name, shard in (("a", first), ("b", second), ("c", other_seed)):
        save_rollouts(tmp_path / f"{name}.safetensors", shard)
        paths.append(str(tmp_path / f"{name}.safetensors"))
    out = str(tmp_path / "out.safetensors")
    cases = [
        (["--merge", paths[0], paths[2]], "differ in metadata 'sampling'"),
        (["--merge", paths[0]], "are missing"),
        (["--merge", *paths[:2], "--model", "m"], "--merge only takes shard files"),
        (["--merge"], "needs the shard files"),
        ([paths[0], "--model", "m", "--problems", "p", "--env", "math"], "with --merge only"),
        (["--model", "m"], "missing --problems, --env"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, ["rollout", *args, "--out", out])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
    assert all(Path(p).exists() for p in paths)  # a failed merge deletes nothing
    assert not Path(out).exists()
