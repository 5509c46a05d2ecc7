"""rollouts.safetensors: round trip, sharding, memory mapping, merging, validation errors."""

import dataclasses
import json
import math

import pytest
import torch

from drift_engine.data.rollouts import (
    FORMAT_NAME,
    META_TOKENIZER_VOCAB_HASH,
    RolloutSet,
    load_rollouts,
    save_rollouts,
    tokenizer_fingerprint,
    validate_rollouts,
)
from drift_engine.errors import DriftError, RolloutFormatError

NAN = math.nan


def make_rollouts(num_groups=3, per_group=3, seed=0, with_optional=True) -> RolloutSet:
    """Trajectories of 1-3 turns: [prompt][answer 1][feedback][answer 2]..."""
    g = torch.Generator().manual_seed(seed)
    tokens, turns, groups, rewards, fmt, rep, logp = [], [], [], [], [], [], []
    for group in range(num_groups):
        for _ in range(per_group):
            n_turns = int(torch.randint(1, 4, (1,), generator=g))
            toks, tids = [], []
            for k in range(1, n_turns + 1):
                ctx = int(torch.randint(2, 6, (1,), generator=g))
                ans = int(torch.randint(1, 5, (1,), generator=g))
                toks += torch.randint(0, 97, (ctx + ans,), generator=g).tolist()
                tids += [0] * ctx + [k] * ans
            tokens.append(toks)
            turns.append(tids)
            groups.append(10 * group + 7)
            rewards.append([0.0] * (n_turns - 1) + [float(torch.rand(1, generator=g) < 0.5)])
            fmt.append(-0.1 * int(torch.randint(0, 2, (1,), generator=g)))
            rep.append(-0.25 * int(torch.randint(0, 2, (1,), generator=g)))
            logp.append((-torch.rand(len(toks), generator=g)).tolist())
    return RolloutSet.from_trajectories(
        tokens,
        turns,
        groups,
        rewards,
        format_penalty=fmt if with_optional else None,
        repeat_penalty=rep if with_optional else None,
        behavior_logprobs=logp if with_optional else None,
        metadata={"reference_model": "tiny", "sampling": json.dumps({"temperature": 1.0})},
    )


def assert_same(a: RolloutSet, b: RolloutSet) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        torch.testing.assert_close(ta[name], tb[name], equal_nan=True, rtol=0, atol=0)


def test_helpers():
    rs = RolloutSet.from_trajectories(
        [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10]],
        [[0, 1, 1, 0], [0, 1, 0, 2, 2, 0]],
        [4, 4],
        [[1.0], [0.0, 1.0]],
    )
    assert rs.num_trajectories == 2 and rs.num_tokens == 10 and rs.max_turns == 2
    assert rs.cu_seqlens.tolist() == [0, 4, 10]
    assert rs.lengths().tolist() == [4, 6]
    assert rs.trajectory_slice(1) == slice(4, 10)
    assert rs.trajectory_slice(-2) == slice(0, 4)
    assert rs.num_turns().tolist() == [1, 2]
    assert rs.turn_rewards[0].isnan().tolist() == [False, True]
    last = rs.trained_mask("last").tolist()
    assert last == [False, True, True, False, False, False, False, True, True, False]
    all_ = rs.trained_mask("all").tolist()
    assert all_ == [False, True, True, False, False, True, False, True, True, False]
    with pytest.raises(IndexError):
        rs.trajectory_slice(2)


