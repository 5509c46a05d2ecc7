"""The rollout file: ``rollouts.safetensors`` (format ``drift-rollouts``, version 1).

Tokens, not text: the exact token ids the reference policy produced are stored, so training
sees what was sampled. All trajectories are concatenated into flat per-token tensors with
``cu_seqlens`` boundaries; per-trajectory tensors are indexed by trajectory. The full
specification is docs/rollout-format.md.

Reading memory-maps the file (private copy-on-write mapping): tensors are views of the
page cache, nothing is read until it is touched, and an in-place write never reaches the
file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from drift_engine.errors import ConfigError, RolloutFormatError
from drift_engine.files import atomic_path, check_writable_location, write_text_atomic

FORMAT_NAME = "drift-rollouts"
FORMAT_VERSION = 1

# Metadata keys (``__metadata__`` of the safetensors header; every value is a string).
META_FORMAT = "format"
META_FORMAT_VERSION = "format_version"
META_TOKENIZER_NAME = "tokenizer_name"
META_TOKENIZER_VOCAB_HASH = "tokenizer_vocab_hash"
META_TOKENIZER_VOCAB_SIZE = "tokenizer_vocab_size"
META_REFERENCE_MODEL = "reference_model"
META_ENV = "env"
META_ENV_CONFIG = "env_config"  # JSON object
META_SAMPLING = "sampling"  # JSON object
META_GAMMA = "gamma"  # present when returns/weights were computed
META_BETA = "beta"  # present when weights were computed
META_CLIP_MAX = "weights_clip_max"
META_NORMALIZE = "weights_normalize"

TrainTurns = Literal["last", "all"]
GroupIdPolicy = Literal["keep", "offset"]

# name -> (dtype, per): "token" tensors have shape (T,), "trajectory" ones (S,).
_REQUIRED = {
    "input_ids": (torch.int32, "token"),
    "cu_seqlens": (torch.int64, "boundary"),
    "turn_ids": (torch.int16, "token"),
    "group_ids": (torch.int64, "trajectory"),
    "turn_rewards": (torch.float32, "trajectory_by_turn"),
}
_OPTIONAL = {
    "format_penalty": (torch.float32, "trajectory"),
    "repeat_penalty": (torch.float32, "trajectory"),
    "returns": (torch.float32, "trajectory"),
    "weights": (torch.float32, "trajectory"),
    "behavior_logprobs": (torch.float32, "token"),
}
_TENSOR_SPECS = {**_REQUIRED, **_OPTIONAL}

_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors$")


@dataclass
class RolloutSet:
    """S trajectories, T tokens in total, at most K assistant turns per trajectory.

    Turn k's reward is ``turn_rewards[i, k - 1]``; a trajectory with n assistant turns has
    n finite rewards followed by NaN. ``turn_ids`` is 0 on context that is never trained
    (system, user, environment feedback, chat-template scaffolding) and k on the tokens of
    the k-th assistant message.
    """

    input_ids: Tensor  # (T,) int32
    cu_seqlens: Tensor  # (S+1,) int64, 0 ... T
    turn_ids: Tensor  # (T,) int16
    group_ids: Tensor  # (S,) int64
    turn_rewards: Tensor  # (S, K) float32, NaN past the last turn
    format_penalty: Tensor | None = None  # (S,) float32, additive return term (<= 0)
    repeat_penalty: Tensor | None = None  # (S,) float32, additive return term (<= 0)
    returns: Tensor | None = None  # (S,) float32
    weights: Tensor | None = None  # (S,) float32
    behavior_logprobs: Tensor | None = None  # (T,) float32
    metadata: dict[str, str] = field(default_factory=dict)

    # ---- sizes -------------------------------------------------------------------------

    @property
    def num_trajectories(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def max_turns(self) -> int:
        """K, the width of ``turn_rewards``."""
        return self.turn_rewards.shape[1]

    def lengths(self) -> Tensor:
        """(S,) int64 token count of each trajectory."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def trajectory_slice(self, i: int) -> slice:
        """Slice of the flat per-token tensors holding trajectory ``i``."""
        if not -self.num_trajectories <= i < self.num_trajectories:
            raise IndexError(
                f"trajectory {i} out of range for {self.num_trajectories} trajectories"
            )
        i %= self.num_trajectories
        return slice(int(self.cu_seqlens[i]), int(self.cu_seqlens[i + 1]))

    def token_trajectory(self) -> Tensor:
        """(T,) int64: the trajectory each token belongs to."""
        return torch.repeat_interleave(torch.arange(self.num_trajectories), self.lengths())

    def num_turns(self) -> Tensor:
        """(S,) int64 number of assistant turns of each trajectory (its largest turn id)."""
        out = torch.zeros(self.num_trajectories, dtype=torch.int64)
        return out.scatter_reduce_(
            0, self.token_trajectory(), self.turn_ids.to(torch.int64), "amax", include_self=True
        )

    def trained_mask(self, train_turns: TrainTurns = "last") -> Tensor:
        """(T,) bool: tokens whose prediction is trained.

        ``"last"``: the last assistant turn of each trajectory; ``"all"``: every assistant
        turn. The first token of a trajectory has no prediction, so packing never trains it.
        """
        turns = self.turn_ids.to(torch.int64)  # (T,)
        if train_turns == "all":
            return turns > 0
        if train_turns == "last":
            last = self.num_turns()[
                self.token_trajectory()
            ]  # (T,) last turn of the token's trajectory
            return (turns == last) & (turns > 0)
        raise ConfigError(f"train_turns must be 'last' or 'all', got {train_turns!r}")

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def from_trajectories(
        cls,
        token_ids: Sequence[Sequence[int]],
        turn_ids: Sequence[Sequence[int]],
        group_ids: Sequence[int],
        turn_rewards: Sequence[Sequence[float]],
        *,
        format_penalty: Sequence[float] | None = None,
        repeat_penalty: Sequence[float] | None = None,
        behavior_logprobs: Sequence[Sequence[float]] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> RolloutSet:
        """Build a set from per-trajectory Python lists (ragged ``turn_rewards`` allowed)."""
        n = len(token_ids)
        if not (len(turn_ids) == len(group_ids) == len(turn_rewards) == n):
            raise RolloutFormatError(
                f"from_trajectories: got {n} token lists, {len(turn_ids)} turn-id lists, "
                f"{len(group_ids)} group ids and {len(turn_rewards)} reward lists; "
                "give one of each per trajectory"
            )
        for i, (toks, turns) in enumerate(zip(token_ids, turn_ids, strict=True)):
            if len(toks) != len(turns):
                raise RolloutFormatError(
                    f"trajectory {i}: {len(toks)} tokens but {len(turns)} turn ids; "
                    "give one turn id per token"
                )
        lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.int64)
        cu_seqlens = torch.zeros(n + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=cu_seqlens[1:])
        width = max((len(r) for r in turn_rewards), default=0)
        rewards = torch.full((n, width), float("nan"), dtype=torch.float32)
        for i, r in enumerate(turn_rewards):
            rewards[i, : len(r)] = torch.tensor(list(r), dtype=torch.float32)

        def flat(lists: Sequence[Sequence[Any]], dtype: torch.dtype) -> Tensor:
            return torch.tensor([x for seq in lists for x in seq], dtype=dtype)

        def per_trajectory(values: Sequence[float] | None) -> Tensor | None:
            return None if values is None else torch.tensor(list(values), dtype=torch.float32)

        return cls(
            input_ids=flat(token_ids, torch.int32),
            cu_seqlens=cu_seqlens,
            turn_ids=flat(turn_ids, torch.int16),
            group_ids=torch.tensor(list(group_ids), dtype=torch.int64),
            turn_rewards=rewards,
            format_penalty=per_trajectory(format_penalty),
            repeat_penalty=per_trajectory(repeat_penalty),
            behavior_logprobs=None
            if behavior_logprobs is None
            else flat(behavior_logprobs, torch.float32),
            metadata=dict(metadata or {}),
        )

    def tensors(self) -> dict[str, Tensor]:
        """The tensors present, by file name (optional ones omitted when None)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = value
        return out

    def select(self, indices: Sequence[int] | Tensor) -> RolloutSet:
        """A new set holding trajectories ``indices`` (in that order; repeats allowed)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)  # (S',)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_trajectories):
            raise IndexError(
                f"select: indices must lie in [0, {self.num_trajectories}), "
                f"got min {int(idx.min())} max {int(idx.max())}"
            )
        starts = self.cu_seqlens[idx]  # (S',)
        lengths = self.cu_seqlens[idx + 1] - starts  # (S',)
        cu_seqlens = torch.zeros(idx.numel() + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=cu_seqlens[1:])
        # Source position of every output token: its trajectory's source start plus its
        # offset inside the trajectory.
        shift = torch.repeat_interleave(starts - cu_seqlens[:-1], lengths)  # (T',)
        token_index = torch.arange(int(cu_seqlens[-1])) + shift  # (T',)

        def per_traj(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]

        def per_token(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[token_index]

        return RolloutSet(
            input_ids=self.input_ids[token_index],
            cu_seqlens=cu_seqlens,
            turn_ids=self.turn_ids[token_index],
            group_ids=self.group_ids[idx],
            turn_rewards=self.turn_rewards[idx],
            format_penalty=per_traj(self.format_penalty),
            repeat_penalty=per_traj(self.repeat_penalty),
            returns=per_traj(self.returns),
            weights=per_traj(self.weights),
            behavior_logprobs=per_token(self.behavior_logprobs),
            metadata=dict(self.metadata),
        )

    @staticmethod
    def concat(sets: Sequence[RolloutSet], group_ids: GroupIdPolicy = "keep") -> RolloutSet:
        """Concatenate several sets, trajectories in order.

        ``group_ids="keep"`` keeps the stored group ids: right when the writers used global
        ids (a prompt group may then span several sets). ``"offset"`` renumbers each set's
        groups after the previous set's, so ids that were only unique within a set stay
        distinct: right when every prompt group lives in one set. Absent penalties count
        as 0; ``returns``, ``weights`` and ``behavior_logprobs`` must be present in all sets
        or in none. ``turn_rewards`` is widened with NaN to the largest K.
        """
        if not sets:
            raise RolloutFormatError("concat needs at least one rollout set")
        if group_ids not in ("keep", "offset"):
            raise RolloutFormatError(f"group_ids must be 'keep' or 'offset', got {group_ids!r}")
        hashes = {s.metadata.get(META_TOKENIZER_VOCAB_HASH) for s in sets} - {None}
        if len(hashes) > 1:
            raise RolloutFormatError(
                "cannot merge rollout sets tokenised with different tokenizers "
                f"(vocabulary hashes {sorted(hashes)}); re-tokenise them with one tokenizer"
            )
        for name in ("returns", "weights", "behavior_logprobs"):
            present = [getattr(s, name) is not None for s in sets]
            if any(present) and not all(present):
                raise RolloutFormatError(
                    f"cannot merge rollout sets: {name!r} is present in sets "
                    f"{[i for i, p in enumerate(present) if p]} but not in the others; "
                    f"drop it from all (dataclasses.replace(s, {name}=None)) or compute it for all"
                )

        width = max(s.max_turns for s in sets)
        cu_parts, gid_parts, reward_parts = [torch.zeros(1, dtype=torch.int64)], [], []
        token_offset, next_group = 0, 0
        for s in sets:
            cu_parts.append(s.cu_seqlens[1:] + token_offset)
            token_offset += s.num_tokens
            gids = s.group_ids
            if group_ids == "offset" and gids.numel():
                gids = gids - gids.min() + next_group
                next_group = int(gids.max()) + 1
            gid_parts.append(gids)
            rewards = torch.full((s.num_trajectories, width), float("nan"), dtype=torch.float32)
            rewards[:, : s.max_turns] = s.turn_rewards
            reward_parts.append(rewards)

        def cat_optional(name: str) -> Tensor | None:
            if all(getattr(s, name) is None for s in sets):
                return None
            # Only the penalties can be absent from some sets here (checked above): absent = 0.
            return torch.cat(
                [
                    getattr(s, name)
                    if getattr(s, name) is not None
                    else torch.zeros(s.num_trajectories, dtype=torch.float32)
                    for s in sets
                ]
            )

        # Metadata: the entries all sets agree on.
        metadata = dict(sets[0].metadata)
        for s in sets[1:]:
            metadata = {k: v for k, v in metadata.items() if s.metadata.get(k) == v}

        return RolloutSet(
            input_ids=torch.cat([s.input_ids for s in sets]),
            cu_seqlens=torch.cat(cu_parts),
            turn_ids=torch.cat([s.turn_ids for s in sets]),
            group_ids=torch.cat(gid_parts),
            turn_rewards=torch.cat(reward_parts),
            format_penalty=cat_optional("format_penalty"),
            repeat_penalty=cat_optional("repeat_penalty"),
            returns=cat_optional("returns"),
            weights=cat_optional("weights"),
            behavior_logprobs=cat_optional("behavior_logprobs"),
            metadata=metadata,
        )


# ---- tokenizer identity --------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, str]:
    """Metadata entries identifying a tokenizer: its name, vocabulary size and a hash.

    The hash is the SHA-256 of the vocabulary (token strings in id order, added tokens
    included), so the same tokenizer loaded from a hub id or a local copy matches.
    """
    vocab = tokenizer.get_vocab()  # token -> id
    ordered = sorted(vocab.items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(ordered, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {
        META_TOKENIZER_NAME: str(
            getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        ),
        META_TOKENIZER_VOCAB_HASH: digest,
        META_TOKENIZER_VOCAB_SIZE: str(len(tokenizer)),
    }


# ---- validation ------------------------------------------------------------------------------


def validate_rollouts(
    rollouts: RolloutSet,
    *,
    vocab_size: int | None = None,
    tokenizer: Any = None,
    train_turns: TrainTurns = "last",
    allow_empty: bool = False,
) -> None:
    """Raise ``RolloutFormatError`` describing the first problem found, else return None.

    Checks dtypes and shapes, boundaries, turn ids against rewards, finite values, token ids
    against ``vocab_size`` (the model's embedding rows), the file's tokenizer identity
    against ``tokenizer`` (when the file records one), that every trajectory has a trained
    token under ``train_turns``, and, unless ``allow_empty`` (e.g. one shard of a run with
    more shards than prompts), that there is at least one trajectory.
    """
    rs = rollouts
    _check_types_and_shapes(rs)
    S, T = rs.num_trajectories, rs.num_tokens
    if S == 0 and not allow_empty:
        raise RolloutFormatError(
            "the rollout set holds no trajectories, so there is nothing to train on or merge; "
            "roll out (or convert) again with at least one problem"
        )

    cu = rs.cu_seqlens
    if int(cu[0]) != 0:
        raise RolloutFormatError(f"cu_seqlens must start at 0, starts at {int(cu[0])}")
    if int(cu[-1]) != T:
        raise RolloutFormatError(
            f"cu_seqlens must end at the token count {T} (len(input_ids)), ends at {int(cu[-1])}"
        )
    lengths = rs.lengths()
    if S and bool((lengths <= 0).any()):
        bad = int(torch.nonzero(lengths <= 0)[0])
        raise RolloutFormatError(
            f"cu_seqlens must be strictly increasing; trajectory {bad} has "
            f"{int(lengths[bad])} tokens ({int(cu[bad])} -> {int(cu[bad + 1])})"
        )

    if T:
        lo, hi = int(rs.input_ids.min()), int(rs.input_ids.max())
        if lo < 0:
            raise RolloutFormatError(f"input_ids contains a negative token id ({lo})")
        if vocab_size is not None and hi >= vocab_size:
            raise RolloutFormatError(
                f"input_ids contains token id {hi} >= the model's vocabulary size {vocab_size}; "
                "the rollouts were tokenised for another model, or the model's embedding is "
                "too small"
            )
    if tokenizer is not None:
        _check_tokenizer(rs, tokenizer)

    turns = rs.turn_ids.to(torch.int64)
    if T and int(turns.min()) < 0:
        raise RolloutFormatError(f"turn_ids contains a negative value ({int(turns.min())})")
    num_turns = rs.num_turns()  # (S,)
    # Rewards: a finite prefix of length num_turns, NaN after it.
    rewards = rs.turn_rewards
    if bool(torch.isinf(rewards).any()):
        raise RolloutFormatError(
            "turn_rewards contains inf; rewards must be finite (NaN = no turn)"
        )
    present = ~torch.isnan(rewards)  # (S, K)
    k = torch.arange(rs.max_turns)
    expected = k[None, :] < num_turns[:, None]  # (S, K)
    mismatch = (present != expected).any(dim=1)
    if bool(mismatch.any()):
        i = int(torch.nonzero(mismatch)[0])
        raise RolloutFormatError(
            f"trajectory {i} has {int(num_turns[i])} assistant turns (largest turn id) but "
            f"rewards {rewards[i].tolist()}; turn k's reward goes in column k-1, NaN after the "
            "last turn, and the file needs as many reward columns as the longest trajectory's turns"
        )

    for name in ("format_penalty", "repeat_penalty", "returns", "behavior_logprobs"):
        t = getattr(rs, name)
        if t is not None and not bool(torch.isfinite(t).all()):
            raise RolloutFormatError(f"{name} contains NaN or inf; every value must be finite")
    if rs.weights is not None:
        w = rs.weights
        if not bool(torch.isfinite(w).all()):
            raise RolloutFormatError(
                "weights contains NaN or inf; recompute them (drift_engine.weighting) or drop them"
            )
        if S and float(w.min()) < 0:
            raise RolloutFormatError(
                f"weights must be non-negative, found {float(w.min())}; importance weights are "
                "exp(R/beta) ratios"
            )

    # Every trajectory needs a trained token it can predict: position 0 has no prediction.
    trained = rs.trained_mask(train_turns)
    if T:
        trained = trained.clone()
        trained[cu[:-1]] = False
    per_traj = torch.zeros(S, dtype=torch.int64).index_add_(
        0, rs.token_trajectory(), trained.to(torch.int64)
    )
    if S and bool((per_traj == 0).any()):
        missing = torch.nonzero(per_traj == 0).flatten()
        raise RolloutFormatError(
            f"{missing.numel()} trajectories have no trained token under train_turns="
            f"{train_turns!r} (first: trajectory {int(missing[0])}); every trajectory needs an "
            "assistant turn (turn_ids > 0) after its first token; drop such trajectories "
            "with RolloutSet.select"
        )


def _check_types_and_shapes(rs: RolloutSet) -> None:
    for name, (dtype, _) in _TENSOR_SPECS.items():
        t = getattr(rs, name)
        if t is None:
            if name in _REQUIRED:
                raise RolloutFormatError(f"missing required tensor {name!r}")
            continue
        if not isinstance(t, Tensor):
            raise RolloutFormatError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise RolloutFormatError(
                f"{name} must have dtype {dtype}, got {t.dtype}; convert it with .to({dtype})"
            )
    if rs.cu_seqlens.dim() != 1 or rs.cu_seqlens.numel() < 1:
        raise RolloutFormatError("cu_seqlens must be 1-D with S+1 entries (at least [0])")
    S, T = rs.num_trajectories, rs.input_ids.numel()
    for name, (_, per) in _TENSOR_SPECS.items():
        t = getattr(rs, name)
        if t is None or per == "boundary":
            continue
        want = {"token": (T,), "trajectory": (S,)}.get(per)
        if per == "trajectory_by_turn":
            if t.dim() != 2 or t.shape[0] != S:
                raise RolloutFormatError(
                    f"{name} must have shape (S, K) = ({S}, K), got {tuple(t.shape)}"
                )
        elif tuple(t.shape) != want:
            unit = "token of input_ids" if per == "token" else "trajectory (len(cu_seqlens) - 1)"
            raise RolloutFormatError(
                f"{name} must have one value per {unit}: shape {want}, got {tuple(t.shape)}"
            )
    if not isinstance(rs.metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in rs.metadata.items()
    ):
        raise RolloutFormatError(
            "metadata must be a dict of str -> str (JSON-encode structured values)"
        )


def _check_tokenizer(rs: RolloutSet, tokenizer: Any) -> None:
    stored = rs.metadata.get(META_TOKENIZER_VOCAB_HASH)
    if stored is None:
        return  # nothing recorded to compare against; the vocabulary-size check still applies
    actual = tokenizer_fingerprint(tokenizer)
    if actual[META_TOKENIZER_VOCAB_HASH] != stored:
        raise RolloutFormatError(
            "tokenizer mismatch: the file was tokenised with "
            f"{rs.metadata.get(META_TOKENIZER_NAME, '?')!r} (vocabulary hash {stored[:12]}), "
            f"but the given tokenizer {actual[META_TOKENIZER_NAME]!r} has vocabulary hash "
            f"{actual[META_TOKENIZER_VOCAB_HASH][:12]}; train with the tokenizer the rollouts "
            "were sampled with, or re-convert the data with this tokenizer"
        )


# ---- writing -------------------------------------------------------------------------------


def save_rollouts(
    path: str | os.PathLike, rollouts: RolloutSet, max_shard_bytes: int | None = None
) -> list[Path]:
    """Validate and write ``rollouts`` to ``path`` (``*.safetensors``); return the files written.

    With ``max_shard_bytes`` and more data than that, trajectories are split in order into
    shards ``<stem>-00001-of-0000N.safetensors``, each a complete rollout file by itself,
    plus ``<name>.index.json`` listing them (returned last). Every file is written to a
    temporary name and renamed into place, so readers never see a partial file. Files of an
    earlier set written to ``path`` that this one does not replace (its single file, index or
    shards) are removed afterwards, so ``load_rollouts(path)`` reads this set.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise RolloutFormatError(f"rollout files end in .safetensors; got {str(path)!r}")
    validate_rollouts(rollouts, allow_empty=True)
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise RolloutFormatError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    path.parent.mkdir(parents=True, exist_ok=True)

    bounds = _shard_bounds(rollouts, max_shard_bytes)
    earlier = existing_rollout_files(path)
    if len(bounds) == 1:
        _write_file(path, rollouts)
        _remove_stale(earlier, [path])
        return [path]

    n = len(bounds)
    stem = path.name[: -len(".safetensors")]
    written, entries = [], []
    for i, (start, end) in enumerate(bounds, start=1):
        shard = rollouts.select(torch.arange(start, end))
        shard_path = path.with_name(f"{stem}-{i:05d}-of-{n:05d}.safetensors")
        _write_file(shard_path, shard)
        written.append(shard_path)
        entries.append(
            {
                "file": shard_path.name,
                "num_trajectories": shard.num_trajectories,
                "num_tokens": shard.num_tokens,
            }
        )
    index = {
        META_FORMAT: FORMAT_NAME,
        META_FORMAT_VERSION: FORMAT_VERSION,
        "num_trajectories": rollouts.num_trajectories,
        "num_tokens": rollouts.num_tokens,
        "shards": entries,
        "metadata": _file_metadata(rollouts),
    }
    index_path = _index_path(path)
    write_text_atomic(index_path, json.dumps(index, indent=2) + "\n")
    written.append(index_path)
    _remove_stale(earlier, written)
    return written


def _remove_stale(earlier: list[Path], written: list[Path]) -> None:
    for p in set(earlier) - set(written):
        p.unlink(missing_ok=True)


def existing_rollout_files(path: str | os.PathLike) -> list[Path]:
    """The files of a rollout set written to ``path`` that exist now: the file itself, its
    shard index and its shards (``save_rollouts`` with ``max_shard_bytes``)."""
    path = Path(path)
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    found = [p for p in (path, _index_path(path)) if p.is_file()]
    if path.parent.is_dir():
        found += sorted(
            p
            for p in path.parent.glob(f"{glob.escape(stem)}-*-of-*.safetensors")
            if (m := _SHARD_RE.match(p.name)) and m["stem"] == stem
        )
    return found


def check_output_file(
    path: str | os.PathLike, *, overwrite: bool = False, option: str = "--out"
) -> Path:
    """Check, before any work, that an output file can be written at ``path``: it is not a
    folder, nothing is there yet (unless ``overwrite``; a rollout file's shards and index
    count too) and its folder exists or can be created, and is writable (a file is created
    and removed in its nearest existing folder; no folder is created). Raises ``ConfigError``
    saying what to change; returns ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is a folder; give a file name inside it.")
    existing = existing_rollout_files(path) if path.suffix == ".safetensors" else []
    if not existing and path.is_file():
        existing = [path]
    if existing and not overwrite:
        shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise ConfigError(
            f"{option} {str(path)!r} already exists ({shown}); pass --overwrite to replace it, "
            "or choose another name."
        )
    check_writable_location(path, option)
    return path


def _index_path(path: Path) -> Path:
    return path.with_name(path.name + ".index.json")


def _file_metadata(rs: RolloutSet) -> dict[str, str]:
    meta = dict(rs.metadata)
    meta[META_FORMAT] = FORMAT_NAME
    meta[META_FORMAT_VERSION] = str(FORMAT_VERSION)
    return meta


def _shard_bounds(rs: RolloutSet, max_shard_bytes: int | None) -> list[tuple[int, int]]:
    """Contiguous trajectory ranges [start, end) of at most ``max_shard_bytes`` each (a
    single trajectory larger than that gets a shard of its own)."""
    S = rs.num_trajectories
    if max_shard_bytes is None or S == 0:
        return [(0, S)]
    tensors = rs.tensors()
    per_token = sum(t.element_size() for n, t in tensors.items() if _TENSOR_SPECS[n][1] == "token")
    per_traj = sum(
        t.element_size() * (t.shape[1] if t.dim() == 2 else 1)
        for n, t in tensors.items()
        if _TENSOR_SPECS[n][1] in ("trajectory", "trajectory_by_turn", "boundary")
    )
    cum = torch.cumsum(rs.lengths() * per_token + per_traj, 0)  # (S,) bytes up to trajectory i
    if int(cum[-1]) <= max_shard_bytes:
        return [(0, S)]
    bounds, start = [], 0
    while start < S:
        base = int(cum[start - 1]) if start else 0
        end = int(torch.searchsorted(cum, base + max_shard_bytes, right=True))
        end = max(end, start + 1)
        bounds.append((start, end))
        start = end
    return bounds


def _write_file(path: Path, rs: RolloutSet) -> None:
    from safetensors.torch import save_file

    tensors = {name: t.contiguous() for name, t in rs.tensors().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=_file_metadata(rs))


# ---- reading -------------------------------------------------------------------------------


def load_rollouts(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    group_ids: GroupIdPolicy = "offset",
    validate: bool = True,
    allow_empty: bool = False,
) -> RolloutSet:
    """Memory-map a rollout file.

    ``path`` may be a single file, any shard of a sharded file (or its ``.index.json``), a
    directory holding one sharded or single file, or a list of paths to merge. Shards of one
    ``save_rollouts`` call keep their group ids (a group may span shards). Separately written
    files (a list, e.g. one per rollout process) are merged with ``group_ids``: ``"offset"``
    (default) renumbers each file's groups after the previous file's, which is right when each
    prompt group was written by one process; ``"keep"`` keeps the stored ids, for writers that
    used global group ids. With ``validate`` (default) the structure is checked on load,
    and a set without trajectories is refused unless ``allow_empty``.
    """
    if isinstance(path, (list, tuple)):
        if not path:
            raise RolloutFormatError("load_rollouts got an empty list of paths")
        sets = [load_rollouts(p, validate=False) for p in path]
        rs = RolloutSet.concat(sets, group_ids=group_ids)
    else:
        files = _resolve_files(Path(path))
        sets = [_read_file(f) for f in files]
        rs = sets[0] if len(sets) == 1 else RolloutSet.concat(sets, group_ids="keep")
    if validate:
        try:
            validate_rollouts(rs, allow_empty=allow_empty)
        except RolloutFormatError as err:
            if rs.num_trajectories:
                raise
            raise RolloutFormatError(f"{_describe(path)}: {err}") from None
    return rs


def _describe(path: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    if isinstance(path, (list, tuple)):
        return ", ".join(repr(str(p)) for p in path)
    return repr(str(path))


def _resolve_files(path: Path) -> list[Path]:
    """The data files making up the rollout set at ``path``, in order."""
    if path.is_dir():
        indexes = sorted(path.glob("*.index.json"))
        if len(indexes) == 1:
            return _files_from_index(indexes[0])
        singles = sorted(p for p in path.glob("*.safetensors") if not _SHARD_RE.match(p.name))
        shards = sorted(p for p in path.glob("*.safetensors") if _SHARD_RE.match(p.name))
        if len(indexes) == 0 and len(singles) == 1 and not shards:
            return singles
        raise RolloutFormatError(
            f"directory {str(path)!r} holds {len(indexes)} shard indexes and {len(singles)} "
            "unsharded rollout files; it must hold exactly one rollout set: pass the file "
            "itself, or a list of files to merge"
        )
    if path.name.endswith(".index.json"):
        return _files_from_index(path)
    match = _SHARD_RE.match(path.name)
    if match:
        index = path.with_name(match["stem"] + ".safetensors.index.json")
        if index.exists():
            return _files_from_index(index)
        count = int(match["count"])
        files = [
            path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.safetensors")
            for i in range(1, count + 1)
        ]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise RolloutFormatError(f"sharded rollout file is incomplete: missing {missing}")
        return files
    if not path.exists():
        index = _index_path(path)
        if index.exists():
            return _files_from_index(index)
        raise RolloutFormatError(f"rollout file {str(path)!r} does not exist")
    return [path]


def _files_from_index(index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        names = [entry["file"] for entry in index["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RolloutFormatError(
            f"cannot read shard index {str(index_path)!r}: {err}; rewrite it with save_rollouts"
        ) from err
    if not isinstance(index, dict) or index.get(META_FORMAT) != FORMAT_NAME:
        raise RolloutFormatError(f"{str(index_path)!r} is not a {FORMAT_NAME} shard index")
    for name in names:
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
            raise RolloutFormatError(
                f"shard index {str(index_path)!r} names {name!r}, which is not a file in the "
                "index's own folder; an index lists the bare file names of its shards (rewrite "
                "it with save_rollouts)"
            )
    files = [index_path.with_name(name) for name in names]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise RolloutFormatError(
            f"shard index {str(index_path)!r} lists files that do not exist: {missing}"
        )
    return files


def _read_file(path: Path) -> RolloutSet:
    metadata, tensors = _map_safetensors(path)
    fmt = metadata.get(META_FORMAT)
    if fmt != FORMAT_NAME:
        raise RolloutFormatError(
            f"{str(path)!r} is a safetensors file but not a rollout file (metadata "
            f"{META_FORMAT!r} is {fmt!r}, expected {FORMAT_NAME!r}); write it with save_rollouts "
            "or drift-engine convert"
        )
    version = metadata.get(META_FORMAT_VERSION, "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise RolloutFormatError(
            f"{str(path)!r} has rollout format version {version!r}; this drift-engine reads "
            f"versions up to {FORMAT_VERSION}: upgrade drift-engine"
        )
    unknown = sorted(set(tensors) - set(_TENSOR_SPECS))
    if unknown:
        raise RolloutFormatError(
            f"{str(path)!r} holds unknown tensors {unknown}; known: {sorted(_TENSOR_SPECS)}"
        )
    missing = sorted(set(_REQUIRED) - set(tensors))
    if missing:
        raise RolloutFormatError(f"{str(path)!r} is missing required tensors {missing}")
    return RolloutSet(**tensors, metadata=dict(metadata))


def _map_safetensors(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, tensors by name) of a safetensors file, read with the safetensors library.

    It checks the header (JSON, dtypes, shapes against byte ranges, ranges inside the file)
    and maps the file: the tensors are views of a private copy-on-write mapping.
    """
    from safetensors import SafetensorError, safe_open

    try:
        size = path.stat().st_size
        if size < 8:
            raise RolloutFormatError(f"{str(path)!r} is too short to be a safetensors file")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except RolloutFormatError:
        raise  # already names the file and the problem (and is a ValueError)
    except OSError as err:
        raise RolloutFormatError(f"cannot read rollout file {str(path)!r}: {err}") from err
    except (SafetensorError, ValueError, RuntimeError, TypeError) as err:
        raise RolloutFormatError(
            f"{str(path)!r} is not a readable safetensors file (truncated or corrupt: {err}); "
            "write it again (drift-engine rollout / convert, or save_rollouts)"
        ) from err
    return metadata, tensors

