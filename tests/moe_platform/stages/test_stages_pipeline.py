"""The pipeline runner: order, previous exports, done markers, resuming at the unfinished stage."""
from __future__ import annotations

import os

import pytest

from moe_platform.stages.config import PipelineConfig, PruneConfig, StageSpec
from moe_platform.stages.pipeline import DONE_FILE, format_outcomes, run_pipeline


def fake_export(directory: str) -> str:
    export = os.path.join(directory, "export")
    os.makedirs(export, exist_ok=True)
    open(os.path.join(export, "model.safetensors"), "w").close()
    open(os.path.join(export, "config.json"), "w").close()  # what moe.export.is_export looks for
    return export


def pipeline(tmp_path) -> PipelineConfig:
    return PipelineConfig(name="t", output_dir=str(tmp_path / "p"), stages=[
        StageSpec(name="pretrain", job="pretrain"), StageSpec(name="finetune", job="finetune"),
        StageSpec(name="pruned", job="prune", overrides=["prune.keep=2"]),
    ])


def test_stages_run_in_order_each_from_the_previous_export(tmp_path):
    calls = []

    def run_stage(spec, context):
        calls.append((spec.name, context.previous_export))
        return fake_export(context.stage_dir)

    outcomes = run_pipeline(pipeline(tmp_path), run_stage)
    root = str(tmp_path / "p")
    assert calls == [("pretrain", None), ("finetune", f"{root}/pretrain/export"),
                     ("pruned", f"{root}/finetune/export")]
    assert [o.export_dir for o in outcomes] == [f"{root}/{n}/export" for n in ("pretrain", "finetune", "pruned")]
    assert all(os.path.isfile(os.path.join(o.stage_dir, DONE_FILE)) for o in outcomes)
    assert "finetune" in format_outcomes(outcomes)


def test_a_stopped_pipeline_resumes_at_the_stage_it_was_in(tmp_path):
    calls = []

    def interrupted(spec, context):
        calls.append(spec.name)
        if spec.name == "finetune":
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the second stage
        return fake_export(context.stage_dir)

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(pipeline(tmp_path), interrupted)

    def resumed(spec, context):
        calls.append(spec.name)
        return fake_export(context.stage_dir)

    outcomes = run_pipeline(pipeline(tmp_path), resumed)
    assert calls == ["pretrain", "finetune", "finetune", "pruned"]
    assert [o.skipped for o in outcomes] == [True, False, False]


def test_configs_name_the_problem():
    with pytest.raises(ValueError, match="pipeline.stages.x.job"):
        StageSpec(name="x", job="dance")
    with pytest.raises(ValueError, match="unique"):
        PipelineConfig(stages=[StageSpec(name="a"), StageSpec(name="a")])
    with pytest.raises(ValueError, match="pipeline has no stages"):
        run_pipeline(PipelineConfig(), lambda spec, context: "")
    with pytest.raises(ValueError, match="exactly one of prune.keep"):
        PruneConfig().check_choice()
    with pytest.raises(ValueError, match="prune.min_share"):
        PruneConfig(min_share=1.5)
