"""The native experts and the model on a CUDA GPU.

On Hopper and later GPUs, in bf16, the native experts run torch._grouped_mm. Here it is checked
against float32 per-expert matmuls, gradients included, and a bf16 model step is checked against
the same model in float32 on the CPU. Every test skips without a GPU, as on CI;
benchmarks/gpu_checks.sh runs them on one.
"""
from __future__ import annotations

import pytest
import torch

from testkit.models import tiny_model

from moe import MoETransformer
from moe.experts import grouped_mm_supported, swiglu_experts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (benchmarks/gpu_checks.sh runs these on one)")

BF16_TOLERANCE = 1e-2  # relative error of bf16 operands with float32 accumulation: 1e-3 to 1e-2


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    return ((value - reference).norm() / reference.norm()).item()


def test_grouped_gemm_in_bf16_matches_float32_per_expert_matmuls():
    # A=4096 routed rows over E=8 experts of uneven size, one of them empty; D=512, F=1024.
    torch.manual_seed(0)
    counts_E = torch.tensor([700, 0, 1200, 300, 500, 396, 600, 400], device="cuda")
    A, D, F = int(counts_E.sum()), 512, 1024
    x_AD = torch.randn(A, D, device="cuda")
    w1_EFD, w3_EFD = (torch.randn(8, F, D, device="cuda") * D**-0.5 for _ in range(2))
    w2_EDF = torch.randn(8, D, F, device="cuda") * F**-0.5
    grad_AD = torch.randn(A, D, device="cuda")
    float32 = [t.clone().requires_grad_() for t in (x_AD, w1_EFD, w2_EDF, w3_EFD)]
    bf16 = [t.bfloat16().requires_grad_() for t in (x_AD, w1_EFD, w2_EDF, w3_EFD)]
    if torch.cuda.get_device_capability() >= (9, 0):
        assert grouped_mm_supported(bf16[0], bf16[1])  # else this compares the fallback with itself

    reference = swiglu_experts(*float32, counts_E, use_grouped_mm=False)
    reference.backward(grad_AD)
    out = swiglu_experts(*bf16, counts_E)  # the default: grouped GEMM wherever it runs
    out.backward(grad_AD.bfloat16())

    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _relative_error(out, reference) < BF16_TOLERANCE
    for name, ours, theirs in zip(("x", "w1", "w2", "w3"), bf16, float32):
        assert torch.isfinite(ours.grad).all(), name
        assert _relative_error(ours.grad, theirs.grad) < BF16_TOLERANCE, name
    assert bf16[1].grad[1].abs().max() == 0  # the empty expert gets no gradient


def test_a_bf16_training_step_on_the_gpu_matches_float32_on_the_cpu():
    config = tiny_model(d_model=128, n_heads=4, ffn_hidden=256, num_experts=8, top_k=2, expert_hidden=128)
    torch.manual_seed(0)
    cpu_model = MoETransformer(config)
    gpu_model = MoETransformer(config).cuda().bfloat16()
    gpu_model.load_state_dict(cpu_model.state_dict())
    idx = torch.randint(0, config.vocab_size, (8, config.seq_len), generator=torch.Generator().manual_seed(1))

    _, cpu_loss = cpu_model(idx, idx)
    cpu_loss.backward()
    _, gpu_loss = gpu_model(idx.cuda(), idx.cuda())
    gpu_loss.backward()

    assert gpu_loss.item() == pytest.approx(cpu_loss.item(), rel=BF16_TOLERANCE)
    cpu_grads = dict(cpu_model.named_parameters())
    for name, param in gpu_model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    # bf16 can flip a near-tie in top-k routing, so compare the gradient of the whole model, not each expert's.
    flat = lambda grads: torch.cat([g.double().flatten().cpu() for g in grads])  # noqa: E731
    gpu_grad = flat(param.grad for _, param in gpu_model.named_parameters())
    cpu_grad = flat(cpu_grads[name].grad for name, _ in gpu_model.named_parameters())
    assert _relative_error(gpu_grad, cpu_grad) < 5 * BF16_TOLERANCE
