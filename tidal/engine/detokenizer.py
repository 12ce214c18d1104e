"""Incremental detokenization of a sample's output tokens, and stop-string search.

Decoding the whole output after every token costs O(length) per token. Instead we decode a short
window: ``token_ids[prefix_offset:]``, where ``token_ids[prefix_offset:read_offset]`` are tokens
already turned into text and serve as context (decoders that drop a leading space or join pieces
need it), and what the window decodes to beyond that context is new text.

Invariants (``D`` = ``tokenizer.decode`` of a token list):

- ``text == D(token_ids[:read_offset])`` plus the complete characters emitted since, and ``text``
  only ever grows (so a caller can search it for stop strings from its previous length).
- ``read_offset`` is a clean boundary: the text of the tokens before it ends in a complete
  character, so ``D(token_ids[:n]) == D(token_ids[:read_offset]) + (rest)`` for every n.
- A trailing U+FFFD in the window (an incomplete UTF-8 / byte-level sequence) is held back; it
  is only emitted once followed by more text (then it is final) or by ``flush()``.

After ``flush()``, ``text == tokenizer.decode(token_ids, skip_special_tokens=...,
clean_up_tokenization_spaces=False)``. The prompt is not part of the output text.
"""

from __future__ import annotations

from collections.abc import Callable

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.prompt_token_ids = prompt_token_ids
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._text = ""
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""  # D(token_ids[prefix_offset:read_offset])
        self._held_from = 0  # chars of the window text beyond _prefix_text already emitted
        self._decode_fn = _decoder(tokenizer, skip_special_tokens)

    @property
    def text(self) -> str:
        return self._text

    def push(self, token_ids: list[int]) -> str:
        """Add output tokens; return the text they complete (possibly "")."""
        if not token_ids:
            return ""
        self.token_ids.extend(token_ids)
        window = self._decode(self.token_ids[self._prefix_offset :])
        stable = len(window)
        while stable > 0 and window[stable - 1] == _REPLACEMENT:
            stable -= 1
        start = len(self._prefix_text) + self._held_from
        new = window[start:stable] if stable > start else ""
        if stable == len(window):
            # Clean end: the window's tokens become the next context.
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            self._prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
            self._held_from = 0
        elif new:
            self._held_from = stable - len(self._prefix_text)
        self._text += new
        return new

    def flush(self) -> str:
        """Emit what is held back (an unfinished sequence decodes to U+FFFD, as in decode)."""
        window = self._decode(self.token_ids[self._prefix_offset :])
        new = window[len(self._prefix_text) + self._held_from :]
        self._prefix_offset = self._read_offset = len(self.token_ids)
        self._prefix_text, self._held_from = "", 0
        self._text += new
        return new

    def _decode(self, token_ids: list[int]) -> str:
        return self._decode_fn(token_ids) if token_ids else ""


def _decoder(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """tokenizer.decode without clean-up; straight to the Rust tokenizer when that is all a
    fast tokenizer's decode does (several times less overhead per call)."""
    if _plain_fast(tokenizer):
        backend = tokenizer.backend_tokenizer
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def _plain_fast(tokenizer) -> bool:
    """A fast tokenizer whose decode is transformers' own (no subclass override to honour)."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        return False
    cls = type(tokenizer)
    return (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls._decode is PreTrainedTokenizerFast._decode
        and cls.decode is PreTrainedTokenizerBase.decode
    )


def find_stop(text: str, stop: list[str], start: int) -> tuple[int, str] | None:
    """The earliest stop string whose occurrence ends in the new region ``text[start:]``.

    An occurrence ``text[i:i+len(s)]`` counts when ``i + len(s) > start`` (its last character is
    new); ones wholly before ``start`` were checked earlier. Returns ``(i, s)`` for the smallest
    ``i`` (the first listed string on a tie), or None. The caller truncates the output to
    ``text[:i]``: stop strings are not part of the output.
    """
    best: tuple[int, str] | None = None
    for s in stop:
        i = text.find(s, max(0, start - len(s) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best
