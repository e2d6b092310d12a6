"""Native routed experts: dropless sorted dispatch, grouped GEMM, expert parallelism.

Shape legend: T tokens (this rank), D model dim, E experts (global), L local experts
(E / ep), F expert hidden, A dispatched assignments (sorted by expert), R rows
received from the EP group.

Forward, one rank (EP=1):
    x_AD = x_TD[token_idx_A]                       one gather, rows grouped by expert
    h_AF = silu(x_AD @ w1[e].T) * (x_AD @ w3[e].T) grouped GEMMs over contiguous groups
    y_AD = (h_AF * weight_A) @ w2[e].T             the combine weight folded in before w2
    out_TD[t] = sum of token t's rows of y_AD      one embedding_bag (see SumRows)
With EP > 1 the sorted rows travel to the rank that owns their expert and back
(two uneven all-to-alls); the rank regroups what it receives by local expert.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import Tensor, nn

from . import parallel
from .config import ModelConfig
from .router import Dispatch

# Key layout of DeepSpeed's Experts; the native state_dict uses it too (see NativeExperts).
DS_EXPERT_KEY = "deepspeed_moe.experts.deepspeed_experts.{j}.{w}.weight"
WEIGHT_NAMES = ("w1", "w2", "w3")


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): the dense feed-forward, the shared expert, and one DeepSpeed expert."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    """torch._grouped_mm runs on CPU (fp32/bf16) and on Hopper+ GPUs in bf16, and needs
    every row stride a multiple of 16 bytes (it refuses e.g. fp32 rows of 5 elements)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any(n * x.element_size() % 16 for n in (x.shape[-1], w.shape[-1], w.shape[-2])):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (9, 0) and x.dtype == torch.bfloat16
    return False


def grouped_linear(x_AI: Tensor, w_EOI: Tensor, counts_E: Tensor, use_grouped_mm: Optional[bool]) -> Tensor:
    """Row group e of x (counts_E[e] rows) times w[e].T, for all groups at once."""
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_supported(x_AI, w_EOI)
    if use_grouped_mm:
        offs_E = counts_E.cumsum(0).to(torch.int32)  # stays on device: no host sync
        return torch._grouped_mm(x_AI, w_EOI.transpose(-2, -1), offs=offs_E)
    # Fallback: one matmul per expert (needs the counts on the host).
    chunks = x_AI.split(counts_E.tolist())
    return torch.cat([xe @ we.t() for xe, we in zip(chunks, w_EOI)])


def grouped_weight_grad(d_AO: Tensor, x_AI: Tensor, counts_E: Tensor, use_grouped_mm: bool) -> Tensor:
    """The gradient of grouped_linear's w: d[rows of e].T @ x[rows of e] -> (E, O, I)."""
    if use_grouped_mm:
        return torch._grouped_mm(d_AO.t(), x_AI, offs=counts_E.cumsum(0).to(torch.int32))
    out_EOI = d_AO.new_empty(counts_E.shape[0], d_AO.shape[1], x_AI.shape[1])
    counts = counts_E.tolist()
    for e, (d_rO, x_rI) in enumerate(zip(d_AO.split(counts), x_AI.split(counts))):
        torch.mm(d_rO.t(), x_rI, out=out_EOI[e])  # zeros for an expert without rows
    return out_EOI


