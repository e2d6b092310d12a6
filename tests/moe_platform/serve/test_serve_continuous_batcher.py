"""ContinuousBatcher: the asyncio side of continuous batching, on a real tiny model (no Ray)."""
from __future__ import annotations

import asyncio

import pytest

from moe_platform.serve.batcher import ContinuousBatcher
from moe_platform.serve.engine import Engine, GenerationJob
from moe_platform.serve.protocol import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_export) -> Engine:
    import torch

    torch.set_num_threads(1)
    return Engine.load(tiny_export)


def job(engine, prompt, max_tokens=8) -> GenerationJob:
    return GenerationJob(tuple(engine.encode(prompt)), SamplingParams(max_tokens=max_tokens, temperature=0.0))


async def collect(batcher, j):
    return "".join([delta.text async for delta in batcher.submit(j)])


def test_concurrent_submissions_share_steps_and_equal_the_plain_loop(engine):
    jobs = [job(engine, p, 4 + i) for i, p in enumerate(["hello", "Ray Serve", "a", "def main"])]
    expected = [text for text, _, _ in engine.scheduler(num_slots=1).run(jobs)]
    batcher = ContinuousBatcher(engine.scheduler(num_slots=3))

    async def main():
        return await asyncio.gather(*(collect(batcher, j) for j in jobs))

    assert asyncio.run(main()) == expected
    assert batcher.stats.largest == 3 and batcher.stats.jobs == 4 and batcher.running == 0


def test_a_consumer_that_goes_away_frees_its_slot_for_the_next_request(engine):
    long_job = job(engine, "hello", max_tokens=50)
    assert engine.scheduler(num_slots=1).run([long_job])[0][2] == 50  # alone, it holds the slot for 50 steps
    batcher = ContinuousBatcher(engine.scheduler(num_slots=1))

    async def main():
        stream = batcher.submit(long_job)
        await stream.__anext__()  # the client got its first token ...
        waiting = asyncio.ensure_future(collect(batcher, job(engine, "Ray", max_tokens=3)))
        await stream.aclose()  # ... then went away
        return await asyncio.wait_for(waiting, timeout=60)

    assert asyncio.run(main()) == engine.scheduler(num_slots=1).run([job(engine, "Ray", max_tokens=3)])[0][0]
    assert batcher.stats.batches < 50  # the waiting request did not wait for the long one to end
    assert batcher.running == 0 and batcher.queued == 0


def test_a_failing_step_fails_the_requests_in_flight_and_the_batcher_keeps_serving(engine):
    from moe_platform.serve.scheduler import Scheduler

    class FailsOnce(Scheduler):  # fault injection: the first step raises, as a bug would
        failed = False

        def step(self):
            if not self.failed:
                self.failed = True
                raise RuntimeError("injected step failure")
            return super().step()

    plain = engine.scheduler(num_slots=2)
    failures = []
    batcher = ContinuousBatcher(FailsOnce(plain.decoder, engine.decode, engine.eos_token_id), failures.append)

    async def main():
        with pytest.raises(RuntimeError, match="injected step failure"):
            await collect(batcher, job(engine, "hello"))
        return await collect(batcher, job(engine, "hello"))

    assert asyncio.run(main()) == engine.scheduler(num_slots=1).run([job(engine, "hello")])[0][0]
    assert failures[0] is True and failures[-1] is False  # what the health check counts
