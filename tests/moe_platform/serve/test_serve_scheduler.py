"""Continuous batching (scheduler.py) on a real tiny model, from a plain Python loop (no Ray)."""
from __future__ import annotations

import pytest
from testkit.serving import tiny_serve_model as tiny_model_config

from moe_platform.serve.engine import Engine, GenerationJob
from moe_platform.serve.protocol import SamplingParams
from moe_platform.serve.random_export import write_random_export

PROMPTS = ["hello world", "The quick brown fox jumps over", "a", "def main():\n    print(", "Ray", "东京"]




def job(engine, prompt, **params) -> GenerationJob:
    return GenerationJob(tuple(engine.encode(prompt)), SamplingParams(**{"max_tokens": 12, **params}))


def alone(engine, j):
    return engine.scheduler(num_slots=1).run([j])[0]


def test_more_requests_than_slots_all_finish_equal_to_each_served_alone(engine):
    jobs = [job(engine, p, temperature=0.0, max_tokens=3 + 2 * i) for i, p in enumerate(PROMPTS)]
    scheduler = engine.scheduler(num_slots=2)
    results = scheduler.run(jobs)
    assert results == [alone(engine, j) for j in jobs]
    assert [tokens for _, _, tokens in results] == [3 + 2 * i for i in range(len(PROMPTS))]
    assert scheduler.decoder.free_slots == 2 and not scheduler.busy  # every slot came back
    assert len({text for text, _, _ in results}) > 1


def test_a_request_joins_a_running_batch_at_the_next_step_and_a_finished_one_leaves_at_once(engine):
    scheduler = engine.scheduler(num_slots=2)
    scheduler.submit("long", job(engine, "hello world", temperature=0.0, max_tokens=10))
    scheduler.submit("short", job(engine, "a", temperature=0.0, max_tokens=2))
    scheduler.submit("late", job(engine, "Ray", temperature=0.0, max_tokens=3))
    steps = [sorted(key for key, _ in scheduler.step()) for _ in range(4)]
    # step 1 prefills two (no free slot for "late"); "short" ends at step 2, "late" joins at step 3.
    assert steps == [["long", "short"], ["long", "short"], ["late", "long"], ["late", "long"]]


def test_a_seeded_sample_is_the_same_alone_and_among_other_requests(engine):
    seeded = job(engine, "hello world", temperature=1.0, top_p=0.9, seed=7)
    neighbours = [job(engine, p, temperature=0.9, top_k=5) for p in PROMPTS] + [job(engine, "x", temperature=0.0)]
    batched = engine.scheduler(num_slots=4).run(neighbours[:2] + [seeded] + neighbours[2:])
    assert batched[2] == alone(engine, seeded)
    assert alone(engine, job(engine, "hello world", temperature=1.0, top_p=0.9, seed=8)) != batched[2]


def test_cancel_frees_the_slot_for_the_next_waiting_request(engine):
    scheduler = engine.scheduler(num_slots=1)
    scheduler.submit(1, job(engine, "hello", temperature=0.0, max_tokens=20))
    scheduler.submit(2, job(engine, "Ray", temperature=0.0, max_tokens=2))
    assert [key for key, _ in scheduler.step()] == [1]
    scheduler.cancel(1)  # the client went away
    assert [key for key, _ in scheduler.step()] == [2]
    scheduler.cancel(3)  # unknown or finished: nothing happens
    with pytest.raises(ValueError, match="already in use"):
        scheduler.submit(2, job(engine, "x"))


def test_a_tiny_temperature_is_served_like_greedy(engine):
    assert alone(engine, job(engine, "hello", temperature=1e-40))[0] == alone(engine, job(engine, "hello", temperature=0.0))[0]


def test_expert_choice_models_run_one_sequence_at_a_time(tmp_path):
    export = write_random_export(str(tmp_path / "ec"), tiny_model_config(router="expert_choice"), seed=1)
    engine = Engine.load(export)
    scheduler = engine.scheduler(num_slots=4)
    assert scheduler.max_running == 1
    jobs = [job(engine, p, temperature=0.0, max_tokens=4) for p in PROMPTS[:3]]
    assert scheduler.run(jobs) == [engine.scheduler(num_slots=1).run([j])[0] for j in jobs]


def test_the_scheduler_key_is_validated_by_name():
    from moe_platform.serve.config import ServeConfig

    assert ServeConfig(scheduler="static").scheduler == "static"
    with pytest.raises(ValueError, match="serve.scheduler='paged' must be one of continuous, static"):
        ServeConfig(scheduler="paged")
    with pytest.raises(ValueError, match="serve.max_queued_requests=0 must be >= 1"):
        ServeConfig(max_queued_requests=0)
