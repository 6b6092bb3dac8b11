"""Stop strings on streamed text: cut at the first match, never releasing half of one."""

from collections.abc import Sequence


class StopStringMatcher:
    """Cuts a streamed text at the first stop string. Text that could be the start of a stop string
    is held back until the next delta decides it, so a client never sees half of one."""

    def __init__(self, stop: Sequence[str]):
        self._stop = [s for s in stop if s]
        self._pending = ""  # received, not yet released: a possible beginning of a stop string
        self.stopped = False

    def push(self, delta: str) -> str:
        """The text that is safe to release. After a match it returns the text up to the stop string,
        sets `stopped`, and everything after is dropped."""
        if not self._stop or self.stopped:
            return "" if self.stopped else delta
        text = self._pending + delta  # released text ends before any possible match: search only this
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return text[: min(hits)]
        held = max((_overlap(text, s) for s in self._stop), default=0)
        self._pending = text[len(text) - held :]
        return text[: len(text) - held]

    def flush(self) -> str:
        """At the end of generation: a held-back partial match never completed, so it is text."""
        text, self._pending = self._pending, ""
        return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
