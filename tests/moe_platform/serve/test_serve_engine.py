"""The replica's decoding engine on a real (tiny, random) moe model, without Ray."""
from __future__ import annotations

import pytest
from testkit.serving import tiny_serve_model

from moe_platform.serve.engine import Engine, ExportError, GenerationJob, check_export, next_step
from moe_platform.serve.protocol import SamplingParams
from moe_platform.serve.random_export import write_random_export

PROMPTS = ["hello world", "The quick brown fox jumps over", "a", "def main():\n    print("]




@pytest.fixture(scope="module")
def expert_choice_engine(tmp_path_factory) -> Engine:
    directory = str(tmp_path_factory.mktemp("ec") / "export")
    return Engine.load(write_random_export(directory, tiny_serve_model(router="expert_choice"), seed=1))


def run(engine: Engine, jobs):
    """Drive stream_batch to the end: (text, finish_reason, completion_tokens) per job."""
    texts, finals = [""] * len(jobs), [None] * len(jobs)
    steps = engine.stream_batch(jobs)
    while (step := next_step(steps)) is not None:
        for i, delta in enumerate(step):
            if delta is not None:
                texts[i] += delta.text
                if delta.finish_reason:
                    finals[i] = (delta.finish_reason, delta.completion_tokens)
    return [(t, *f) for t, f in zip(texts, finals)]


def job(engine, prompt, **params) -> GenerationJob:
    return GenerationJob(tuple(engine.encode(prompt)), SamplingParams(**{"max_tokens": 12, **params}))


def test_batched_greedy_equals_each_prompt_alone(engine):
    jobs = [job(engine, p, temperature=0.0, max_tokens=8 + i) for i, p in enumerate(PROMPTS)]
    alone = [run(engine, [j])[0] for j in jobs]
    assert run(engine, jobs) == alone
    assert len({text for text, _, _ in alone}) > 1  # the outputs differ: the test has teeth
    assert all(reason == "length" and tokens == 8 + i for i, (_, reason, tokens) in enumerate(alone))


def test_a_seeded_sample_is_the_same_alone_and_in_any_batch(engine):
    seeded = job(engine, "hello world", temperature=1.0, seed=7)
    alone = run(engine, [seeded])[0]
    neighbours = [job(engine, p, temperature=0.9) for p in PROMPTS] + [job(engine, "x", temperature=0.0)]
    assert run(engine, neighbours[:2] + [seeded] + neighbours[2:])[2] == alone
    assert run(engine, [job(engine, "hello world", temperature=1.0, seed=8)])[0] != alone


def test_jobs_that_fit_alone_but_not_together_are_decoded_in_separate_groups(engine):
    # 4 + 50 and 60 + 4 each fit a 64-token context; left-padded together they would need 110.
    long_prompt = GenerationJob(tuple(range(10, 70)), SamplingParams(max_tokens=4, temperature=0.0))
    long_output = job(engine, "hello", max_tokens=50, temperature=0.0)
    assert run(engine, [long_prompt, long_output]) == [run(engine, [long_prompt])[0], run(engine, [long_output])[0]]


def test_mixed_sampling_parameters_share_one_serve_batch(engine):
    jobs = [job(engine, "hello", temperature=0.0), job(engine, "hello", temperature=0.7, top_p=0.9, top_k=5)]
    results = run(engine, jobs)
    assert results[0] == run(engine, [jobs[0]])[0]
    assert all(reason == "length" for _, reason, _ in results)


def test_expert_choice_models_decode_each_request_alone_and_say_so(expert_choice_engine):
    engine = expert_choice_engine
    assert not engine.is_causal and "not causal" in engine.metadata()["warning"]
    jobs = [job(engine, p, temperature=0.0) for p in PROMPTS]
    with pytest.warns(UserWarning, match="expert_choice"):
        batched = run(engine, jobs)
    assert batched == [run(engine, [j])[0] for j in jobs]


def test_empty_prompt_starts_from_the_document_boundary(engine):
    assert engine.encode("") == [engine.eos_token_id]
    assert engine.encode([5, 6]) == [5, 6]
    # Special-token strings typed in a prompt are text, as in training data.
    assert engine.eos_token_id not in engine.encode("a<|endoftext|>b")


def test_a_directory_that_is_not_an_export_is_refused_by_name(tmp_path, tiny_export):
    with pytest.raises(ExportError, match="is not a directory"):
        check_export(str(tmp_path / "nope"))
    with pytest.raises(ExportError, match="config.json is missing"):
        check_export(str(tmp_path))
    check_export(tiny_export)
