"""Objectives: the seam between the training loop and what the loss is.

The loop only knows `objective(model, batch) -> ObjectiveOutput`. Pretraining
and finetuning use "lm" (a finetuning dataset adds a loss_mask column);
distillation will register an objective that also runs a teacher, built by its
factory from the stage, without touching the loop.

Shapes: B = batch rows, T = seq_len; a row holds T + 1 tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar, differentiable: what backward() sees
    metrics: dict[str, torch.Tensor]  # detached scalars: "lm", "balance", "z", ...
    # Tokens that count in the loss (the denominator of the mean), for token-weighted averages.
    tokens: int


class Objective(Protocol):
    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput: ...


def split_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A (B, T+1) row batch -> inputs (B, T), targets (B, T), loss mask over targets (B, T) or None."""
    tokens_BL = batch["tokens"].long()
    inputs_BT, targets_BT = tokens_BL[:, :-1], tokens_BL[:, 1:]
    mask = batch.get("loss_mask")
    # The mask marks tokens that should be predicted, so it aligns with the targets.
    mask_BT = mask[:, 1:].bool() if mask is not None else None
    return inputs_BT.contiguous(), targets_BT.contiguous(), mask_BT


def language_modeling(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
    """Next-token cross-entropy plus the model's weighted auxiliary MoE losses."""
    inputs_BT, targets_BT, mask_BT = split_batch(batch)
    _, loss = model(inputs_BT, targets=targets_BT, loss_mask=mask_BT)
    breakdown = _unwrap(model).loss_breakdown
    tokens = int(mask_BT.sum()) if mask_BT is not None else targets_BT.numel()
    return ObjectiveOutput(loss=loss, metrics={k: v.detach() for k, v in breakdown.items()}, tokens=tokens)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The MoETransformer inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


# name -> factory(stage) -> objective. A factory can load what its objective needs (a teacher).
OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "lm": lambda stage: language_modeling,
}


def build_objective(stage) -> Objective:
    return OBJECTIVES[stage.trainer.objective](stage)
