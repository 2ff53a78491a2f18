"""``stop`` strings on streamed text: text is cut before the first stop string, and text that may be the start of
one is held back until the next piece decides it. Reasoning and answer text are matched separately."""
from __future__ import annotations

from collections.abc import Sequence

Event = tuple[str, str]  # (kind, text): kind is "reasoning" or "answer" (model.Piece)


class StopFilter:
    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._kind = ""
        self._buf = ""

    def feed(self, kind: str, text: str) -> list[Event]:
        """The events ready to send after this piece; ``stopped`` turns True when a stop string completed."""
        out = self.flush() if kind != self._kind else []
        self._kind = kind
        self._buf += text
        hits = [i for i in (self._buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut, self._buf, self.stopped = self._buf[: min(hits)], "", True
            return out + ([(kind, cut)] if cut else [])
        keep = self._held()
        ready, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        return out + ([(kind, ready)] if ready else [])

    def flush(self) -> list[Event]:
        """What is held back, at the end of the output (or of one kind)."""
        out = [(self._kind, self._buf)] if self._buf else []
        self._buf = ""
        return out

    def _held(self) -> int:
        """Length of the longest tail of the buffer that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._buf)), best, -1):
                if self._buf.endswith(s[:k]):
                    best = k
                    break
        return best
