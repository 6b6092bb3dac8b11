"""Stop strings on streamed text: cut at the first match, never releasing half of one."""

from collections import deque
from collections.abc import Sequence


class StopStringMatcher:
    """Cuts a streamed text at the first stop string to complete (the one ending earliest; of those
    ending at the same character, the longest) and drops everything from its start on. Text that could
    be the start of a stop string is held back until later text decides it, so a client never sees half
    of one. The result does not depend on how the text is split into deltas.

    An Aho-Corasick automaton over all stop strings reads the text once, a character at a time: its
    state is the longest suffix of the text so far that begins some stop string, so the state's depth
    is exactly what to hold back, and the work is linear in the text whatever the stop strings.
    """

    def __init__(self, stop: Sequence[str]):
        stop = [s for s in stop if s]
        self._automaton = _Automaton(stop) if stop else None
        self._state = 0  # the root: nothing held back
        self._held: deque[str] = deque()  # the last depth(state) characters received, not yet released
        self.stopped = False

    def push(self, delta: str) -> str:
        """The text that is safe to release. After a match it returns the text up to the stop string,
        sets `stopped`, and everything after is dropped."""
        if self.stopped:
            return ""
        if self._automaton is None:  # no stop strings: nothing to match or hold
            return delta
        automaton, held, released = self._automaton, self._held, []
        for char in delta:
            self._state = state = automaton.step(self._state, char)
            held.append(char)
            if automaton.match[state]:  # a stop string ends here: release what precedes its start
                released.extend(held.popleft() for _ in range(len(held) - automaton.match[state]))
                self.stopped, self._state = True, 0
                held.clear()
                break
            while len(held) > automaton.depth[state]:
                released.append(held.popleft())
        return "".join(released)

    def flush(self) -> str:
        """At the end of generation: a held-back partial match never completed, so it is text."""
        text = "".join(self._held)
        self._held.clear()
        self._state = 0
        return text


class _Automaton:
    """Aho-Corasick over the stop strings. States are the trie's nodes (0 the root), each a prefix of
    some stop string; `fail` links a state to its longest proper suffix that is also a state."""

    def __init__(self, stops: list[str]):
        self.children: list[dict[str, int]] = [{}]
        self.depth = [0]  # characters spelled by each state
        self.fail = [0]
        self.match = [0]  # length of the longest stop string ending at this state (via suffixes); 0: none
        for stop in stops:
            state = 0
            for char in stop:
                if char not in self.children[state]:
                    self.children.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.fail.append(0)
                    self.match.append(0)
                    self.children[state][char] = len(self.children) - 1
                state = self.children[state][char]
            self.match[state] = len(stop)
        # Breadth first, so a state's fail target (shallower) is complete before the state itself.
        queue = deque(self.children[0].values())
        while queue:
            state = queue.popleft()
            for char, child in self.children[state].items():
                self.fail[child] = self.step(self.fail[state], char) if state else 0
                self.match[child] = self.match[child] or self.match[self.fail[child]]
                queue.append(child)

    def step(self, state: int, char: str) -> int:
        """The state after reading `char`; amortized O(1), as each fail hop shortens the state."""
        while char not in self.children[state]:
            if state == 0:
                return 0
            state = self.fail[state]
        return self.children[state][char]
