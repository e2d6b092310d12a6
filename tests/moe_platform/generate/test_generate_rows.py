"""A replica's rows -> the server's jobs -> a part's table, in this process (no Ray)."""
from __future__ import annotations

import json
import shutil

from moe_platform.data.config import chat_template
from moe_platform.generate.config import GenerateConfig
from moe_platform.generate.inputs import PromptRow
from moe_platform.generate.replica import PART_SCHEMA, PromptEncoder, generate_rows
from moe_platform.serve.engine import Engine, GenerationJob
from moe_platform.serve.protocol import SamplingParams

PROMPTS = ["hello world", "The quick brown fox", "a", "Ray", "def main():"]


def rows(prompts=PROMPTS, **sampling) -> list[PromptRow]:
    return [PromptRow(id=f"f:{i}", index=i, prompt=p, sampling=dict(sampling)) for i, p in enumerate(prompts)]


def served_alone(engine, prompt, **params) -> tuple:
    """What /v1/completions answers for one prompt: its job decoded alone."""
    job = GenerationJob(tuple(engine.encode(prompt)), SamplingParams(**params))
    return engine.scheduler(num_slots=1).run([job])[0]


def test_greedy_rows_batched_equal_each_prompt_served_alone(engine):
    settings = GenerateConfig(export_dir="x", max_tokens=6, num_slots=2)
    table = generate_rows(engine, engine.scheduler(num_slots=2), rows(), settings)
    assert table.schema == PART_SCHEMA
    expected = [served_alone(engine, p, max_tokens=6, temperature=0.0) for p in PROMPTS]
    assert list(zip(table.column("generated_text").to_pylist(), table.column("finish_reason").to_pylist(),
                    table.column("num_generated_tokens").to_pylist())) == expected
    assert table.column("num_input_tokens").to_pylist() == [len(engine.encode(p)) for p in PROMPTS]
    assert table.column("error").null_count == len(PROMPTS)


def test_a_rows_seed_gives_the_servers_completion_and_the_config_seed_counts_rows_as_one_request(engine):
    settings = GenerateConfig(export_dir="x", max_tokens=8, temperature=1.0, top_p=0.9, seed=100)
    own = rows(seed=7)[:2] + rows()[2:]  # rows 0-1 carry their own seed; the others get 100 + position
    table = generate_rows(engine, engine.scheduler(num_slots=4), own, settings)
    assert table.column("seed").to_pylist() == [7, 7, 102, 103, 104]
    for i, prompt in enumerate(PROMPTS):
        seed = table.column("seed")[i].as_py()
        text = served_alone(engine, prompt, max_tokens=8, temperature=1.0, top_p=0.9, seed=seed)[0]
        assert table.column("generated_text")[i].as_py() == text


def test_a_row_the_server_would_refuse_gets_the_servers_message_and_the_others_still_generate(engine):
    bad = [PromptRow("f:0", 0, "hi", sampling={"temperature": 3.0}),
           PromptRow("f:1", 1, "hi", sampling={"top_k": "5"}),
           PromptRow("f:2", 2, "hi " * 80),  # longer than the 64-token context
           PromptRow("f:3", 3, None, problem="malformed JSON (x)"),
           PromptRow("f:4", 4, "hi", sampling={"max_tokens": 3})]
    table = generate_rows(engine, engine.scheduler(num_slots=2), bad, GenerateConfig(export_dir="x", max_tokens=8))
    errors = table.column("error").to_pylist()
    assert errors[0] == "temperature must be in [0, 2], got 3.0"
    assert errors[1] == "top_k must be an integer, got string"
    assert errors[2].startswith("This model's maximum context length is 64 tokens")
    assert errors[3] == "malformed JSON (x)"
    assert errors[4] is None and table.column("num_generated_tokens")[4].as_py() == 3
    assert table.column("generated_text").to_pylist()[:4] == [None] * 4


def test_the_exports_chat_template_renders_the_prompt_as_a_finetune_saw_it(tiny_export, tmp_path):
    export = shutil.copytree(tiny_export, tmp_path / "chat")
    config_file = export / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = chat_template("Q: {prompt}\nA: ")  # what prepare writes for a finetune
    config_file.write_text(json.dumps(config))
    engine = Engine.load(str(export))
    assert PromptEncoder(engine, GenerateConfig(export_dir="x")).encode("hi") == engine.encode("Q: hi\nA: ")
    assert PromptEncoder(engine, GenerateConfig(export_dir="x", template="none")).encode("hi") == engine.encode("hi")
