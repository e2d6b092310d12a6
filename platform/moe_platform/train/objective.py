"""Objectives: the seam between the training loop and what the loss is.

The loop only knows `objective(model, batch) -> ObjectiveOutput` and the names of
the loss terms it reports (`objective.terms`). Pretraining and finetuning use
"lm" (a finetuning dataset adds a loss_mask column); "distill" adds a KL term
towards a frozen teacher export, which its factory loads on each worker.

Shapes: B = batch rows, T = seq_len, V = vocabulary; a row holds T + 1 tokens.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LM_TERMS = ("lm", "balance", "z")


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar, differentiable: what backward() sees
    metrics: dict[str, torch.Tensor]  # detached scalars, one per name in the objective's `terms`
    # Tokens that count in the loss (the denominator of the mean), for token-weighted averages.
    tokens: int


def split_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A (B, T+1) row batch -> inputs (B, T), targets (B, T), loss mask over targets (B, T) or None."""
    tokens_BL = batch["tokens"].long()
    inputs_BT, targets_BT = tokens_BL[:, :-1], tokens_BL[:, 1:]
    mask = batch.get("loss_mask")
    # The mask marks tokens that should be predicted, so it aligns with the targets.
    mask_BT = mask[:, 1:].bool() if mask is not None else None
    return inputs_BT.contiguous(), targets_BT.contiguous(), mask_BT


class LanguageModeling:
    """Next-token cross-entropy plus the model's weighted auxiliary MoE losses."""

    terms = LM_TERMS

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        inputs_BT, targets_BT, mask_BT = split_batch(batch)
        _, loss = model(inputs_BT, targets=targets_BT, loss_mask=mask_BT)
        breakdown = unwrap(model).loss_breakdown
        tokens = int(mask_BT.sum()) if mask_BT is not None else targets_BT.numel()
        return ObjectiveOutput(loss=loss, metrics={k: v.detach() for k, v in breakdown.items()}, tokens=tokens)


language_modeling = LanguageModeling()


class Distillation:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * the student's own LM loss (+ aux).

    The T^2 factor keeps the soft term's gradient scale independent of T (Hinton et al. 2015).
    The teacher (any export with the same vocabulary: dense or MoE, larger or not) runs frozen
    in eval mode at expert-parallel size 1 on every worker.
    """

    terms = LM_TERMS + ("kd",)

    def __init__(self, teacher: torch.nn.Module, *, temperature: float, alpha: float):
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        inputs_BT, targets_BT, mask_BT = split_batch(batch)
        logits_BTV, student_loss = model(inputs_BT, targets=targets_BT, loss_mask=mask_BT)
        with torch.no_grad():
            teacher_BTV, _ = self.teacher(inputs_BT)
        kd = kl_to_teacher(logits_BTV, teacher_BTV, mask_BT, self.temperature)
        loss = self.alpha * kd + (1.0 - self.alpha) * student_loss
        metrics = {k: v.detach() for k, v in unwrap(model).loss_breakdown.items()}
        metrics["kd"] = kd.detach()
        tokens = int(mask_BT.sum()) if mask_BT is not None else targets_BT.numel()
        return ObjectiveOutput(loss=loss, metrics=metrics, tokens=tokens)


def kl_to_teacher(student_BTV: torch.Tensor, teacher_BTV: torch.Tensor, mask_BT: Optional[torch.Tensor],
                  temperature: float) -> torch.Tensor:
    """T^2 * mean over counted tokens of KL(softmax(teacher / T) || softmax(student / T)), in fp32."""
    student_logp = F.log_softmax(student_BTV.float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_BTV.float() / temperature, dim=-1)
    kl_BT = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if mask_BT is not None:
        kl_BT = kl_BT[mask_BT]
    if kl_BT.numel() == 0:  # a batch with no counted token contributes nothing (but keeps the graph)
        return student_BTV.sum() * 0.0
    return kl_BT.mean() * temperature**2


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The MoETransformer inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def _distillation(stage, device: Optional[torch.device] = None) -> Distillation:
    from moe import load_export

    settings = stage.distill
    teacher = load_export(settings.teacher_export_dir, device=device or "cpu")
    for p in teacher.parameters():
        p.requires_grad_(False)
    log.info("distillation teacher %s: %d parameters (%d active)", settings.teacher_export_dir,
             teacher.config.num_params, teacher.config.num_active_params)
    return Distillation(teacher, temperature=settings.temperature, alpha=settings.alpha)


# name -> factory(stage, device) -> objective. A factory can load what its objective needs (a teacher).
OBJECTIVES: dict[str, Callable[..., Callable]] = {
    "lm": lambda stage, device=None: language_modeling,
    "distill": _distillation,
}


def build_objective(stage, device: Optional[torch.device] = None):
    return OBJECTIVES[stage.trainer.objective](stage, device)
