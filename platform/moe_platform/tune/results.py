"""A sweep's outcome: one row per trial, the results table (console, CSV, JSON) and the curves plot.

Rows come from Tune's `ResultGrid` (each trial's config, last report, error and
report history); nothing here needs Ray running, so the writers are plain
functions of `TrialRow`s.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

FINISHED, STOPPED_EARLY, ERROR, UNFINISHED = "finished", "stopped early", "error", "unfinished"


@dataclass
class TrialRow:
    trial_id: str
    status: str  # FINISHED, STOPPED_EARLY, ERROR or UNFINISHED
    params: dict[str, Any]  # {dotted key: value}
    run_dir: str  # the trial's run.output_dir (tensorboard/, checkpoints/, config.json)
    steps: int  # the last reported step
    total_steps: int  # the trial's planned length
    best_metric: Optional[float]  # best tune.metric over its reports
    last_metric: Optional[float]  # tune.metric at its last report
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, tune.metric) per report
    error: Optional[str] = None

    @property
    def stopped_early(self) -> bool:
        return self.status == STOPPED_EARLY


def trial_row(
    *,
    trial_id: str,
    tune_status: str,
    params: dict[str, Any],
    last_result: dict[str, Any],
    history,
    error: Optional[BaseException],
    metric: str,
    mode: str,
    run_dir: str,
) -> TrialRow:
    """One Tune trial -> a TrialRow. tune_status: TERMINATED, ERROR, PENDING, RUNNING, PAUSED;
    history: its reports as a DataFrame (Tune's progress), or None."""
    curve = _curve(history, metric)
    steps, total = int(last_result.get("step", 0)), int(last_result.get("total_steps", 0))
    if error is not None or tune_status == "ERROR":
        status = ERROR
    elif tune_status != "TERMINATED":
        status = UNFINISHED  # the sweep was interrupted; resuming it runs the trial on
    elif total and steps >= total:
        status = FINISHED
    else:
        status = STOPPED_EARLY  # terminated before its last step: the scheduler (ASHA) stopped it
    values = [value for _, value in curve]
    best = (min(values) if mode == "min" else max(values)) if values else None
    return TrialRow(
        trial_id=trial_id,
        status=status,
        params=params,
        run_dir=run_dir,
        steps=steps,
        total_steps=total,
        best_metric=best,
        last_metric=values[-1] if values else None,
        curve=curve,
        error=_last_line(error) if error is not None else None,
    )


def _curve(dataframe, metric: str) -> list[tuple[int, float]]:
    if dataframe is None or metric not in dataframe or "step" not in dataframe:
        return []
    points = dataframe[["step", metric]].dropna()
    return [(int(step), float(value)) for step, value in zip(points["step"], points[metric]) if math.isfinite(value)]


def ranked(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Best first by the last reported metric (what the trial's newest checkpoint scores); errors and
    trials without a metric last. The writers keep this order."""
    def key(row: TrialRow):
        usable = row.status != ERROR and row.last_metric is not None
        value = row.last_metric if usable else 0.0
        return (not usable, value if mode == "min" else -value, row.trial_id)

    return sorted(rows, key=key)


def best_row(rows: list[TrialRow], mode: str) -> Optional[TrialRow]:
    """The trial whose last reported metric is best, or None when no trial reported it."""
    first = ranked(rows, mode)[:1]
    return first[0] if first and first[0].status != ERROR and first[0].last_metric is not None else None


# ---- writers -----------------------------------------------------------------------------------


def table(rows: list[TrialRow], metric: str, best_id: Optional[str]) -> str:
    """A fixed-width text table, one trial per line, in the order given (see `ranked`)."""
    keys = _param_keys(rows)
    header = ["trial", "status", *keys, f"best {metric}", f"last {metric}", "steps"]
    lines = [[
        ("* " if row.trial_id == best_id else "  ") + row.trial_id,
        row.status,
        *[_format(row.params.get(key)) for key in keys],
        _format(row.best_metric),
        _format(row.last_metric),
        f"{row.steps}/{row.total_steps}",
    ] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    render = lambda cells: "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([render(header), render(["-" * width for width in widths]), *map(render, lines)])


def write_csv(path: str, rows: list[TrialRow], metric: str) -> None:
    keys = _param_keys(rows)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial_id", "status", *keys, f"best_{metric}", f"last_{metric}", "steps", "total_steps",
                         "stopped_early", "run_dir", "error"])
        for row in rows:
            writer.writerow([row.trial_id, row.status, *[row.params.get(key) for key in keys], row.best_metric,
                             row.last_metric, row.steps, row.total_steps, row.stopped_early, row.run_dir,
                             row.error or ""])


def write_json(path: str, rows: list[TrialRow], *, metric: str, mode: str, best_id: Optional[str],
               complete: bool) -> None:
    trials = [{**asdict(row), "stopped_early": row.stopped_early} for row in rows]
    with open(path, "w") as fh:
        json.dump({"metric": metric, "mode": mode, "best_trial": best_id, "complete": complete, "trials": trials},
                  fh, indent=2, default=str)


def plot_curves(path: str, rows: list[TrialRow], *, metric: str, best_id: Optional[str]) -> None:
    """Every trial's metric against steps; dashed = stopped early, thick = best."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters and CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.5))
    for row in rows:
        if not row.curve:
            continue
        steps, values = zip(*row.curve)
        settings = ", ".join(f"{key.split('.')[-1]}={_format(value)}" for key, value in row.params.items())
        label = f"{row.trial_id}: {settings}"
        axes.plot(steps, values, marker="o", markersize=3, label=label,
                  linestyle="--" if row.stopped_early else "-", linewidth=2.5 if row.trial_id == best_id else 1.2)
    axes.set_xlabel("step")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} per trial (dashed: stopped early, thick: best)")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _param_keys(rows: list[TrialRow]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [key for key in row.params if key not in keys]
    return keys


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _last_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__
