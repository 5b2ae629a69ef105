"""Incremental detokenization: token ids in, complete text out, as tokens are chosen.

`TextStream` is what ``model.stream``, a chat loop and an HTTP server share. It
never splits a character (a byte-level BPE token that ends inside a UTF-8
sequence decodes to U+FFFD and is held back until the next tokens complete it)
and never shows part of a stop string (a suffix that could still grow into one
is held back). The concatenation of everything it returns equals the tokenizer's
decoding of all pushed tokens, cut before the first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_INCOMPLETE = "\ufffd"  # what a lossy UTF-8 decode writes for bytes that do not (yet) form a character


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(hits)] if hits else text


class TextStream:
    """Turn token ids into text pieces as they arrive.

    ``push(token_id) -> str`` returns the text that became final with this token (often ``""``);
    ``flush() -> str`` returns what was held back, at the end. After a stop token (``stop_token_ids``)
    or a stop string (``stop``), ``stopped`` is True and nothing more is returned; ``text`` is
    everything returned so far.

    Decoding uses a moving window (the vLLM scheme): the new text is ``decode(ids[prefix:])`` minus
    ``decode(ids[prefix:read])``, so a step costs the window, not the whole output, and a decoder that
    strips a leading space from the first token of a text still sees its context.
    """

    def __init__(self, tokenizer, stop: str | Sequence[str] = (), *, stop_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        self.stop_token_ids = {int(t) for t in stop_token_ids}
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: ids before it are final text
        self._read = 0  # ids[_prefix:_read] decode to text already taken
        self._held = ""  # final text not returned yet: it could be the start of a stop string
        self.text = ""
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete and safe to show."""
        token_id = int(token_id)
        if self.stopped:
            return ""
        if token_id in self.stop_token_ids:
            self.stopped = True
            return self._emit(self._held, final=True)
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if len(now) <= len(before) or now.endswith(_INCOMPLETE):
            return ""  # nothing new, or a character still being spelled out
        self._prefix, self._read = self._read, len(self.ids)
        return self._emit(self._held + now[len(before) :])

    def flush(self) -> str:
        """The rest: held-back bytes (decoded as they are) and any partial stop-string suffix."""
        if self.stopped:
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        out = self._emit(self._held + now[len(before) :], final=True)
        self.stopped = True
        return out

    def _emit(self, pending: str, final: bool = False) -> str:
        hits = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            pending, self.stopped, final = pending[: min(hits)], True, True
        keep = 0 if final else self._partial_stop(pending)
        out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        return out

    def _partial_stop(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for k in range(min(len(text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                return k
        return 0


class StopWatch:
    """One `TextStream` per row of a batch: the ``watch`` of `decode_steps` for stop strings; keeps each
    row's text pieces for streaming."""

    def __init__(self, tokenizer, batch: int, stop: Sequence[str], stop_token_ids: Sequence[int] = ()):
        self.streams = [TextStream(tokenizer, stop, stop_token_ids=stop_token_ids) for _ in range(batch)]
        self.pieces = [""] * batch

    def __call__(self, tokens: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
        stopped = torch.zeros_like(running)
        for b, (t, live) in enumerate(zip(tokens.tolist(), running.tolist())):
            if live:
                s = self.streams[b]
                self.pieces[b] = s.push(t)
                stopped[b] = s.stopped
            else:
                self.pieces[b] = ""
        return stopped
