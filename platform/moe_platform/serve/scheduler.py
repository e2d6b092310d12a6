"""Continuous (iteration-level) batching over moe.generation.SlotDecoder. No Ray, no asyncio.

Each `step()`:
1. waiting requests are prefilled into free slots (prefill samples their first token);
2. every other running sequence decodes one token, all in one batched forward;
3. a sequence that ends (eos, a stop string, max_tokens) frees its slot at once,
   so a waiting request joins the batch on the very next step.
`cancel(key)` (a client that went away) frees a slot or drops a waiting request at once.
Sampling is per row (moe.generation): a greedy or seeded request gives the same text
whatever it is batched with. Expert-choice models are not causal, so they get one
running sequence at a time (`Engine.scheduler` decides).

The same scheduler runs outside Serve, from a plain Python loop (offline batch
inference, benchmarks, tests), so a seeded request there equals the server's:

    scheduler = engine.scheduler(num_slots=8)      # Engine.load(export_dir).scheduler(...)
    results = scheduler.run(jobs)                  # [(text, finish_reason, completion_tokens)]

or step it yourself: `submit(key, job)` any time, then `for key, delta in scheduler.step()`
while `scheduler.busy`; a Delta with a finish_reason is that request's last.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional, Sequence, Tuple, Union

from moe.generation import Sampling, SlotDecoder
from moe_platform.serve.text import Delta, TextStream

# What one step reports per request: its new text, or the error that ended it.
Event = Tuple[Hashable, Union[Delta, Exception]]


@dataclass
class _Sequence:
    key: Hashable
    slot: int
    text: TextStream


class Scheduler:
    """Requests in (`submit`), deltas out (`step`); at most `max_running` sequences decode at once."""

    def __init__(self, decoder: SlotDecoder, decode_text: Callable[[Sequence[int]], str], eos_token_id: int,
                 max_running: Optional[int] = None) -> None:
        self.decoder = decoder
        self.decode_text = decode_text
        self.eos_token_id = eos_token_id
        self.max_running = min(max_running or decoder.num_slots, decoder.num_slots)
        self._waiting: Deque[Tuple[Hashable, Any]] = deque()
        self._running: Dict[Hashable, _Sequence] = {}

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def submit(self, key: Hashable, job: Any) -> None:
        """Queue a GenerationJob (engine.py: prompt ids + SamplingParams) under a unique key."""
        if key in self._running or any(k == key for k, _ in self._waiting):
            raise ValueError(f"request key {key!r} is already in use")
        self._waiting.append((key, job))

    def cancel(self, key: Hashable) -> None:
        """Forget a request (no-op if it already finished): its slot is free for the next step."""
        sequence = self._running.pop(key, None)
        if sequence is not None:
            self.decoder.release(sequence.slot)
            return
        self._waiting = deque((k, job) for k, job in self._waiting if k != key)

    def step(self) -> List[Event]:
        """Admit waiting requests into free slots, then one decoding step for the others."""
        ongoing = sorted(self._running.values(), key=lambda s: s.slot)  # consecutive slots decode cheapest
        events = self._admit()
        if ongoing:
            events += self._decode(ongoing)
        return events

    def run(self, jobs: Sequence[Any]) -> List[Tuple[str, Optional[str], int]]:
        """Decode jobs to the end: (text, finish_reason, completion_tokens) each, in order."""
        keys = [("run", i) for i in range(len(jobs))]
        for key, job in zip(keys, jobs):
            self.submit(key, job)
        texts: Dict[Hashable, List[str]] = {key: [] for key in keys}
        finals: Dict[Hashable, Delta] = {}
        while self.busy:
            for key, item in self.step():
                if isinstance(item, Exception):
                    raise item
                texts[key].append(item.text)
                if item.finish_reason is not None:
                    finals[key] = item
        return [("".join(texts[k]), finals[k].finish_reason, finals[k].completion_tokens) for k in keys]

    # ---- one step ----------------------------------------------------------------------------

    def _admit(self) -> List[Event]:
        events: List[Event] = []
        while self._waiting and self.decoder.free_slots and len(self._running) < self.max_running:
            key, job = self._waiting.popleft()
            try:
                slot, token = self.decoder.prefill(job.prompt_ids, sampling_of(job.params))
            except Exception as exc:  # this request's failure only (validation should have caught it)
                events.append((key, exc))
                continue
            sequence = _Sequence(key, slot, self._text_stream(job))
            self._running[key] = sequence
            events.append((key, self._push(sequence, token)))
        return events

    def _decode(self, sequences: List[_Sequence]) -> List[Event]:
        try:
            tokens = self.decoder.decode([s.slot for s in sequences])
        except Exception as exc:  # the batch's forward failed: every sequence in it ends with the error
            for sequence in sequences:
                self.cancel(sequence.key)
            return [(s.key, exc) for s in sequences]
        return [(s.key, self._push(s, token)) for s, token in zip(sequences, tokens)]

    def _push(self, sequence: _Sequence, token: int) -> Delta:
        delta = sequence.text.push(token)
        if delta.finish_reason is not None:
            self.cancel(sequence.key)  # the slot is free for the next step
        return delta

    def _text_stream(self, job: Any) -> TextStream:
        params = job.params
        return TextStream(decode=self.decode_text, stop=params.stop, max_tokens=params.max_tokens,
                          eos_token_id=self.eos_token_id)  # fmt: skip


def sampling_of(params: Any) -> Sampling:
    """protocol.SamplingParams -> moe's per-row Sampling."""
    return Sampling(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed)
