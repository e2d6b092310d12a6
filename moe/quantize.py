"""Dynamic int8 quantization of an MoETransformer for CPU inference.

Shape legend: T tokens, D model dim, E experts, F expert hidden, A dispatched assignments
(grouped by expert, see moe/router.py Dispatch).

`quantize_int8(model)` returns a quantized COPY (the fp32 model is left as it was), in eval
mode on the CPU. Weights become int8 (per output channel); activations are quantized on
the fly per call (PyTorch's dynamic quantization, fbgemm/x86 kernels), so no calibration
data is needed. What becomes int8:
- every nn.Linear: attention wq/wk/wv/wo, dense and shared-expert SwiGLUs, and lm_head
  when it is untied (a tied lm_head IS the token embedding, which stays fp32);
- the routed experts: the native backend stacks them as (E, F, D) tensors, which dynamic
  quantization cannot see, so each MoE layer's experts become `Int8Experts`: one SwiGLU of
  int8 Linears per expert, each run over the rows the router sends it.
The router gate (fp32, it decides routes), norms and embeddings stay fp32.

The copy is rebuilt from `model.canonical_state_dict()` on the native backend, so a model
on either backend quantizes (a deepspeed one as if loaded with `load_export(dir,
backend="native")`), LoRA adapters arrive merged, and bf16 or GPU models come back fp32 on
the CPU. Expert parallelism is refused: load the export in one process (expert_parallel_size=1).
The result works with `model(idx, targets)`, `generate()` and `generate_stream()`; it is
for inference only (no training, no export: export the fp32 model).
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import torch
from torch import Tensor, nn
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

from .experts import SwiGLU
from .model import MoETransformer
from .router import Dispatch


class Int8Experts(nn.Module):
    """The routed experts of one MoE layer as E SwiGLUs of (to be quantized) Linears; same
    forward(x_TD, dispatch) -> y_TD as NativeExperts at EP=1."""

    def __init__(self, weights: dict[str, Tensor]) -> None:
        """weights: the stacked w1 (E, F, D), w2 (E, D, F), w3 (E, F, D) of `local_weights()`."""
        super().__init__()
        E, F, D = weights["w1"].shape
        self.num_local_experts = E
        self.experts = nn.ModuleList(SwiGLU(D, F) for _ in range(E))
        with torch.no_grad():
            for e, expert in enumerate(self.experts):
                for w in ("w1", "w2", "w3"):
                    getattr(expert, w).weight.copy_(weights[w][e])

    def forward(self, x_TD: Tensor, dispatch: Dispatch) -> Tensor:
        x_AD = x_TD.index_select(0, dispatch.token_idx_A)  # rows grouped by expert
        chunks = x_AD.split(dispatch.counts_E.tolist())
        y_AD = torch.cat([expert(x) if x.shape[0] else x for expert, x in zip(self.experts, chunks)])
        y_AD = y_AD * dispatch.weight_A.unsqueeze(1).to(y_AD.dtype)
        return torch.zeros_like(x_TD).index_add(0, dispatch.token_idx_A, y_AD)


@torch.no_grad()
def quantize_int8(model: MoETransformer) -> MoETransformer:
    """An int8 copy of `model` for CPU inference (eval mode); `model` itself is unchanged."""
    _check_quantizable(model)
    # Building modules draws initial weights that are overwritten at once: keep the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        q = _native_copy(model)
        for _, layer in q.moe_layers():
            layer.experts = Int8Experts(layer.experts.local_weights())
        tied = q.config.tie_embeddings
        spec = {name: per_channel_dynamic_qconfig for name, m in q.named_modules()
                if isinstance(m, nn.Linear) and not (tied and name == "lm_head")}
        with warnings.catch_warnings():
            # torch.ao.quantization and quantized tensors are deprecated in favour of torchao
            # (not a dependency here); torch 2.13 still ships them and nothing replaces them in torch.
            warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated",
                                    category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel",
                                    category=UserWarning)
            quantize_dynamic(q, spec, dtype=torch.qint8, inplace=True)
    return q


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the serialised state_dict (shared tensors counted once): fp32 or int8 alike."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _native_copy(model: MoETransformer) -> MoETransformer:
    """An fp32 CPU eval copy on the native backend, rebuilt from the canonical state dict (the
    backend-independent layout) rather than deep-copied, which fails on tensors a training
    forward left behind."""
    config = model.config  # resolved: the state keeps its router bias (or none) on the native backend
    config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, backend="native"))
    copy = MoETransformer(config)
    copy.load_canonical_state_dict({k: v.float().cpu() for k, v in model.canonical_state_dict().items()})
    return copy.eval()


def _check_quantizable(model: MoETransformer) -> None:
    if model.expert_parallel_size != 1:
        raise ValueError(f"quantize_int8 needs expert_parallel_size=1, not {model.expert_parallel_size}; load the "
                         "export in one process with load_export(export_dir).")