class GateUp(torch.autograd.Function):
    """(x_AD @ w1[e].T, x_AD @ w3[e].T) per expert group. Its backward on CPU writes the input
    gradient dg @ w1[e] + du @ w3[e] expert by expert into one buffer (mm, then addmm into the
    same rows) instead of two (A, D) grouped GEMM results and an add; weight gradients are
    computed only for weights that want them (frozen experts skip two GEMMs)."""

    @staticmethod
    def forward(ctx, x_AD: Tensor, w1_EFD: Tensor, w3_EFD: Tensor, counts_E: Tensor,
                use_grouped_mm: bool) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x_AD, w1_EFD, w3_EFD, counts_E)
        ctx.use_grouped_mm = use_grouped_mm
        return (grouped_linear(x_AD, w1_EFD, counts_E, use_grouped_mm),
                grouped_linear(x_AD, w3_EFD, counts_E, use_grouped_mm))

    @staticmethod
    def backward(ctx, dg_AF: Tensor, du_AF: Tensor):
        x_AD, w1_EFD, w3_EFD, counts_E = ctx.saved_tensors
        dg_AF, du_AF = dg_AF.contiguous(), du_AF.contiguous()  # grouped_mm refuses expanded grads
        need_x, need_w1, need_w3 = ctx.needs_input_grad[:3]
        dx_AD = GateUp._input_grad(dg_AF, du_AF, w1_EFD, w3_EFD, counts_E, ctx.use_grouped_mm) if need_x else None
        dw1 = grouped_weight_grad(dg_AF, x_AD, counts_E, ctx.use_grouped_mm) if need_w1 else None
        dw3 = grouped_weight_grad(du_AF, x_AD, counts_E, ctx.use_grouped_mm) if need_w3 else None
        return dx_AD, dw1, dw3, None, None

    @staticmethod
    def _input_grad(dg_AF: Tensor, du_AF: Tensor, w1_EFD: Tensor, w3_EFD: Tensor, counts_E: Tensor,
                    use_grouped_mm: bool) -> Tensor:
        if dg_AF.device.type != "cpu":  # one kernel per GEMM beats a host loop of launches
            return (grouped_linear(dg_AF, w1_EFD.transpose(-2, -1), counts_E, use_grouped_mm)
                    + grouped_linear(du_AF, w3_EFD.transpose(-2, -1), counts_E, use_grouped_mm))
        dx_AD = dg_AF.new_empty(dg_AF.shape[0], w1_EFD.shape[2])
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            rows = slice(start, start + n)
            dx_rD = torch.mm(dg_AF[rows], w1_EFD[e], out=dx_AD[rows])
            torch.addmm(dx_rD, du_AF[rows], w3_EFD[e], out=dx_rD)  # not addmm_: FLOP counters skip it
            start += n
        return dx_AD


def swiglu_experts(x_AD: Tensor, w1_EFD: Tensor, w2_EDF: Tensor, w3_EFD: Tensor, counts_E: Tensor,
                   weight_A: Optional[Tensor] = None, use_grouped_mm: Optional[bool] = None) -> Tensor:
    """SwiGLU of each row through its expert; rows must be grouped by expert. weight_A, when
    given, scales each row's hidden activations before w2 ((h * w) @ W2 == w * (h @ W2))."""
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_supported(x_AD, w1_EFD)
    g_AF, u_AF = GateUp.apply(x_AD, w1_EFD, w3_EFD, counts_E, use_grouped_mm)
    h_AF = F.silu(g_AF) * u_AF
    if weight_A is not None:
        h_AF = h_AF * weight_A.unsqueeze(1).to(h_AF.dtype)
    return grouped_linear(h_AF, w2_EDF, counts_E, use_grouped_mm)


