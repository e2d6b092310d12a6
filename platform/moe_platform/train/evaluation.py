"""Evaluation: validation loss/perplexity inside training, and of an export on any split.

Validation is always next-token cross-entropy (the "lm" part of the loss, no
auxiliary terms), averaged over target tokens, so numbers compare across
objectives and stages. Perplexity = exp(mean loss).
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import torch

from moe_platform.train.config import TrainerConfig
from moe_platform.train.metrics import LayerRouting, aggregate_routing, all_reduce_sum
from moe_platform.train.objective import language_modeling

log = logging.getLogger(__name__)

# Same default as trainer.dead_expert_threshold: under a quarter of the uniform share is dead.
DEAD_EXPERT_THRESHOLD = TrainerConfig.dead_expert_threshold


@torch.no_grad()
def token_loss_sum(model: torch.nn.Module, batches: Iterable[dict]) -> tuple[float, int]:
    """(sum of per-token LM losses, token count) over this worker's batches."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    try:
        for batch in batches:
            output = language_modeling(model, batch)
            loss_sum += float(output.metrics["lm"]) * output.tokens
            tokens += output.tokens
    finally:
        model.train(was_training)
    return loss_sum, tokens


def distributed_validation_sums(model: torch.nn.Module, batches: Iterable[dict]) -> tuple[float, float]:
    """(loss sum, token count) over all workers' batches (every rank must call it)."""
    loss_sum, tokens = token_loss_sum(model, batches)
    totals = all_reduce_sum(torch.tensor([loss_sum, float(tokens)], dtype=torch.float64))
    return float(totals[0]), float(totals[1])


