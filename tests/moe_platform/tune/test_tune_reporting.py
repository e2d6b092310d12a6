"""HPARAMS event files read back with TensorBoard's reader, and the results table/CSV/JSON/plot. No Ray."""
from __future__ import annotations

import csv
import json

import pandas as pd
import pytest
from testkit.training import event_accumulator

from moe_platform.tune import ParamSpec
from moe_platform.tune import hparams, results


def test_hparams_sessions_round_trip_through_tensorboard(tmp_path):
    from tensorboard.plugins.hparams import metadata

    space = [ParamSpec(key="trainer.lr", kind="loguniform", low=1e-4, high=1e-2),
             ParamSpec(key="model.moe.top_k", kind="choice", values=[1, 2]),
             ParamSpec(key="model.moe.backend", kind="choice", values=["native", "deepspeed"]),
             ParamSpec(key="model.tie_embeddings", kind="grid", values=[True, False])]
    hparams.write_experiment(str(tmp_path), space, "val/loss")
    run = tmp_path / "t1" / "tensorboard"
    values = {"trainer.lr": 0.003, "model.moe.top_k": 2, "model.moe.backend": "native", "model.tie_embeddings": False}
    hparams.write_session_start(str(run), values, group_name="g")
    hparams.write_session_end(str(run), hparams.STATUS_SUCCESS, scalars={"tune/best_metric": 2.5}, step=12)

    assert hparams.read_sessions(str(tmp_path)) == {"t1/tensorboard": values}
    root = event_accumulator(str(tmp_path))
    experiment = metadata.parse_experiment_plugin_data(root.PluginTagToContent("hparams")[metadata.EXPERIMENT_TAG])
    infos = {info.name: info for info in experiment.hparam_infos}
    assert set(infos) == set(values)
    assert infos["trainer.lr"].domain_interval.min_value == pytest.approx(1e-4)
    assert [v.number_value for v in infos["model.moe.top_k"].domain_discrete.values] == [1, 2]
    assert [v.bool_value for v in infos["model.tie_embeddings"].domain_discrete.values] == [True, False]
    assert [m.name.tag for m in experiment.metric_infos][:2] == ["val/loss", "train/loss"]
    trial = event_accumulator(str(run))
    content = trial.PluginTagToContent("hparams")[metadata.SESSION_END_INFO_TAG]
    end = metadata.parse_session_end_info_plugin_data(content)
    assert end.status == 1  # STATUS_SUCCESS
    assert trial.Scalars("tune/best_metric")[0].value == pytest.approx(2.5)


def _row(trial_id, status, last, **params):
    history = pd.DataFrame({"step": [4, 8, 12][: len(last)], "val/loss": last})
    return results.trial_row(trial_id=trial_id, tune_status=status, params=params,
                             last_result={"step": 4 * len(last), "total_steps": 12}, history=history,
                             error=None, metric="val/loss", mode="min", run_dir=f"/runs/{trial_id}")


def test_trial_statuses():
    assert _row("a", "TERMINATED", [4.0, 3.0, 2.5]).status == results.FINISHED
    stopped = _row("b", "TERMINATED", [4.1])
    assert stopped.status == results.STOPPED_EARLY and stopped.stopped_early and stopped.steps == 4
    assert _row("c", "RUNNING", [4.0]).status == results.UNFINISHED
    assert _row("d", "PENDING", []).last_metric is None
    errored = results.trial_row(trial_id="e", tune_status="ERROR", params={}, last_result={}, history=None,
                                error=RuntimeError("Traceback...\nValueError: boom"), metric="val/loss", mode="min",
                                run_dir="/runs/e")
    assert errored.status == results.ERROR and errored.error == "ValueError: boom"


def test_best_and_ranking():
    rows = [_row("a", "TERMINATED", [4.0, 3.5, 3.0], lr=0.001), _row("b", "TERMINATED", [4.0, 2.0, 2.5], lr=0.01),
            _row("c", "TERMINATED", [4.2], lr=1e-5)]
    assert rows[1].best_metric == 2.0 and rows[1].last_metric == 2.5
    ranked = results.ranked(rows, "min")
    assert [row.trial_id for row in ranked] == ["b", "a", "c"]
    assert results.best_row(rows, "min").trial_id == "b"
    assert results.best_row(rows, "max").trial_id == "c"
    assert results.best_row([_row("d", "PENDING", [])], "min") is None


def test_results_files_and_plot(tmp_path):
    rows = results.ranked([_row("a", "TERMINATED", [4.0, 3.0, 2.5], lr=0.01, top_k=2),
                           _row("b", "TERMINATED", [4.1], lr=1e-5, top_k=1)], "min")
    text = results.table(rows, "val/loss", best_id="a")
    lines = text.splitlines()
    assert lines[0].split() == ["trial", "status", "lr", "top_k", "best", "val/loss", "last", "val/loss", "steps"]
    assert lines[2].startswith("* a") and "finished" in lines[2] and "12/12" in lines[2]
    assert "stopped early" in lines[3] and "4/12" in lines[3]

    results.write_csv(str(tmp_path / "r.csv"), rows, "val/loss")
    with open(tmp_path / "r.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["trial_id"] for r in table] == ["a", "b"]
    assert table[1]["stopped_early"] == "True" and table[1]["lr"] == "1e-05" and table[0]["best_val/loss"] == "2.5"

    results.write_json(str(tmp_path / "r.json"), rows, metric="val/loss", mode="min", best_id="a", complete=True)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["best_trial"] == "a" and data["complete"] is True
    assert data["trials"][1]["stopped_early"] is True and data["trials"][0]["curve"][-1] == [12, 2.5]

    results.plot_curves(str(tmp_path / "curves.png"), rows, metric="val/loss", best_id="a")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
