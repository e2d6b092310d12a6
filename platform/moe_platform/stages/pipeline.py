"""Run a pipeline: stages in order, each starting from the previous stage's export.

    outcomes = run_pipeline(pipeline, run_stage)      # run_stage(spec, context) -> export dir

Stage i writes <pipeline.output_dir>/<name>/ (its run directory). When a stage
finishes, `stage_done.json` (with its export) is written there last; a pipeline run
again skips finished stages and re-enters the stage it was in, which resumes from
its newest checkpoint (same run directory, same config). How a stage runs (which
job, which config) is the caller's business: jobs/pipeline.py composes each stage's
config from Hydra; this module knows only order, directories and markers.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

from moe_platform.stages.config import PipelineConfig, StageSpec

log = logging.getLogger(__name__)

DONE_FILE = "stage_done.json"


@dataclass
class StageContext:
    index: int
    stage_dir: str  # this stage's run directory
    previous_export: Optional[str]  # the export the stage starts from (None for the first)


@dataclass
class StageOutcome:
    name: str
    job: str
    stage_dir: str
    export_dir: str
    skipped: bool  # finished in an earlier run of the pipeline
    seconds: float


def stage_dir(pipeline: PipelineConfig, spec: StageSpec) -> str:
    return os.path.join(os.path.abspath(pipeline.output_dir), spec.name)


def finished_export(directory: str) -> Optional[str]:
    """The export a finished stage left (None while the stage has not finished)."""
    marker = os.path.join(directory, DONE_FILE)
    if not os.path.isfile(marker):
        return None
    with open(marker) as fh:
        export_dir = json.load(fh)["export_dir"]
    from moe.export import is_export

    return export_dir if is_export(export_dir) else None


def mark_finished(directory: str, spec: StageSpec, export_dir: str) -> None:
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, DONE_FILE + ".tmp")
    with open(temporary, "w") as fh:
        json.dump({"stage": spec.name, "job": spec.job, "export_dir": export_dir, "finished_at": time.time()}, fh,
                  indent=2)
    os.replace(temporary, os.path.join(directory, DONE_FILE))


def run_pipeline(pipeline: PipelineConfig, run_stage: Callable[[StageSpec, StageContext], str]) -> list[StageOutcome]:
    if not pipeline.stages:
        raise ValueError("the pipeline has no stages: choose one with pipeline=<name> "
                         "(a file in jobs/conf/pipeline/) or set pipeline.stages")
    outcomes, previous = [], None
    for index, spec in enumerate(pipeline.stages):
        directory = stage_dir(pipeline, spec)
        started = time.perf_counter()
        export_dir = finished_export(directory)
        skipped = export_dir is not None
        if skipped:
            log.info("stage %d/%d %s: finished earlier (%s)", index + 1, len(pipeline.stages), spec.name, export_dir)
        else:
            log.info("stage %d/%d %s (%s) -> %s", index + 1, len(pipeline.stages), spec.name, spec.job, directory)
            export_dir = run_stage(spec, StageContext(index=index, stage_dir=directory, previous_export=previous))
            mark_finished(directory, spec, export_dir)
        outcomes.append(StageOutcome(name=spec.name, job=spec.job, stage_dir=directory, export_dir=export_dir,
                                     skipped=skipped, seconds=time.perf_counter() - started))
        previous = export_dir
    return outcomes


def format_outcomes(outcomes: list[StageOutcome]) -> str:
    lines = [f"{'stage':<14} {'job':<9} {'time':>8}  export"]
    for outcome in outcomes:
        took = "earlier" if outcome.skipped else f"{outcome.seconds / 60:.1f} min"
        lines.append(f"{outcome.name:<14} {outcome.job:<9} {took:>8}  {outcome.export_dir}")
    return "\n".join(lines)