def token_bags(token_idx_A: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """Each token's assignments as embedding_bag bags: (rows_A ordered by token, offsets_T)."""
    rows_A = token_idx_A.argsort(stable=True)
    per_token_T = torch.bincount(token_idx_A, minlength=num_tokens)
    return rows_A, per_token_T.cumsum(0) - per_token_T


class GatherRows(torch.autograd.Function):
    """x_AD = x_TD[token_idx_A], whose backward sums each token's rows (embedding_bag over
    token_bags) instead of index_add's scatter, which on CPU re-sorts the index every call
    and takes about twice as long."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, token_idx_A: Tensor, rows_A: Tensor, offsets_T: Tensor) -> Tensor:
        ctx.save_for_backward(rows_A, offsets_T)
        return x_TD.index_select(0, token_idx_A)

    @staticmethod
    def backward(ctx, grad_AD: Tensor):
        rows_A, offsets_T = ctx.saved_tensors
        return F.embedding_bag(rows_A, grad_AD.contiguous(), offsets_T, mode="sum"), None, None, None


class SumRows(torch.autograd.Function):
    """The combine, GatherRows' adjoint: out_TD[t] = the sum of token t's rows of y_AD, each
    times its combine weight when weight_A is given (zero for a token with no row), by one
    embedding_bag; its backward is the gather. The weight rides in embedding_bag's
    per_sample_weights, so weighting costs no pass over (A, D) in forward. Unlike index_add,
    whose autograd keeps the (A, D) source alive for backward, an unweighted sum saves only
    the index (a weighted one must keep y_AD for the weight's gradient)."""

    @staticmethod
    def forward(ctx, y_AD: Tensor, weight_A: Optional[Tensor], token_idx_A: Tensor, rows_A: Tensor,
                offsets_T: Tensor) -> Tensor:
        y_AD = y_AD.contiguous()
        if weight_A is None:
            ctx.save_for_backward(token_idx_A)
            return F.embedding_bag(rows_A, y_AD, offsets_T, mode="sum")
        w_A = weight_A.to(y_AD.dtype)
        ctx.save_for_backward(token_idx_A, w_A, y_AD)
        return F.embedding_bag(rows_A, y_AD, offsets_T, mode="sum", per_sample_weights=w_A[rows_A])

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        token_idx_A, *weighted = ctx.saved_tensors
        g_AD = grad_TD.index_select(0, token_idx_A)
        if not weighted:
            return g_AD, None, None, None, None
        w_A, y_AD = weighted
        # d out / d w_a = y_a: the weight's gradient is a row-wise dot, batched as (A,1,D) @ (A,D,1).
        dw_A = torch.bmm(g_AD.unsqueeze(1), y_AD.unsqueeze(2)).view(-1) if ctx.needs_input_grad[1] else None
        return g_AD.mul_(w_A.unsqueeze(1)), dw_A, None, None, None


class NativeExperts(DeepSpeedMoE):
    """The native backend's routed experts, stacked per rank: w1 (L, F, D), w2 (L, D, F), w3 (L, F, D).

    It subclasses `deepspeed.moe.layer.MoE` only because DeepSpeed's engine recognises MoE
    layers by `isinstance(module, MoE)`; it then creates the expert-parallel groups (through
    `set_deepspeed_parallelism`), reduces the expert gradients over the expert-data-parallel
    group, lets ZeRO partition the 'moe' param groups, and writes per-expert checkpoint files.
    `MoE.__init__` (DeepSpeed's own gate and experts) is deliberately not run; the attributes
    the engine reads are set here. For those checkpoint files, `state_dict()` presents each
    expert as `deepspeed_moe.experts.deepspeed_experts.{j}.w1.weight` (F, D), exactly like
    the deepspeed backend, and `load_state_dict()` stacks them back.
    """

    def __init__(self, config: ModelConfig, *, expert_parallel_size: int = 1) -> None:
        nn.Module.__init__(self)
        m, d = config.moe, config.d_model
        config.validate_expert_parallel(expert_parallel_size)
        # What DeepSpeed's engine reads from an MoE layer:
        self.num_experts = m.num_experts
        self.ep_size = expert_parallel_size
        self.num_local_experts = m.num_experts // expert_parallel_size
        self.expert_group_name = parallel.expert_group_name(expert_parallel_size)
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False

        n_local, f = self.num_local_experts, m.expert_hidden
        self.w1 = nn.Parameter(torch.empty(n_local, f, d))
        self.w2 = nn.Parameter(torch.empty(n_local, d, f))
        self.w3 = nn.Parameter(torch.empty(n_local, f, d))
        parallel.tag_expert_params([self.w1, self.w2, self.w3], expert_parallel_size)
        self.use_grouped_mm: Optional[bool] = None  # None: wherever torch._grouped_mm supports it
        self.register_state_dict_post_hook(_per_expert_state_dict)
        self.register_load_state_dict_pre_hook(_stack_per_expert_state_dict)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by DeepSpeed's engine on every module that has it."""
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel_ is not supported by the native MoE backend.")
        parallel.ensure_expert_parallel_groups(self.ep_size)

    def local_weights(self, grads: bool = False) -> dict[str, Tensor]:
        """This rank's experts as stacked (L, ...) tensors (or their gradients)."""
        return {w: (p.grad if grads else p).detach() for w, p in (("w1", self.w1), ("w2", self.w2), ("w3", self.w3))}

    @torch.no_grad()
    def load_local_weights(self, weights: dict[str, Tensor]) -> None:
        for w in WEIGHT_NAMES:
            getattr(self, w).copy_(weights[w])

    def forward(self, x_TD: Tensor, dispatch: Dispatch) -> Tensor:
        bags = token_bags(dispatch.token_idx_A, x_TD.shape[0])
        x_AD = GatherRows.apply(x_TD, dispatch.token_idx_A, *bags)
        # The combine weight costs elementwise passes over whatever it scales, so it goes on the
        # narrower side: the hidden rows (A, F) before w2 when F <= D, else the combine (free in
        # forward: embedding_bag's per_sample_weights). EP > 1 always weights in the combine.
        weight_hidden = self.ep_size == 1 and self.w1.shape[1] <= self.w1.shape[2]
        if self.ep_size == 1:
            y_AD = swiglu_experts(x_AD, self.w1, self.w2, self.w3, dispatch.counts_E,
                                  dispatch.weight_A if weight_hidden else None, self.use_grouped_mm)
        else:
            y_AD = self._expert_parallel(x_AD, dispatch.counts_E)
        return SumRows.apply(y_AD, None if weight_hidden else dispatch.weight_A, dispatch.token_idx_A, *bags)

    def _expert_parallel(self, x_AD: Tensor, counts_E: Tensor) -> Tensor:
        """Send rows to the ranks owning their experts, compute, send results back."""
        group = parallel.expert_parallel_group(self.ep_size)
        ep, n_local = self.ep_size, self.num_local_experts
        # Global expert ids are rank-major, so rows sorted by expert are already sorted by rank.
        recv_counts_PL = parallel.exchange_counts(counts_E, group).view(ep, n_local)  # P: source rank
        send_splits = counts_E.view(ep, n_local).sum(1).tolist()  # the one host sync of the layer
        recv_splits = recv_counts_PL.sum(1).tolist()
        x_RD = parallel.all_to_all_v(x_AD, recv_splits, send_splits, group)
        # Received rows are ordered (source rank, local expert); group them by local expert.
        local_expert_R = torch.arange(n_local, device=x_RD.device).repeat(ep)
        local_expert_R = local_expert_R.repeat_interleave(recv_counts_PL.reshape(-1))
        perm_R = local_expert_R.argsort(stable=True)
        y_RD = swiglu_experts(x_RD.index_select(0, perm_R), self.w1, self.w2, self.w3,
                              recv_counts_PL.sum(0), None, self.use_grouped_mm)
        y_RD = y_RD.index_select(0, perm_R.argsort())  # back to (source rank, local expert) order
        return parallel.all_to_all_v(y_RD, send_splits, recv_splits, group)


def _per_expert_state_dict(module: NativeExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    for w in WEIGHT_NAMES:
        stacked = state_dict.pop(prefix + w)
        for j in range(stacked.shape[0]):
            state_dict[prefix + DS_EXPERT_KEY.format(j=j, w=w)] = stacked[j]


def _stack_per_expert_state_dict(module: NativeExperts, state_dict: dict, prefix: str, *args) -> None:
    for w in WEIGHT_NAMES:
        keys = [prefix + DS_EXPERT_KEY.format(j=j, w=w) for j in range(module.num_local_experts)]
        if all(k in state_dict for k in keys):
            state_dict[prefix + w] = torch.stack([state_dict.pop(k) for k in keys])
