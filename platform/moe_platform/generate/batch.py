"""Offline batch generation on Ray Data: prompt files in, Parquet parts out, resumable.

    summary = run_generation(GenerateConfig(export_dir=..., input="prompts.jsonl", output="out/"))

The driver plans deterministic chunks of the input (inputs.plan_chunks), leaves out those
whose part already exists (a part is written under a temporary name and renamed, so one that
exists is complete: a killed job rerun with the same settings does only the rest, and no row
twice), and streams the others through Ray Data to a fixed pool of `GenerateReplica` actors
(`map_batches` with `ActorPoolStrategy(size=replicas)`; each actor asks for
num_cpus/num_gpus_per_replica, so the pool spreads over a cluster). Each actor reads,
generates and writes whole chunks; the driver sees one summary row per chunk and logs the
progress (rows done / total, generated tokens/s).

`<output>/generate.json` records what the parts were made from (input files, the export's
files, sampling settings): a rerun with other settings into the same directory is refused rather
than mixing two generations in one output.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional

import pyarrow.fs as pafs

from moe import safe_json
from moe_platform.data import storage
from moe_platform.data.errors import DataError
from moe_platform.generate.config import GenerateConfig
from moe_platform.generate.inputs import Chunk, find_input_files, plan_chunks

log = logging.getLogger(__name__)

PLAN_FILE = "generate.json"
PROGRESS_EVERY_S = 10.0
# Settings that change what a part holds; the replica pool's shape (replicas, CPUs, slots) does not.
CONTENT_KEYS = ("export_dir", "prompt_field", "reference_field", "template", "max_tokens", "temperature",
                "top_p", "top_k", "seed", "stop", "quantize", "rows_per_part")


@dataclass
class GenerationSummary:
    output: str
    parts: int
    parts_done_before: int  # complete parts found from an earlier run (not generated again)
    rows: int  # input rows (lines or Parquet rows) of all parts
    records: int = 0  # rows written by this run (blank .jsonl lines write none)
    errors: int = 0  # rows of this run written with an `error` instead of a generation
    generated_tokens: int = 0
    seconds: float = 0.0
    first_errors: List[str] = field(default_factory=list)
    replicas_used: set = field(default_factory=set)  # the actors that generated this run's parts

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        lines = [f"output     {self.output}: {self.parts} parts ({self.parts_done_before} already complete), "
                 f"{self.rows:,} input rows",
                 f"this run   {self.records:,} rows, {self.generated_tokens:,} tokens in {self.seconds:.1f} s "
                 f"({self.tokens_per_s:.1f} tokens/s) on {len(self.replicas_used)} replica(s)"]
        if self.errors:
            lines.append(f"WARNING: {self.errors} row(s) not generated (see the `error` column), e.g. "
                         + "; ".join(self.first_errors))
        return "\n".join(lines)


def run_generation(settings: GenerateConfig, *, start_ray: Optional[Callable[[], None]] = None) -> GenerationSummary:
    """Generate every part not yet complete. DataError for unusable input, export or output, raised
    before `start_ray` (jobs pass jobs.common.init_ray; None: Ray is up already) is called."""
    settings = _resolved(settings)
    _check_export(settings)
    chunks = plan_chunks(find_input_files(settings.input), settings.prompt_field, settings.rows_per_part)
    output = settings.output
    _claim_output(output, _plan_record(settings, chunks))
    done = _complete_parts(output)
    todo = [chunk for chunk in chunks if chunk.part not in done]
    summary = GenerationSummary(output=output, parts=len(chunks), parts_done_before=len(chunks) - len(todo),
                                rows=sum(c.num_rows for c in chunks))
    if todo:
        if start_ray is not None:
            start_ray()
        _generate(settings, todo, summary, rows_before=sum(c.num_rows for c in chunks if c.part in done))
    return summary


def _resolved(settings: GenerateConfig) -> GenerateConfig:
    """Absolute locations: replicas on other nodes (or in other directories) read the same files."""
    for key in ("input", "output"):
        if not getattr(settings, key):
            raise DataError(f"generate.{key} is required (generate.{key}=<path>)")
    input, output = storage.absolute(settings.input), storage.absolute(settings.output)
    if (output.rstrip("/") + "/").startswith(input.rstrip("/") + "/"):
        # A rerun would read the parts as prompts.
        raise DataError(f"generate.output={output} is inside generate.input={input}: choose a directory outside it")
    return replace(settings, export_dir=storage.absolute(settings.export_dir), input=input, output=output)


def _check_export(settings: GenerateConfig) -> None:
    """The replicas' failures, found on the driver first: an unusable export or chat template."""
    from moe import load_export_config
    from moe_platform.serve.chat import ChatTemplateError, load_chat_template
    from moe_platform.serve.engine import ExportError, check_export

    try:
        check_export(settings.export_dir)
        if settings.template == "auto":
            load_chat_template(settings.export_dir)
    except (ExportError, ChatTemplateError, ValueError) as exc:
        raise DataError(str(exc).replace("serve.export_dir", "generate.export_dir")) from None
    context = load_export_config(settings.export_dir).seq_len
    if settings.max_tokens >= context:  # every row would be refused: say it once
        raise DataError(f"generate.max_tokens={settings.max_tokens} does not fit the export's context of {context} "
                        f"tokens (a prompt takes at least one): at most {context - 1}")


