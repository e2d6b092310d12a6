"""A generation replica: the serving engine's step API over one chunk of prompts at a time.

`GenerateReplica` is the actor class Ray Data's `map_batches` runs (one per replica, the model
loaded once). Each call gets chunk descriptions, and for each: reads the chunk's rows
(inputs.read_chunk), turns each into the server's GenerationJob - the same template, the same
request validation (serve.protocol), the same context check and the same seeding - runs them
all through `Scheduler.run` (continuous batching: a finished row's slot takes the next row at
once) and writes the chunk's part atomically. It returns one small summary row per chunk,
which is all the driver ever holds, so memory stays flat however large the input.

`generate_rows` is that path without Ray or files (tests call it directly).
"""
from __future__ import annotations

import io
import time
from dataclasses import replace
from typing import Any, Dict, List, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from moe_platform.data import storage
from moe_platform.generate.config import GenerateConfig
from moe_platform.generate.inputs import Chunk, PromptRow, read_chunk
from moe_platform.serve.protocol import APIError, RequestLimits, check_context, sampling_params

# The columns of every part: ray.data.llm's processor names (prompt -> generated_text, token
# counts, finish_reason), plus what makes a part useful downstream: the row id, the reference
# (task evaluation), the seed used (reproduction) and why a row was not generated (`error`;
# its generated_text is null, so prepare skips the row instead of training on it).
PART_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("generated_text", pa.string()),
    ("num_input_tokens", pa.int32()),
    ("num_generated_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("reference", pa.string()),
    ("seed", pa.int64()),
    ("error", pa.string()),
])


class PromptEncoder:
    """Prompt rows -> the server's GenerationJobs, validated as the server validates requests."""

    def __init__(self, engine: Any, settings: GenerateConfig) -> None:
        self.engine = engine
        self.settings = settings
        self.defaults = settings.sampling_defaults()
        self.limits = RequestLimits(default_max_tokens=settings.max_tokens,
                                    max_tokens_limit=engine.context_length - 1,
                                    max_prompts=1, vocab_size=engine.vocab_size)  # fmt: skip
        self.template = engine.chat_template if settings.template == "auto" else None

    def job(self, row: PromptRow) -> Any:
        """The row's GenerationJob, or APIError naming what the server would have refused."""
        from moe_platform.serve.engine import GenerationJob

        given = {name: value for name, value in row.sampling.items() if name != "seed"}
        params = sampling_params({**self.defaults, **given, "seed": row.sampling.get("seed")}, self.limits)
        if params.seed is None and self.settings.seed is not None:
            params = replace(params, seed=self.settings.seed + row.index)  # as prompt `index` of one request
        ids = self.encode(row.prompt or "")
        check_context(len(ids), params.max_tokens, self.engine.context_length, 0)
        return GenerationJob(tuple(ids), params)

    def encode(self, prompt: str) -> List[int]:
        """As /v1/chat/completions with one user message when the export has a chat template
        (and generate.template=auto), else as /v1/completions."""
        if self.template is None:
            return self.engine.encode(prompt)
        return self.engine.encode_messages([{"role": "user", "content": prompt}])


def generate_rows(engine: Any, scheduler: Any, rows: Sequence[PromptRow], settings: GenerateConfig) -> pa.Table:
    """A part's table: every row generated, or its `error` (a bad row never stops the others)."""
    import torch

    encoder = PromptEncoder(engine, settings)
    jobs: Dict[int, Any] = {}
    errors: Dict[int, str] = {}
    for i, row in enumerate(rows):
        if row.problem is not None:
            errors[i] = row.problem
            continue
        try:
            jobs[i] = encoder.job(row)
        except APIError as exc:
            errors[i] = exc.message  # the server's 400 message, naming the field
    with torch.inference_mode():
        results = dict(zip(jobs, scheduler.run(list(jobs.values())))) if jobs else {}
    columns: Dict[str, List[Any]] = {name: [] for name in PART_SCHEMA.names}
    for i, row in enumerate(rows):
        job, result = jobs.get(i), results.get(i)
        text, reason, generated = result if result is not None else (None, None, None)
        values = {"id": row.id, "prompt": row.prompt, "generated_text": text,
                  "num_input_tokens": len(job.prompt_ids) if job else None, "num_generated_tokens": generated,
                  "finish_reason": reason, "reference": row.reference,
                  "seed": job.params.seed if job else None, "error": errors.get(i)}  # fmt: skip
        for name, value in values.items():
            columns[name].append(value)
    return pa.table(columns, schema=PART_SCHEMA)


def write_part(table: pa.Table, location: str) -> None:
    """Write to a temporary name, then rename: a part that exists is complete."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes_atomically(location, buffer.getvalue())


class GenerateReplica:
    """The Ray Data actor: one model replica; `__call__` generates whole chunks."""

    def __init__(self, settings: Dict[str, Any], output: str) -> None:
        import ray
        import torch

        from moe_platform.serve.engine import Engine

        self.settings = GenerateConfig(**settings)
        self.output = output
        torch.set_num_threads(self.settings.torch_threads)
        self.engine = Engine.load(self.settings.export_dir, device=self.settings.device,
                                  quantize=self.settings.quantize)  # fmt: skip
        self.scheduler = self.engine.scheduler(num_slots=self.settings.num_slots)
        self.replica_id = ray.get_runtime_context().get_actor_id() or "driver"

    def __call__(self, batch: pa.Table) -> pa.Table:
        summaries = [self.run_chunk(Chunk(**description)) for description in batch.to_pylist()]
        return pa.Table.from_pylist(summaries)

    def run_chunk(self, chunk: Chunk) -> Dict[str, Any]:
        started = time.perf_counter()
        rows = read_chunk(chunk, self.settings.prompt_field, self.settings.reference_field)
        table = generate_rows(self.engine, self.scheduler, rows, self.settings)
        write_part(table, storage.join(self.output, chunk.part))
        errors = [f"{i}: {e}" for i, e in zip(table.column("id").to_pylist(), table.column("error").to_pylist()) if e]
        generated = sum(n for n in table.column("num_generated_tokens").to_pylist() if n)
        return {"part": chunk.part, "replica": self.replica_id, "rows": chunk.num_rows, "records": table.num_rows,
                "errors": len(errors), "first_error": errors[0] if errors else "", "generated_tokens": generated,
                "seconds": time.perf_counter() - started}
