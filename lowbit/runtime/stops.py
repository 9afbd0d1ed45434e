"""Stop strings over streamed text: what may be shown now, and where the text ends.

Text that could still grow into a stop string is held back until the next tokens decide it (a prefix of
"France is Paris" is never shown before the stop matches or fails), as serving engines do; the text before
the earliest match is all that is ever shown.
"""

from __future__ import annotations

from typing import Optional


class StopMatcher:
    """Feed the whole text generated so far; get the part that is safe to show since the last call."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.shown = 0  # characters of the text already returned

    def feed(self, text: str) -> tuple[str, bool]:
        """(new safe text, whether a stop string matched): on a match, the text up to the earliest match."""
        hit = self._earliest(text)
        if hit is not None:
            delta, self.shown = text[self.shown : max(hit, self.shown)], max(hit, self.shown)
            return delta, True
        safe = max(self.shown, len(text) - self._held(text))
        delta, self.shown = text[self.shown : safe], safe
        return delta, False

    def flush(self, text: str) -> str:
        """The held-back rest, once the text has ended without a stop."""
        delta, self.shown = text[self.shown :], len(text)
        return delta

    def _earliest(self, text: str) -> Optional[int]:
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, self.shown - longest + 1)  # a match ending before `shown` would have been found earlier
        found = [i for s in self.stops if (i := text.find(s, start)) >= 0]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """The length of the longest tail of ``text`` that begins some stop string."""
        held = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return held