def combine_validation(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{task: (loss sum, tokens)} -> val/loss and val/perplexity over all tokens, plus
    val/<task>/loss and val/<task>/perplexity for each named task of a mixture."""
    values = {}
    for task, (loss_sum, tokens) in sums.items():
        if task:
            loss = loss_sum / max(tokens, 1.0)
            values.update({f"val/{task}/loss": loss, f"val/{task}/perplexity": safe_exp(loss)})
    loss = sum(s for s, _ in sums.values()) / max(sum(t for _, t in sums.values()), 1.0)
    return {"val/loss": loss, "val/perplexity": safe_exp(loss), **values}


def safe_exp(loss: float) -> float:
    return math.exp(min(loss, 80.0))  # an untrained model's perplexity must not overflow to inf


# ---- evaluating an export (jobs/evaluate.py) --------------------------------------------------


@dataclass
class EvaluationReport:
    export_dir: str
    dataset_dir: str
    split: str
    loss: float
    perplexity: float
    tokens: int
    batches: int
    seconds: float
    routing: list[LayerRouting] = field(default_factory=list)

    def summary(self) -> str:
        """A short human-readable table."""
        lines = [
            f"export     {self.export_dir}",
            f"data       {self.dataset_dir} [{self.split}]: {self.tokens:,} tokens in {self.batches} batches "
            f"({self.seconds:.1f} s)",
            f"loss       {self.loss:.4f}",
            f"perplexity {self.perplexity:.2f}",
        ]
        for layer in self.routing:
            share = layer.load_share
            dead = layer.dead_experts(DEAD_EXPERT_THRESHOLD)
            lines.append(
                f"moe block {layer.layer}: max/mean load {layer.max_mean_load:.2f}, load CV {layer.load_cv:.2f}, "
                f"share min {share.min():.3f} max {share.max():.3f} (uniform {1 / len(share):.3f}), "
                f"dead experts {dead}, dropped {layer.dropped_fraction:.1%}, router entropy {layer.router_entropy:.3f}"
            )
        dead_blocks = [layer.layer for layer in self.routing if layer.dead_experts(DEAD_EXPERT_THRESHOLD)]
        if dead_blocks:
            lines.append(f"WARNING: blocks {dead_blocks} have dead experts (share below "
                         f"{DEAD_EXPERT_THRESHOLD:g} x uniform on this split)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "export_dir": self.export_dir,
            "dataset_dir": self.dataset_dir,
            "split": self.split,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "tokens": self.tokens,
            "batches": self.batches,
            "routing": [
                {
                    "layer": layer.layer,
                    "tokens_per_expert": layer.tokens_per_expert.tolist(),
                    "dropped_fraction": layer.dropped_fraction,
                    "router_entropy": layer.router_entropy,
                    "max_mean_load": layer.max_mean_load,
                    "load_cv": layer.load_cv,
                    "min_share": float(layer.load_share.min()),
                    "max_share": float(layer.load_share.max()),
                    "dead_experts": layer.dead_experts(DEAD_EXPERT_THRESHOLD),
                }
                for layer in self.routing
            ],
        }


def evaluate_export(
    export_dir: str,
    dataset_dir: str,
    *,
    split: str = "validation",
    batch_size: int = 8,
    max_batches: Optional[int] = None,
    model: Optional[torch.nn.Module] = None,
    batches: Optional[Sequence[dict]] = None,
) -> EvaluationReport:
    """Perplexity and routing statistics of an export on a prepared split, in this process.

    Rows stream through Ray Data (local paths or URIs); the model runs on CPU at
    expert-parallel size 1, whatever it was trained with. `model`: that export already
    loaded (and perhaps transformed, e.g. quantized) by the caller. `batches`: the split's
    batches already read by `held_out_batches`, when several models are scored on the same rows.
    """
    from moe import load_export
    from moe_platform.train.plan import load_manifest

    manifest = load_manifest(dataset_dir)
    rows = batches if batches is not None else _stream_batches(manifest, split, batch_size)
    model = model if model is not None else load_export(export_dir)
    _check_fits(model, manifest, export_dir)
    model.set_routing_stats(True)
    started = time.perf_counter()
    loss_sum, tokens, count, routing = 0.0, 0, 0, None
    for batch in rows:
        if max_batches is not None and count >= max_batches:
            break
        batch_loss, batch_tokens = token_loss_sum(model, [batch])
        loss_sum, tokens, count = loss_sum + batch_loss, tokens + batch_tokens, count + 1
        routing = _accumulate(routing, aggregate_routing(model.routing_stats(), all_reduce=False))
    loss = loss_sum / max(tokens, 1)
    return EvaluationReport(
        export_dir=export_dir,
        dataset_dir=manifest.dataset_dir,
        split=split,
        loss=loss,
        perplexity=safe_exp(loss),
        tokens=tokens,
        batches=count,
        seconds=time.perf_counter() - started,
        routing=_averaged(routing, count),
    )


def held_out_batches(dataset_dir: str, *, split: str = "validation", batch_size: int = 8,
                     max_batches: Optional[int] = 20) -> Optional[list[dict]]:
    """The split's first `max_batches` batches, read once: each Ray Data read costs seconds, and a
    comparison or a pruning sweep scores several models on the same rows. None when max_batches is
    None: a whole split is not held in memory, evaluate_export streams it per model instead."""
    from moe_platform.train.plan import load_manifest

    if max_batches is None:
        return None
    return list(itertools.islice(_stream_batches(load_manifest(dataset_dir), split, batch_size), max_batches))


def _stream_batches(manifest, split: str, batch_size: int) -> Iterator[dict]:
    from moe_platform.train.batches import read_columns
    from moe_platform.train.plan import LOSS_MASK_COLUMN

    paths = manifest.split_paths(split)
    if not paths:
        raise ValueError(f"split {split!r} of {manifest.dataset_dir} has no rows to evaluate")
    columns = ["tokens"] + ([LOSS_MASK_COLUMN] if LOSS_MASK_COLUMN in manifest.columns else [])
    dataset = read_columns(paths, columns)
    dataset.context.enable_progress_bars = False
    dtypes = {"tokens": torch.int32, LOSS_MASK_COLUMN: torch.int8}
    return iter(dataset.iter_torch_batches(batch_size=batch_size, dtypes={c: dtypes[c] for c in columns}))


def _check_fits(model: torch.nn.Module, manifest, export_dir: str) -> None:
    config = model.config
    if config.vocab_size < manifest.vocab_size or config.seq_len < manifest.seq_len:
        raise ValueError(
            f"the export {export_dir} (vocab_size {config.vocab_size}, seq_len {config.seq_len}) cannot read "
            f"{manifest.dataset_dir} (vocab_size {manifest.vocab_size}, seq_len {manifest.seq_len})"
        )


def _accumulate(total: Optional[list[LayerRouting]], layers: list[LayerRouting]) -> list[LayerRouting]:
    """Counts add up; rates are summed here and divided by the batch count in `_averaged`."""
    if total is None:
        return layers
    return [
        LayerRouting(
            layer=a.layer,
            tokens_per_expert=a.tokens_per_expert + b.tokens_per_expert,
            dropped_fraction=a.dropped_fraction + b.dropped_fraction,
            router_entropy=a.router_entropy + b.router_entropy,
        )
        for a, b in zip(total, layers)
    ]


def _averaged(total: Optional[list[LayerRouting]], batches: int) -> list[LayerRouting]:
    if not total:
        return []
    return [
        LayerRouting(
            layer=layer.layer,
            tokens_per_expert=layer.tokens_per_expert,
            dropped_fraction=layer.dropped_fraction / batches,
            router_entropy=layer.router_entropy / batches,
        )
        for layer in total
    ]
