"""The tiny MoE of the tests: 2 layers, 4 experts top-2, d_model 32 - a training step costs milliseconds."""
from __future__ import annotations

import dataclasses

from moe import ModelConfig, MoEConfig

VOCAB_SIZE = 64
SEQ_LEN = 32

TINY = dict(vocab_size=VOCAB_SIZE, d_model=32, n_layers=2, n_heads=2, seq_len=SEQ_LEN, ffn_hidden=64)
TINY_MOE = dict(num_experts=4, top_k=2, expert_hidden=32)

# The same model as command-line overrides of any job.
TINY_MODEL_OVERRIDES = [f"model.{key}={value}" for key, value in TINY.items()] + \
    [f"model.moe.{key}={value}" for key, value in TINY_MOE.items()]

_MODEL_FIELDS = {field.name for field in dataclasses.fields(ModelConfig)} - {"moe"}
_MOE_FIELDS = {field.name for field in dataclasses.fields(MoEConfig)}


def tiny_model(**changes) -> ModelConfig:
    """The tiny MoE with any ModelConfig or MoEConfig field changed by name, e.g.
    `tiny_model(n_heads=4, backend="deepspeed", num_experts=8)`."""
    unknown = set(changes) - _MODEL_FIELDS - _MOE_FIELDS
    if unknown:
        raise TypeError(f"tiny_model: {sorted(unknown)} are neither ModelConfig nor MoEConfig fields")
    model = {key: value for key, value in changes.items() if key in _MODEL_FIELDS}
    moe = {key: value for key, value in changes.items() if key in _MOE_FIELDS}
    return ModelConfig(**{**TINY, **model}, moe=MoEConfig(**{**TINY_MOE, **moe}))
