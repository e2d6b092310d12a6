"""Batch generation on the session's Ray: a replica pool over real files, and a killed job rerun."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import ray
import pyarrow.parquet as pq
import pytest
from testkit.processes import environment_without_ray, run_job, start_job

from moe_platform.data import DataConfig, DataError
from moe_platform.data.prepare import prepare_dataset
from moe_platform.generate.batch import run_generation
from moe_platform.generate.config import GenerateConfig
from moe_platform.serve.engine import GenerationJob
from moe_platform.serve.protocol import SamplingParams

WORDS = ["hello", "world", "fox", "Ray", "expert", "the", "café", "main", "def", "token"]


def prompts(count: int, start: int = 0) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(1 + i % 5)) for i in range(start, start + count)]


def write_input(root: Path, jsonl_rows: int = 200, parquet_rows: int = 60) -> dict[str, str]:
    """.jsonl prompts and .parquet ones (200 and 60 by default): {row id: prompt}."""
    root.mkdir()
    jsonl = prompts(jsonl_rows)
    (root / "a.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in jsonl))
    parquet = prompts(parquet_rows, start=jsonl_rows)
    pq.write_table(pa.table({"prompt": parquet}), root / "b.parquet", row_group_size=16)
    return {**{f"a.jsonl:{i + 1}": p for i, p in enumerate(jsonl)},
            **{f"b.parquet#{i}": p for i, p in enumerate(parquet)}}


def read_output(output: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(part) for part in sorted(output.glob("part-*.parquet"))])


@pytest.fixture(scope="module")
def generated(ray_cluster, tiny_export, tmp_path_factory):
    """One run of a 2-replica pool over 260 prompts in two files: (settings, summary, {row id: prompt})."""
    root = tmp_path_factory.mktemp("generated")
    expected_prompts = write_input(root / "in")
    settings = GenerateConfig(export_dir=tiny_export, input=str(root / "in"), output=str(root / "out"),
                              max_tokens=4, replicas=2, num_cpus_per_replica=0.5, num_slots=8, rows_per_part=40)
    # Ray Data hands chunks to the first actor that is up; a tiny job can end before the second
    # one has loaded the model. Here both must be up first, so that both take part.
    context = ray.data.DataContext.get_current()
    previous, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 120
    try:
        return settings, run_generation(settings), expected_prompts
    finally:
        context.wait_for_min_actors_s = previous


def test_two_replicas_over_hundreds_of_prompts_equal_each_prompt_generated_alone(generated, engine):
    settings, summary, expected_prompts = generated
    assert (summary.parts, summary.parts_done_before, summary.rows, summary.records, summary.errors) == (7, 0, 260,
                                                                                                         260, 0)
    assert len(summary.replicas_used) == 2
    table = read_output(Path(settings.output))
    assert dict(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist())) == expected_prompts
    alone = engine.scheduler(num_slots=1)
    for row in table.to_pylist():
        job = GenerationJob(tuple(engine.encode(row["prompt"])), SamplingParams(max_tokens=4, temperature=0.0))
        assert (row["generated_text"], row["finish_reason"], row["num_generated_tokens"]) == alone.run([job])[0]
    assert summary.generated_tokens == sum(table.column("num_generated_tokens").to_pylist()) > 0


def test_a_rerun_finds_every_part_complete_and_other_settings_are_refused(generated):
    settings, _, _ = generated
    again = run_generation(settings)
    assert (again.parts_done_before, again.records) == (7, 0)
    # Other sampling settings into the same directory would mix two generations: refused.
    with pytest.raises(DataError, match=r"generate.output=.* different generation \(settings: max_tokens changed\)"):
        run_generation(GenerateConfig(**{**settings.to_dict(), "max_tokens": 5}))


def test_the_output_is_instruction_data_for_prepare(generated, tiny_export, tmp_path):
    """Sequence-level distillation: a teacher's generations are a student's finetuning set."""
    settings, _, _ = generated
    table = read_output(Path(settings.output))
    usable = sum(1 for text in table.column("generated_text").to_pylist() if text.strip())
    config = DataConfig(input=settings.output, kind="instruction", response_field="generated_text",
                        dataset_dir=str(tmp_path / "ds"), tokenizer=f"{tiny_export}/tokenizer.json", seq_len=32)
    manifest = prepare_dataset(config).manifest
    assert manifest.documents.used == usable > 0


def settled_part_count(output, quiet_s: float = 3.0, limit_s: float = 30.0) -> int:
    """The killed job's part files once none has appeared for `quiet_s`: killing the driver does not
    stop a Ray worker that is renaming its finished part into place that moment (CI saw one land
    just after the driver died, so the rerun found one part more than counted)."""
    count, unchanged_since, deadline = -1, time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        now = len(list(output.glob("part-*.parquet")))
        if now != count:
            count, unchanged_since = now, time.monotonic()
        elif time.monotonic() - unchanged_since >= quiet_s:
            return count
        time.sleep(0.2)
    raise AssertionError(f"the killed job's Ray workers kept writing parts for {limit_s:.0f} s")


@pytest.mark.slow
def test_a_killed_job_rerun_completes_every_row_exactly_once(job_env, tiny_export, tmp_path):
    # 15 parts of 4 rows (a.jsonl: 10, b.parquet: 5): enough to stop part-way, few to regenerate.
    expected_prompts = write_input(tmp_path / "in", jsonl_rows=40, parquet_rows=20)
    output = tmp_path / "out"
    args = [f"generate.export_dir={tiny_export}", f"generate.input={tmp_path / 'in'}", f"generate.output={output}",
            "generate.max_tokens=24", "generate.rows_per_part=4", "generate.num_cpus_per_replica=0.5",
            "generate.num_slots=2"]
    job = start_job("generate", *args, env=job_env)
    deadline = time.monotonic() + 240
    while not list(output.glob("part-*.parquet")):
        assert job.process.poll() is None, job.output(40)
        assert time.monotonic() < deadline, job.output(40)
        time.sleep(0.2)
    job.kill()
    done = settled_part_count(output)
    assert 1 <= done < 15, "the job must be killed part-way"

    rerun = run_job("generate", *args, env=job_env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"15 parts ({done} already complete), 60 input rows" in rerun.stdout
    table = read_output(output)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(expected_prompts) and len(ids) == len(set(ids))  # every row once
    assert table.column("error").null_count == table.num_rows
    assert not list(output.glob("*.tmp"))


@pytest.mark.parametrize("case, message", [
    ("export", "generate.export_dir"),
    ("fields", "line 1 has no 'prompt' field (generate.prompt_field; its fields: question)"),
    ("context", "generate.max_tokens=64 does not fit the export's context of 64 tokens"),
    ("inside", "is inside generate.input"),
    ("no output", "generate.output is required"),
])
def test_unusable_settings_are_one_error_before_any_ray_work(tiny_export, tmp_path, case, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "q.jsonl").write_text('{"question": "q"}\n' if case == "fields" else '{"prompt": "q"}\n')
    settings = {"export_dir": tiny_export, "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                "max_tokens": 8}
    settings.update({"export": {"export_dir": str(tmp_path)}, "context": {"max_tokens": 64},
                     "inside": {"output": str(tmp_path / "in" / "out")}, "no output": {"output": None}}.get(case, {}))
    with pytest.raises(DataError) as error:
        run_generation(GenerateConfig(**settings), start_ray=lambda: pytest.fail("Ray was started"))
    assert message in str(error.value)


def test_the_job_prints_one_line_for_a_bad_input_or_config(tmp_path):
    env = environment_without_ray()
    for args, message in [(["generate.output=o"], "generate error: generate.input is required"),
                          (["generate.temperature=3"], "config error: generate.temperature must be in [0, 2]")]:
        result = run_job("generate", *args, env=env, cwd=tmp_path, timeout=120)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


def test_a_seeded_row_generates_what_the_http_server_answers(ray_cluster, tiny_export, engine):
    """The promise of the seed column, checked against the real server: same prompt, parameters, seed."""
    from ray import serve
    from testkit.serving import deploy_for_test, ensure_serve_port

    from moe_platform.generate.inputs import PromptRow
    from moe_platform.generate.replica import generate_rows

    sampling = {"temperature": 1.0, "top_p": 0.9, "top_k": 20, "max_tokens": 10}
    rows = [PromptRow(f"f:{i}", i, prompt, sampling={**sampling, "seed": 40 + i})
            for i, prompt in enumerate(["hello world", "The quick brown fox", "Ray"])]
    table = generate_rows(engine, engine.scheduler(num_slots=4), rows, GenerateConfig(export_dir=tiny_export))
    served = deploy_for_test(tiny_export, ensure_serve_port())
    try:
        client = served.client()
        for row, text in zip(rows, table.column("generated_text").to_pylist()):
            reply = client.complete(prompt=row.prompt, seed=row.sampling["seed"], **sampling)
            assert reply.status == 200, reply.body
            assert reply.body["choices"][0]["text"] == text
    finally:
        serve.delete(served.config.app_name)
    assert len(set(table.column("generated_text").to_pylist())) == 3