def test_select_and_concat():
    rs = make_rollouts()
    sub = rs.select([4, 0, 4])
    assert sub.num_trajectories == 3
    for j, i in enumerate([4, 0, 4]):
        assert torch.equal(
            sub.input_ids[sub.trajectory_slice(j)], rs.input_ids[rs.trajectory_slice(i)]
        )
        assert torch.equal(
            sub.turn_ids[sub.trajectory_slice(j)], rs.turn_ids[rs.trajectory_slice(i)]
        )
        assert torch.equal(
            sub.behavior_logprobs[sub.trajectory_slice(j)],
            rs.behavior_logprobs[rs.trajectory_slice(i)],
        )
        assert sub.group_ids[j] == rs.group_ids[i]
    validate_rollouts(sub)

    a, b = rs.select(range(0, 4)), rs.select(range(4, 9))
    assert_same(RolloutSet.concat([a, b], group_ids="keep"), rs)
    offset = RolloutSet.concat([a, a], group_ids="offset")
    assert offset.group_ids.tolist() == [0, 0, 0, 10] + [11, 11, 11, 21]
    # Absent penalties count as 0 and turn_rewards widens with NaN.
    plain = RolloutSet.from_trajectories(
        [[1, 2]], [[0, 1]], [0], [[1.0]], behavior_logprobs=[[0.0, -1.0]]
    )
    merged = RolloutSet.concat([plain, a], group_ids="offset")
    validate_rollouts(merged)
    assert merged.format_penalty[0] == 0 and merged.turn_rewards.shape[1] == a.max_turns
    with pytest.raises(RolloutFormatError, match="behavior_logprobs"):
        RolloutSet.concat([a, make_rollouts(with_optional=False)])


def test_round_trip_single_file_is_memory_mapped(tmp_path):
    rs = make_rollouts()
    written = save_rollouts(tmp_path / "r.safetensors", rs)
    assert written == [tmp_path / "r.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"]  # no temp file left
    loaded = load_rollouts(tmp_path / "r.safetensors")
    assert_same(loaded, rs)
    assert loaded.metadata["format"] == FORMAT_NAME and loaded.metadata["format_version"] == "1"
    assert loaded.metadata["reference_model"] == "tiny"
    # The tensors are views of one mapping of the file, not copies.
    ptrs = {name: t.data_ptr() for name, t in loaded.tensors().items()}
    assert max(ptrs.values()) - min(ptrs.values()) < (tmp_path / "r.safetensors").stat().st_size
    # Copy-on-write: writing into a loaded tensor leaves the file unchanged.
    loaded.input_ids[0] = 12345
    assert int(load_rollouts(tmp_path / "r.safetensors").input_ids[0]) == int(rs.input_ids[0])


def test_round_trip_shards(tmp_path):
    rs = make_rollouts(num_groups=4)
    path = tmp_path / "out" / "roll.safetensors"
    written = save_rollouts(path, rs, max_shard_bytes=200)
    shards, index = written[:-1], written[-1]
    assert len(shards) > 2
    n = len(shards)
    assert [p.name for p in shards] == [
        f"roll-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    assert index.name == "roll.safetensors.index.json"
    meta = json.loads(index.read_text())
    assert meta["num_trajectories"] == rs.num_trajectories
    assert sum(e["num_tokens"] for e in meta["shards"]) == rs.num_tokens
    # Every shard is a complete rollout file by itself.
    assert sum(load_rollouts(p.parent / p.name).num_trajectories for p in [shards[0]]) >= 1
    for source in (path, shards[0], shards[-1], index, path.parent):
        assert_same(load_rollouts(source), rs)
    # Without the index, the shard name pattern still finds all shards.
    index.unlink()
    assert_same(load_rollouts(shards[1]), rs)
    shards[1].unlink()
    with pytest.raises(RolloutFormatError, match="missing"):
        load_rollouts(shards[0])


def test_saving_over_an_earlier_set_leaves_only_the_new_one(tmp_path):
    rs, other = make_rollouts(seed=0), make_rollouts(seed=1, num_groups=4)
    path = tmp_path / "roll.safetensors"
    save_rollouts(path, rs)
    written = save_rollouts(path, other, max_shard_bytes=200)  # single file -> shards
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    assert_same(load_rollouts(path), other)
    assert_same(load_rollouts(tmp_path), other)
    assert save_rollouts(path, rs) == [path]  # shards -> single file
    assert [p.name for p in tmp_path.iterdir()] == ["roll.safetensors"]
    assert_same(load_rollouts(tmp_path), rs)


def test_load_list_merges_with_group_offsets(tmp_path):
    rs = make_rollouts()
    a, b = rs.select(range(0, 3)), rs.select(range(3, 9))
    save_rollouts(tmp_path / "a.safetensors", a)
    save_rollouts(tmp_path / "b.safetensors", b)
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    kept = load_rollouts(paths, group_ids="keep")
    assert_same(kept, rs)
    offset = load_rollouts(paths)  # each file's groups renumbered after the previous file's
    assert offset.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 11, 11, 11]
    with pytest.raises(RolloutFormatError, match="exactly one rollout set"):
        load_rollouts(tmp_path)


