"""The replica's two batchers, both `submit(job)` -> an async iterator of the job's Deltas.

ContinuousBatcher (serve.scheduler=continuous): drives a scheduler.py Scheduler from the
event loop, one step at a time in a worker thread; requests join and leave between steps.

StepBatcher (serve.scheduler=static): a batch forms when the model is free and runs until
its longest job ends.

Why not `@serve.batch`: Ray Serve's batcher seals the *next* batch as soon as its
wait timeout passes, even while the current batch is still decoding (its
max_concurrent_batches semaphore is taken only when a sealed batch starts). A
generation batch runs for hundreds of milliseconds, so requests that arrive
during it are split into several small sealed batches that then run one after
another; with 16 closed-loop clients we measured batches of ~10 and ~6
alternating. Here requests wait in one queue, and the next batch takes up to
max_batch_size of them at the moment the previous batch ends (waiting up to
`wait_s` for more only when fewer are queued).

No Ray here: plain asyncio, one batch (or step) at a time, run on the replica's event loop.
"""
from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, Generic, Hashable, List, Optional, Tuple, TypeVar

import torch

Job = TypeVar("Job")
Item = TypeVar("Item")

# What a batch runner yields per step: one entry per job, or this marker once that job is done.
FINISHED = StopIteration
_END = object()


@dataclass
class _Pending(Generic[Job]):
    job: Job
    items: asyncio.Queue = field(default_factory=asyncio.Queue)


@dataclass
class BatchStats:
    batches: int = 0
    largest: int = 0
    jobs: int = 0

    def record(self, size: int) -> None:
        self.batches += 1
        self.jobs += size
        self.largest = max(self.largest, size)


class StepBatcher(Generic[Job, Item]):
    """`submit(job)` -> the job's items, as `run_batch(jobs)` yields them step by step."""

    def __init__(
        self,
        run_batch: Callable[[List[Job]], AsyncIterator[List[Any]]],
        max_batch_size: int,
        wait_s: float,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.stats = BatchStats()
        self._queue: Optional[asyncio.Queue] = None
        self._worker: Optional[asyncio.Task] = None
        self._running = 0  # jobs in the batch being decoded

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def running(self) -> int:
        return self._running

    async def submit(self, job: Job) -> AsyncIterator[Item]:
        pending: _Pending[Job] = _Pending(job)
        self._ensure_worker()
        assert self._queue is not None
        self._queue.put_nowait(pending)
        while (item := await pending.items.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _ensure_worker(self) -> None:
        # Created lazily: the queue and task belong to the event loop that serves requests.
        if self._worker is None or self._worker.done():
            self._queue = self._queue or asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            self.stats.record(len(batch))
            self._running = len(batch)
            await self._run(batch)
            self._running = 0

    async def _next_batch(self) -> List[_Pending[Job]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self, batch: List[_Pending[Job]]) -> None:
        done = [False] * len(batch)
        try:
            async for step in self._run_batch([p.job for p in batch]):
                for i, (pending, item) in enumerate(zip(batch, step)):
                    if item is FINISHED:
                        if not done[i]:
                            done[i] = True
                            pending.items.put_nowait(_END)
                    elif not done[i]:
                        pending.items.put_nowait(item)
        except Exception as exc:  # every waiting request fails with the batch's error
            for i, pending in enumerate(batch):
                if not done[i]:
                    done[i] = True
                    pending.items.put_nowait(exc)
        for i, pending in enumerate(batch):
            if not done[i]:
                pending.items.put_nowait(_END)


class ContinuousBatcher:
    """Steps a Scheduler while it has work; `submit` and client disconnects change its batch
    only between steps (the scheduler is not thread-safe, and a step runs in a worker thread)."""

    def __init__(self, scheduler: Any, on_step_error: Optional[Callable[[bool], None]] = None) -> None:
        self.scheduler = scheduler
        self.stats = BatchStats()
        self._on_step = on_step_error or (lambda failed: None)
        self._keys = itertools.count()
        self._outputs: Dict[Hashable, asyncio.Queue] = {}
        self._changes: List[Tuple[str, Hashable, Any]] = []  # ("submit", key, job) | ("cancel", key, None)
        self._wake: Optional[asyncio.Event] = None
        self._worker: Optional[asyncio.Task] = None

    @property
    def queued(self) -> int:
        return self.scheduler.num_waiting + sum(1 for op, _, _ in self._changes if op == "submit")

    @property
    def running(self) -> int:
        return self.scheduler.num_running

    async def submit(self, job: Any) -> AsyncIterator[Any]:
        key = next(self._keys)
        output: asyncio.Queue = asyncio.Queue()
        self._outputs[key] = output
        self._change("submit", key, job)
        self.stats.jobs += 1
        try:
            while True:
                item = await output.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:  # finished, failed, or the client went away (cancelled): free the slot at once
            if self._outputs.pop(key, None) is not None:
                self._change("cancel", key, None)

    def _change(self, op: str, key: Hashable, job: Any) -> None:
        self._changes.append((op, key, job))
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._work())
        assert self._wake is not None
        self._wake.set()

    async def _work(self) -> None:
        assert self._wake is not None
        while True:
            try:
                self._apply_changes()
                if not self.scheduler.busy:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                events = await asyncio.to_thread(_step, self.scheduler)
            except Exception as exc:  # a bug, not a request's failure: fail what is in flight, keep serving
                events = [(key, exc) for key in list(self._outputs)]
                self._changes = []  # submissions not applied yet are failed here too
                for key in list(self._outputs):
                    self.scheduler.cancel(key)
            self._on_step(any(isinstance(item, Exception) for _, item in events))
            self.stats.batches += 1  # a step here; submit() counts the jobs
            self.stats.largest = max(self.stats.largest, len(events))
            for key, item in events:
                output = self._outputs.get(key)
                if output is None:
                    continue
                output.put_nowait(item)
                if isinstance(item, Exception) or item.finish_reason is not None:
                    del self._outputs[key]  # ended by the scheduler: nothing to cancel

    def _apply_changes(self) -> None:
        changes, self._changes = self._changes, []
        for op, key, job in changes:
            if op == "submit":
                self.scheduler.submit(key, job)
            else:
                self.scheduler.cancel(key)


def _step(scheduler: Any) -> List[Tuple[Hashable, Any]]:
    """One scheduler step in a worker thread; inference_mode is per thread, so it is entered here."""
    with torch.inference_mode():
        return scheduler.step()

