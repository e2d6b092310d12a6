"""StepBatcher: a batch forms when the previous one ends, from everything queued by then."""
import asyncio

import pytest

from moe_platform.serve.batcher import FINISHED, StepBatcher


class Recorder:
    """A fake batch runner: job n yields n items over n steps, each step taking `step_s`."""

    def __init__(self, step_s: float = 0.01, fail_on=None):
        self.batches = []
        self.step_s = step_s
        self.fail_on = fail_on

    async def __call__(self, jobs):
        self.batches.append(list(jobs))
        for step in range(max(jobs)):
            await asyncio.sleep(self.step_s)
            if self.fail_on is not None and step == self.fail_on:
                raise RuntimeError("model failed")
            yield [f"{job}:{step}" if step < job else FINISHED for job in jobs]


async def collect(batcher, job):
    return [item async for item in batcher.submit(job)]


def test_each_job_gets_its_own_items_in_order():
    async def main():
        runner = Recorder()
        batcher = StepBatcher(runner, max_batch_size=8, wait_s=0.05)
        return await asyncio.gather(*(collect(batcher, n) for n in (1, 3, 2)))

    assert asyncio.run(main()) == [["1:0"], ["3:0", "3:1", "3:2"], ["2:0", "2:1"]]


def test_requests_arriving_during_a_batch_form_one_full_next_batch():
    async def main():
        runner = Recorder(step_s=0.05)
        batcher = StepBatcher(runner, max_batch_size=4, wait_s=0.0)
        first = asyncio.ensure_future(collect(batcher, 4))
        await asyncio.sleep(0.02)  # the first batch (of one) is running now
        later = []
        for _ in range(6):  # trickle in while it runs: one batch of 4, then one of 2
            later.append(asyncio.ensure_future(collect(batcher, 1)))
            await asyncio.sleep(0.01)
        await asyncio.gather(first, *later)
        return [len(b) for b in runner.batches], batcher.stats

    sizes, stats = asyncio.run(main())
    assert sizes == [1, 4, 2]
    assert (stats.batches, stats.largest, stats.jobs) == (3, 4, 7)


def test_a_failing_batch_fails_its_requests_and_the_next_batch_still_runs():
    async def main():
        runner = Recorder(fail_on=1)
        batcher = StepBatcher(runner, max_batch_size=4, wait_s=0.0)
        with pytest.raises(RuntimeError, match="model failed"):
            await collect(batcher, 3)
        runner.fail_on = None
        return await collect(batcher, 2)

    assert asyncio.run(main()) == ["2:0", "2:1"]
