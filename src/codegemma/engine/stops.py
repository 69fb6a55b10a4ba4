"""Text of a generation as it grows: stop strings that span token boundaries, safe streaming.

Tokens are decoded incrementally (never a broken UTF-8 character). After each token the new text
is searched for every stop string, including matches that began in earlier tokens. While streaming,
text that might be the start of a stop string is held back until it is clear, so a client never
sees the beginning of a stop string that later completes.
"""

from __future__ import annotations

from collections.abc import Sequence

from codegemma.tokenizer import TextCodec


class StopText:
    """Accumulates decoded text; `push(token)` returns (releasable delta, matched stop or None)."""

    def __init__(self, tokenizer: TextCodec | None, stop_strings: Sequence[str] = ()) -> None:
        # without a tokenizer there is no text: the engine then works on token ids alone
        # special tokens (sentinels, <unusedN>) carry no text for the user
        self._decoder = (
            tokenizer.stream_decoder(skip_special=True) if tokenizer is not None else _NoText()
        )
        self._stops = tuple(stop_strings)
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self._released = 0
        self.matched: str | None = None

    def push(self, token_id: int) -> tuple[str, str | None]:
        return self._extend(self._decoder.push(token_id))

    def finish(self) -> str:
        """Flush the decoder and release everything held back (no stop string can complete now)."""
        delta, _ = self._extend(self._decoder.flush())
        if self.matched is not None:
            return delta
        rest = self.text[self._released :]
        self._released = len(self.text)
        return delta + rest

    def _extend(self, piece: str) -> tuple[str, str | None]:
        if self.matched is not None or not piece:
            return "", self.matched
        start = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        hit = self._earliest_stop(start)
        if hit is not None:
            index, stop = hit
            self.text, self.matched = self.text[:index], stop
            return self._release(len(self.text)), stop
        return self._release(len(self.text) - self._held_back()), None

    def _earliest_stop(self, start: int) -> tuple[int, str] | None:
        found = [(i, s) for s in self._stops if (i := self.text.find(s, start)) >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        for n in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self._released)
        delta = self.text[self._released : upto]
        self._released = upto
        return delta


class _NoText:
    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""
