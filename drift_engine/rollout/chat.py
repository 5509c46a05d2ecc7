"""Chat-template bookkeeping for multi-turn rollouts without re-tokenising generated text.

A trajectory's tokens are built incrementally:

    prompt ids   = tokens of template(initial messages, generation prompt)
    + generated ids of turn 1, exactly as sampled
    + delta ids  = tokens of the template text that follows the assistant's message:
                   the rest of its closing (e.g. "\\n" after "<|im_end|>"), then the user's
                   feedback and the next generation prompt
    + generated ids of turn 2 ...

Each delta is a suffix of the template text: render the conversation with and without the new
messages and keep what the longer rendering adds. At the end, the running ids are compared
with the template applied to the whole final conversation; differences (a template that
rewrites earlier messages, or a sampled tokenisation that is not the canonical one) are
counted and reported, and the sampled ids are kept.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drift_engine.envs.base import Message
from drift_engine.errors import ConfigError

_SENTINEL = "\u2063DRIFT-ENGINE-SENTINEL\u2063"


class ChatFormatter:
    """Renders and tokenises conversations with a tokenizer's chat template."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ConfigError(
                f"the tokenizer of {name!r} has no chat template, and multi-turn rollouts need "
                "one to format feedback turns. Use an instruct/chat model, or pass a Jinja "
                "template (--chat-template FILE.jinja)."
            )

    # ---- rendering ----------------------------------------------------------------------

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages),
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def encode(self, text: str) -> list[int]:
        # The template text already holds BOS and other special tokens where it wants them.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt=True))

    def conversation_ids(self, messages: Sequence[Message]) -> list[int]:
        """Tokens of the template applied to a whole conversation (ending with the assistant)."""
        return self.encode(self.render(messages, add_generation_prompt=False))

    # ---- stop tokens ----------------------------------------------------------------------

    def end_of_turn_token_id(self) -> int | None:
        """The special token the template puts right after an assistant message, if any."""
        messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": _SENTINEL}]
        try:
            text = self.render(messages, add_generation_prompt=False)
        except Exception:  # templates that reject this probe conversation
            return None
        after = text.split(_SENTINEL, 1)[-1] if _SENTINEL in text else ""
        ids = self.encode(after.lstrip(" "))
        if not ids:
            return None
        special = set(getattr(self.tokenizer, "all_special_ids", []))
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        first = ids[0]
        if first in special or getattr(decoder.get(first), "special", False):
            return first
        return None

    def stop_token_ids(self) -> list[int]:
        """EOS and the template's end-of-turn token: where an assistant message ends."""
        stops: list[int] = []
        eos = getattr(self.tokenizer, "eos_token_id", None)
        for token in [*(eos if isinstance(eos, list) else [eos]), self.end_of_turn_token_id()]:
            if token is not None and int(token) not in stops:
                stops.append(int(token))
        return stops

    # ---- incremental deltas ----------------------------------------------------------------

    def assistant_closing(
        self, context: Sequence[Message], content: str, stop_text: str | None
    ) -> tuple[str, bool]:
        """Template text after the generated ids of an assistant message: its closing.

        ``context``: messages before the assistant message; ``content``: its text without
        the stop token; ``stop_text``: the decoded stop token it ended with, or None if the
        generation was cut by the token limit (the closing then includes the end of turn).
        """
        prompt = self.render(context, add_generation_prompt=True)
        full = self.render([*context, {"role": "assistant", "content": content}], False)
        if not full.startswith(prompt):
            return "", False
        rendered = full[len(prompt) :]  # the assistant message as the template writes it
        if not rendered.startswith(content):
            return "", False
        closing = rendered[len(content) :]
        if stop_text is None:
            return closing, True
        if closing.startswith(stop_text):
            return closing[len(stop_text) :], True
        # Stopped on a token the template does not close with (e.g. EOS vs end-of-turn).
        return closing, False

    def feedback_delta(
        self, conversation: Sequence[Message], user_message: Message
    ) -> tuple[str, bool]:
        """Template text that the new user message and the generation prompt add after
        ``conversation`` (which ends with an assistant message)."""
        before = self.render(conversation, add_generation_prompt=False)
        after = self.render([*conversation, user_message], add_generation_prompt=True)
        if after.startswith(before):
            return after[len(before) :], True
        # The template rewrites earlier messages once a later one exists: best effort.
        common = len(os.path.commonprefix([before, after]))
        return after[common:], False


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ (incl. length); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def read_chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read the chat template file {path!r}: {err}") from None
