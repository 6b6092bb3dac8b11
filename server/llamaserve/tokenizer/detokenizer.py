"""Streaming detokenization: new token ids in, the text they add out.

Decoding each new token alone loses text: a SentencePiece decoder strips the leading space of the
first token it sees, and a character split over several byte tokens decodes to U+FFFD until its
last byte arrives. So each push decodes a small window that starts a few tokens back (prefix
offset) and emits only what lies past the text already sent, holding back a trailing incomplete
character. The window slides forward whenever it ends on a character boundary, so a push costs
O(window), not O(sequence); only a run of invalid bytes keeps it open, until a character follows.
Decoding must not clean up spaces (tokenizers' decode does not), or earlier text could change.
"""

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"
PROMPT_WINDOW = 5  # prompt tokens decoded with the first output tokens, so their leading space survives


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Text deltas for one sequence. Joined, the deltas equal `tokenizer.decode(output_ids)` with no
    prompt; after a prompt they equal the text that the output adds to the prompt's decode (so the
    first delta keeps the space a SentencePiece decoder would strip at the start of a text)."""

    def __init__(
        self, tokenizer: Decoder, prompt_token_ids: Sequence[int] | None = None, skip_special_tokens: bool = True
    ):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids or ())
        self._read = len(self._ids)  # the window slides to here next: everything before it is sent
        self._prefix = max(self._read - PROMPT_WINDOW, 0)  # the window decoded on each push starts here
        self._sent = len(self._decode_window())  # characters of the window's text already accounted for

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Add tokens; return the text they complete (maybe "", while a character is incomplete)."""
        self._ids.extend(new_token_ids)
        text = self._decode_window()
        # An incomplete character decodes to U+FFFD; byte fallback turns its whole run of byte tokens
        # into U+FFFD until the last byte arrives. Hold the trailing run back.
        end = len(text.rstrip(REPLACEMENT))
        if end <= self._sent:  # nothing new yet (an incomplete character, or a skipped special token)
            return ""
        delta = text[self._sent : end]
        if end == len(text):  # the window ends on a character boundary: slide it past the sent text
            self._prefix, self._read = self._read, len(self._ids)
            self._sent = len(self._decode_window())
        else:
            self._sent = end
        return delta

    def _decode_window(self) -> str:
        return self._tokenizer.decode(self._ids[self._prefix :], skip_special_tokens=self._skip_special_tokens)

