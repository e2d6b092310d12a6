"""Token ids -> streamed text, with stop strings.

A byte-level BPE token can end in the middle of a UTF-8 character, and a stop
string can span several tokens; so text is released only once it is final:
never a trailing partial character (decoded as U+FFFD), never a suffix that
might still grow into a stop string. Pure Python: tested without a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class Delta:
    """What one decoding step adds to a sequence's output."""

    text: str
    finish_reason: Optional[str] = None  # "stop" | "length" | None (still running)
    completion_tokens: int = 0  # set on the last delta: the sequence's generated tokens


@dataclass
class TextStream:
    """Follows one sequence's generated ids; `push` returns the text that became final.

    `decode` maps the generated ids (not the prompt) to text. Decoding all ids each
    step costs O(n) per step, which is nothing next to a forward pass at these lengths
    and sidesteps the merge-across-boundary cases of incremental decoding.
    """

    decode: Callable[[Sequence[int]], str]
    stop: Tuple[str, ...] = ()
    max_tokens: int = 16
    eos_token_id: Optional[int] = None
    ids: List[int] = field(default_factory=list)
    emitted: int = 0  # characters of the decoded text already released
    finish_reason: Optional[str] = None
    completion_tokens: int = 0  # generated tokens counted in usage, eos included

    def push(self, token_id: int) -> Delta:
        assert self.finish_reason is None, "push after the sequence finished"
        self.completion_tokens += 1
        if token_id == self.eos_token_id:
            return self._finish(self.decode(self.ids), "stop")
        self.ids.append(token_id)
        text = self.decode(self.ids)
        stop_at = _find_stop(text, self.stop, start=max(0, self.emitted - _longest(self.stop)))
        if stop_at is not None:
            return self._finish(text[:stop_at], "stop")
        if len(self.ids) >= self.max_tokens:
            return self._finish(text, "length")
        safe_end = len(text) - _held_back(text, self.stop)
        return self._release(text, safe_end)

    def _finish(self, text: str, reason: str) -> Delta:
        self.finish_reason = reason
        delta = self._release(text, len(text))
        delta.finish_reason = reason
        delta.completion_tokens = self.completion_tokens
        return delta

    def _release(self, text: str, end: int) -> Delta:
        end = max(end, self.emitted)
        chunk = text[self.emitted : end]
        self.emitted = end
        return Delta(chunk)


def _find_stop(text: str, stops: Tuple[str, ...], start: int) -> Optional[int]:
    """Index of the earliest stop string in text[start:], or None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: Tuple[str, ...]) -> int:
    """How many trailing characters must wait: a partial UTF-8 character or a stop-string prefix.

    Lossy UTF-8 decoding (Python's and the tokenizers library's) turns an incomplete but valid
    prefix of a character into exactly ONE U+FFFD, and invalid bytes into U+FFFDs of their own.
    So only the last U+FFFD can still become a character; the ones before it are final, and
    holding them back too would keep a stream of invalid bytes silent until the sequence ends.
    """
    if text.endswith(REPLACEMENT_CHAR):
        return 1
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _longest(stops: Tuple[str, ...]) -> int:
    return max((len(s) for s in stops), default=0)