def test_load_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(RolloutFormatError, match="does not exist"):
        load_rollouts(tmp_path / "nope.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(RolloutFormatError, match="not a rollout file"):
        load_rollouts(tmp_path / "w.safetensors")
    rs = make_rollouts(with_optional=False)
    tensors = {k: v.contiguous() for k, v in rs.tensors().items()}
    save_file(
        tensors, str(tmp_path / "v.safetensors"), {"format": FORMAT_NAME, "format_version": "9"}
    )
    with pytest.raises(RolloutFormatError, match="upgrade drift-engine"):
        load_rollouts(tmp_path / "v.safetensors")
    del tensors["group_ids"]
    save_file(
        tensors, str(tmp_path / "m.safetensors"), {"format": FORMAT_NAME, "format_version": "1"}
    )
    with pytest.raises(RolloutFormatError, match="missing required tensors \\['group_ids'\\]"):
        load_rollouts(tmp_path / "m.safetensors")
    tensors = {k: v.contiguous() for k, v in rs.tensors().items()}
    tensors["input_ids"] = tensors["input_ids"].long()
    save_file(
        tensors, str(tmp_path / "t.safetensors"), {"format": FORMAT_NAME, "format_version": "1"}
    )
    with pytest.raises(RolloutFormatError, match="input_ids must have dtype torch.int32"):
        load_rollouts(tmp_path / "t.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x05")
    with pytest.raises(RolloutFormatError, match="too short") as err:
        load_rollouts(tmp_path / "bad.safetensors")
    assert "corrupt" not in str(err.value)  # one message, not wrapped in another
    (tmp_path / "long.safetensors").write_bytes((1 << 20).to_bytes(8, "little") + b"{}")
    with pytest.raises(RolloutFormatError, match="truncated or corrupt.*write it again"):
        load_rollouts(tmp_path / "long.safetensors")
    with pytest.raises(RolloutFormatError, match=".safetensors"):
        save_rollouts(tmp_path / "x.bin", rs)


def _corruptions(data: bytes) -> dict[str, bytes]:
    """Damaged copies of a rollout file's bytes: truncated, header bytes changed, header
    entries of the wrong type or dtype."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    body = data[8 + header_len :]

    def rewrite(change) -> bytes:
        h = json.loads(json.dumps(header))
        h = change(h) or h
        raw = json.dumps(h).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw + body

    out = {
        f"truncated at {cut}": data[:cut]
        for cut in (0, 5, 8, 9, header_len // 2, 8 + header_len, 9 + header_len, len(data) - 1)
    }
    rng = torch.Generator().manual_seed(0)
    for _ in range(40):
        at = int(torch.randint(0, 8 + header_len, (1,), generator=rng))
        value = int(torch.randint(0, 256, (1,), generator=rng))
        out[f"byte {at} set to {value}"] = data[:at] + bytes([value]) + data[at + 1 :]

    def set_dtype(name, dtype):
        return lambda h: h[name].update(dtype=dtype)

    for name, dtype in [("cu_seqlens", "BOOL"), ("cu_seqlens", "F32"), ("input_ids", "I8")]:
        out[f"{name} stored as {dtype}"] = rewrite(set_dtype(name, dtype))
    out["input_ids stored as F32"] = rewrite(set_dtype("input_ids", "F32"))
    out["unknown dtype"] = rewrite(set_dtype("turn_ids", "Q7"))
    out["header is a list"] = rewrite(lambda h: [1, 2])
    out["metadata is a list"] = rewrite(lambda h: h.update({"__metadata__": [1]}))
    out["metadata value is a number"] = rewrite(lambda h: h["__metadata__"].update(format=1))
    out["shape is a string"] = rewrite(lambda h: h["input_ids"].update(shape="x"))
    out["offsets past the end"] = rewrite(
        lambda h: h["input_ids"].update(data_offsets=[0, 1 << 40])
    )
    return out


def test_corrupt_files_give_one_clear_error(tmp_path):
    rs = make_rollouts()
    save_rollouts(tmp_path / "r.safetensors", rs)
    data = (tmp_path / "r.safetensors").read_bytes()
    loaded = 0
    for what, damaged in _corruptions(data).items():
        path = tmp_path / "x.safetensors"
        path.write_bytes(damaged)
        try:
            got = load_rollouts(path)
        except RolloutFormatError as err:
            assert "\n" not in str(err), what
            continue
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{what}: {type(err).__name__}: {err}")
        # A change the format does not notice (e.g. inside a token id) still loads whole.
        assert got.num_trajectories == rs.num_trajectories, what
        loaded += 1
    assert loaded < 40  # most single-byte header changes are detected


def test_empty_rollout_set_is_refused_on_load(tmp_path):
    empty = make_rollouts().select([])
    written = save_rollouts(tmp_path / "e.safetensors", empty)  # e.g. one shard of many
    with pytest.raises(RolloutFormatError, match="e.safetensors.*no trajectories"):
        load_rollouts(written[0])
    with pytest.raises(RolloutFormatError, match="no trajectories"):
        validate_rollouts(empty)
    assert load_rollouts(written[0], allow_empty=True).num_trajectories == 0
    validate_rollouts(empty, allow_empty=True)


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "/etc/passwd", "sub/r.safetensors", ".."]
)
def test_shard_index_naming_a_path_outside_its_folder_is_refused(tmp_path, name):
    rs = make_rollouts()
    folder = tmp_path / "set"
    written = save_rollouts(folder / "roll.safetensors", rs, max_shard_bytes=200)
    index = written[-1]
    save_rollouts(tmp_path / "outside.safetensors", rs)  # a readable file outside the folder
    (folder / "sub").mkdir()
    save_rollouts(folder / "sub" / "r.safetensors", rs)
    meta = json.loads(index.read_text())
    meta["shards"][0]["file"] = name
    index.write_text(json.dumps(meta))
    with pytest.raises(RolloutFormatError, match="not a file in the index's own folder"):
        load_rollouts(index)


def _broken(**changes):
    return dataclasses.replace(make_rollouts(), **changes)


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda rs: dataclasses.replace(rs, group_ids=None), "missing required tensor 'group_ids'"),
        (
            lambda rs: dataclasses.replace(rs, turn_ids=rs.turn_ids.int()),
            "turn_ids must have dtype torch.int16",
        ),
        (
            lambda rs: dataclasses.replace(rs, input_ids=rs.input_ids[:-1]),
            "turn_ids must have one value per token of input_ids",
        ),
        (
            lambda rs: dataclasses.replace(rs, behavior_logprobs=rs.behavior_logprobs[1:]),
            "behavior_logprobs must have one value per token",
        ),
        (
            lambda rs: dataclasses.replace(rs, weights=torch.ones(2)),
            "weights must have one value per trajectory",
        ),
        (
            lambda rs: dataclasses.replace(rs, turn_rewards=rs.turn_rewards[:-1]),
            r"turn_rewards must have shape \(S, K\)",
        ),
        (lambda rs: dataclasses.replace(rs, cu_seqlens=rs.cu_seqlens + 1), "must start at 0"),
        (
            lambda rs: dataclasses.replace(
                rs, cu_seqlens=torch.cat([rs.cu_seqlens[:-1], rs.cu_seqlens[-1:] - 1])
            ),
            "must end at the token count",
        ),
        (
            lambda rs: dataclasses.replace(
                rs, cu_seqlens=torch.cat([rs.cu_seqlens[:2], rs.cu_seqlens[1:2], rs.cu_seqlens[3:]])
            ),
            "strictly increasing",
        ),
        (
            lambda rs: dataclasses.replace(
                rs, input_ids=torch.where(torch.arange(rs.num_tokens) == 3, -1, rs.input_ids).int()
            ),
            "negative token id",
        ),
        (
            lambda rs: dataclasses.replace(
                rs, turn_ids=torch.where(torch.arange(rs.num_tokens) == 3, -1, rs.turn_ids).short()
            ),
            "turn_ids contains a negative",
        ),
        (
            lambda rs: dataclasses.replace(rs, turn_rewards=torch.full_like(rs.turn_rewards, NAN)),
            "assistant turns",
        ),
        (
            lambda rs: dataclasses.replace(rs, turn_rewards=rs.turn_rewards.nan_to_num(0.0)),
            "assistant turns",
        ),
        (
            lambda rs: dataclasses.replace(rs, turn_rewards=rs.turn_rewards.nan_to_num(torch.inf)),
            "inf",
        ),
        (
            lambda rs: dataclasses.replace(rs, weights=torch.tensor([1.0] * 8 + [NAN])),
            "weights contains NaN or inf",
        ),
        (
            lambda rs: dataclasses.replace(rs, weights=torch.tensor([1.0] * 8 + [torch.inf])),
            "weights contains NaN or inf",
        ),
        (
            lambda rs: dataclasses.replace(rs, weights=torch.tensor([1.0] * 8 + [-0.5])),
            "non-negative",
        ),
        (
            lambda rs: dataclasses.replace(rs, format_penalty=torch.full((9,), NAN)),
            "format_penalty contains NaN",
        ),
        (lambda rs: dataclasses.replace(rs, metadata={"a": 1}), "str -> str"),
    ],
)
def test_validation_errors(make_bad, message):
    rs = make_rollouts()
    validate_rollouts(rs)
    with pytest.raises(RolloutFormatError, match=message):
        validate_rollouts(make_bad(rs))


def test_trajectory_without_trained_token():
    # Trajectory 1 has no assistant token; trajectory 2's only assistant token is its first.
    rs = RolloutSet.from_trajectories(
        [[1, 2, 3], [4, 5], [6, 7]], [[0, 1, 1], [0, 0], [1, 0]], [0, 0, 1], [[1.0], [], [0.0]]
    )
    with pytest.raises(
        RolloutFormatError, match="2 trajectories have no trained token .* trajectory 1"
    ):
        validate_rollouts(rs, train_turns="all")
    validate_rollouts(rs.select([0]), train_turns="last")
    with pytest.raises(DriftError, match="train_turns"):
        validate_rollouts(rs.select([0]), train_turns="first")


def test_save_validates():
    rs = _broken(cu_seqlens=torch.tensor([0, 1], dtype=torch.int64))
    with pytest.raises(RolloutFormatError):
        save_rollouts("/nonexistent-dir/x.safetensors", rs)


class _FakeTokenizer:
    def __init__(self, vocab, name):
        self.vocab, self.name_or_path = vocab, name

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


def test_vocab_size_and_tokenizer_identity():
    rs = make_rollouts()  # token ids < 97
    vocab = {f"t{i}": i for i in range(100)}
    tok = _FakeTokenizer(vocab, "org/tok")
    fp = tokenizer_fingerprint(tok)
    assert fp["tokenizer_name"] == "org/tok" and fp["tokenizer_vocab_size"] == "100"
    # The identity is the vocabulary, not the name.
    assert (
        tokenizer_fingerprint(_FakeTokenizer(vocab, "/local/copy"))[META_TOKENIZER_VOCAB_HASH]
        == fp[META_TOKENIZER_VOCAB_HASH]
    )
    stamped = dataclasses.replace(rs, metadata={**rs.metadata, **fp})
    validate_rollouts(stamped, vocab_size=97, tokenizer=tok)
    hi = int(rs.input_ids.max())
    with pytest.raises(
        RolloutFormatError, match=f"token id {hi} >= the model's vocabulary size {hi}"
    ):
        validate_rollouts(rs, vocab_size=hi)
    other = _FakeTokenizer({**vocab, "t5": 100, "t100": 5}, "org/other")
    with pytest.raises(RolloutFormatError, match="tokenizer mismatch.*org/tok.*org/other"):
        validate_rollouts(stamped, tokenizer=other)
