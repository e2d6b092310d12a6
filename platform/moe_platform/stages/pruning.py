"""Expert pruning with calibration data: count routed tokens, drop the least-used experts, export.

    report = prune_export_with_calibration(export_dir, dataset_dir, PruneConfig(keep=6, ...))
    print(report.table())

Calibration rows stream through Ray Data from a prepared split; the counts are the
router's token-choice assignments (before any capacity), summed over the rows. The
report gives held-out loss against experts removed: the original, the pruned export,
and (prune.sweep) a range of other kept counts, all on the same held-out rows.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from moe_platform.stages.config import PruneConfig

log = logging.getLogger(__name__)

REPORT_FILE = "prune_report.json"


@dataclass
class PruneReport:
    export_dir: str  # the original
    output_dir: str  # the pruned export
    num_experts: int
    kept: int
    keep_ids: list[list[int]]  # per MoE layer, in layer order
    usage_share: list[list[float]]  # per MoE layer: each original expert's share of routed tokens
    # experts kept per layer -> held-out loss (the original count included)
    loss_by_kept: dict[int, float] = field(default_factory=dict)
    params_by_kept: dict[int, int] = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"{'experts kept':>12} {'removed':>8} {'params':>12} {'held-out loss':>14}"]
        for kept in sorted(self.loss_by_kept, reverse=True):
            mark = "  <- written" if kept == self.kept else ("  (original)" if kept == self.num_experts else "")
            lines.append(f"{kept:>12} {self.num_experts - kept:>8} {self.params_by_kept[kept]:>12,} "
                         f"{self.loss_by_kept[kept]:>14.4f}{mark}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_inputs(dataset_dir: str, split: str, *, batch_size: int, max_batches: int) -> Iterator[torch.Tensor]:
    """(B, T) model inputs from the first `max_batches` batches of a prepared split."""
    from moe_platform.train.batches import read_columns
    from moe_platform.train.plan import load_manifest

    paths = load_manifest(dataset_dir).split_paths(split)
    if not paths:
        raise ValueError(f"prune.split={split!r}: {dataset_dir} has no rows in that split")
    dataset = read_columns(paths, ["tokens"])
    dataset.context.enable_progress_bars = False
    for index, batch in enumerate(dataset.iter_torch_batches(batch_size=batch_size, dtypes={"tokens": torch.int64})):
        if index >= max_batches:
            break
        yield batch["tokens"][:, :-1]


def sweep_counts(num_experts: int, top_k: int, kept: int) -> list[int]:
    """E, the chosen count, and E * 3/4, 1/2, 1/4 where a token can still pick top_k experts."""
    counts = {num_experts, kept}
    counts.update(c for c in (num_experts * 3 // 4, num_experts // 2, num_experts // 4) if c >= max(top_k, 1))
    return sorted(counts, reverse=True)


def prune_export_with_calibration(export_dir: str, dataset_dir: str, settings: PruneConfig) -> PruneReport:
    from moe import load_export, load_export_config
    from moe.prune import choose_experts, expert_usage, prune_export
    from moe_platform.train.evaluation import evaluate_export, held_out_batches

    settings.check_choice()
    config = load_export_config(export_dir)
    if config.num_moe_layers == 0:
        raise ValueError(f"prune.export_dir={export_dir} is a dense model: it has no experts to prune")
    model = load_export(export_dir, backend="native")
    inputs = calibration_inputs(dataset_dir, settings.split, batch_size=settings.batch_size,
                                max_batches=settings.calibration_batches)
    usage = expert_usage(model, inputs)
    keep_ids = choose_experts(usage, keep=settings.keep, min_share=settings.min_share)
    kept = len(keep_ids[0])
    output_dir = os.path.abspath(settings.output_dir)
    prune_export(export_dir, output_dir, keep_ids)
    report = PruneReport(
        export_dir=export_dir, output_dir=output_dir, num_experts=config.moe.num_experts, kept=kept,
        keep_ids=[list(map(int, ids)) for ids in keep_ids],
        usage_share=[(u / u.sum().clamp(min=1)).tolist() for u in usage],
    )

    # Every pruned variant is scored on the same held-out rows.
    batches = held_out_batches(dataset_dir, split=settings.eval_split, batch_size=settings.batch_size,
                               max_batches=settings.eval_batches)

    def score(directory: str, count: int) -> None:
        result = evaluate_export(directory, dataset_dir, split=settings.eval_split, batch_size=settings.batch_size,
                                 max_batches=settings.eval_batches, batches=batches)
        report.loss_by_kept[count] = result.loss
        report.params_by_kept[count] = load_export_config(directory).num_params

    score(export_dir, config.moe.num_experts)
    score(output_dir, kept)
    if settings.sweep:
        scratch = tempfile.mkdtemp(prefix="moe-prune-sweep-")
        try:
            for count in sweep_counts(config.moe.num_experts, config.moe.top_k, kept):
                if count not in report.loss_by_kept:
                    ids = choose_experts(usage, keep=count, min_share=None)
                    score(str(prune_export(export_dir, os.path.join(scratch, str(count)), ids)), count)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    with open(os.path.join(output_dir, REPORT_FILE), "w") as fh:
        json.dump(report.to_dict(), fh, indent=2)
    return report