def _plan_record(settings: GenerateConfig, chunks: List[Chunk]) -> Dict[str, Any]:
    files = sorted({(c.identity, c.location) for c in chunks})
    sizes = {location: storage.file_info(location) for _, location in files}
    return {
        "settings": {key: getattr(settings, key) for key in CONTENT_KEYS},
        "input": settings.input,
        "files": [{"identity": identity, "size": sizes[location].size, "mtime_ns": sizes[location].mtime_ns}
                  for identity, location in files],
        "parts": len(chunks),
        "export_files": _export_files(settings.export_dir),  # an export rewritten in place is another model
    }


def _export_files(export_dir: str) -> Dict[str, List[int]]:
    from moe.export import export_files

    stats = {name: os.stat(os.path.join(export_dir, name)) for name in export_files(export_dir)}
    return {name: [stat.st_size, stat.st_mtime_ns] for name, stat in stats.items()}


def _claim_output(output: str, plan: Dict[str, Any]) -> None:
    """Record the plan in the output directory, or refuse one that holds another generation."""
    location = storage.join(output, PLAN_FILE)
    info = storage.file_info(location)
    if info.type == pafs.FileType.File:
        previous = safe_json.loads(storage.read_bytes(location))
        if previous != plan:
            changed = sorted(key for key in set(plan) | set(previous) if plan.get(key) != previous.get(key))
            detail = sorted(k for k in plan["settings"] if plan["settings"][k] != previous.get("settings", {}).get(k))
            raise DataError(f"generate.output={output} holds the parts of a different generation ({', '.join(changed)}"
                            f"{': ' + ', '.join(detail) if detail else ''} changed); use a new directory "
                            "or delete that one")
        return
    storage.make_dirs(output)
    storage.write_bytes_atomically(location, json.dumps(plan, indent=2).encode("utf-8"))


def _complete_parts(output: str) -> set:
    """Names of the parts present (a part is renamed into place only when complete)."""
    fs, path = storage.filesystem(output)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return {info.base_name for info in infos if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")}


def _generate(settings: GenerateConfig, todo: List[Chunk], summary: GenerationSummary, rows_before: int) -> None:
    import ray

    from moe_platform.generate.replica import GenerateReplica

    replicas = min(settings.replicas, len(todo))
    dataset = ray.data.from_items([chunk.to_dict() for chunk in todo], override_num_blocks=len(todo))
    dataset = dataset.map_batches(
        GenerateReplica,
        fn_constructor_kwargs={"settings": settings.to_dict(), "output": settings.output},
        batch_size=1,  # one chunk per call: the unit of progress and of retry
        batch_format="pyarrow",
        # A fixed pool; one chunk at a time per actor, so a replica that comes up late (or runs
        # slower) still gets its share instead of finding the first one's queue already full.
        compute=ray.data.ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=1),
        num_cpus=settings.num_cpus_per_replica,
        num_gpus=settings.num_gpus_per_replica or None,
    )
    log.info("generate: %d of %d parts to do (%d rows) on %d replica(s)", len(todo), summary.parts,
             sum(c.num_rows for c in todo), replicas)
    _warn_if_short(replicas, settings, ray.cluster_resources())
    started = last_log = time.perf_counter()
    dataset.context.enable_progress_bars = False  # the driver logs its own progress line
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for part in batch.to_pylist():
            summary.replicas_used.add(part["replica"])
            summary.records += part["records"]
            summary.errors += part["errors"]
            summary.generated_tokens += part["generated_tokens"]
            rows_before += part["rows"]
            if part["first_error"] and len(summary.first_errors) < 3:
                summary.first_errors.append(part["first_error"])
        summary.seconds = time.perf_counter() - started
        if time.perf_counter() - last_log >= PROGRESS_EVERY_S or rows_before == summary.rows:
            last_log = time.perf_counter()
            log.info("generate: %d/%d rows (%.0f%%), %.1f tokens/s", rows_before, summary.rows,
                     100 * rows_before / max(summary.rows, 1), summary.tokens_per_s)


def _warn_if_short(replicas: int, settings: GenerateConfig, available: Dict[str, float]) -> None:
    """A pool larger than the cluster runs on the replicas that fit; say so (seen with Ray 2.60:
    3 one-CPU replicas on a 2-CPU Ray, 2 started and finished the job)."""
    cpus, gpus = replicas * settings.num_cpus_per_replica, replicas * settings.num_gpus_per_replica
    if cpus > available.get("CPU", 0) or gpus > available.get("GPU", 0):
        log.warning("generate: %d replica(s) need %g CPU and %g GPU; the cluster has %g and %g now, so only the "
                    "replicas that fit start (more as nodes join, e.g. on an autoscaling cluster)", replicas, cpus,
                    gpus, available.get("CPU", 0), available.get("GPU", 0))
