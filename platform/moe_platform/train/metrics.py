"""Training metrics: throughput/MFU accounting, routing-statistics aggregation, TensorBoard.

Rank 0 writes TensorBoard event files (Ray Train V2 writes none itself); the
same scalars go to `ray.train.report` every `report_every` steps. Tags:

    train/loss, train/lm_loss, train/balance_loss, train/z_loss, train/lr, train/grad_norm
    perf/tokens_per_s, perf/mfu, perf/data_wait_fraction, perf/step_time_s
    val/loss, val/perplexity
    moe/layer_<block>/tokens_per_expert (histogram: bucket e = expert e's token count)
    moe/layer_<block>/dropped_fraction, router_entropy (the interval's last micro-batch)
    moe/layer_<block>/max_mean_load, load_cv, min_share, max_share, dead_experts
        (the load over the whole logging interval, all micro-batches of all workers)
    moe/dead_experts (sum over layers)
    moe/expert_load (image: layers x experts, share of each layer's tokens)
    perf/all_to_all_bytes_per_step, perf/all_to_all_time_fraction (expert parallel, native backend)

Shapes: L = MoE layers, E = experts.
"""
from __future__ import annotations

import functools
import io
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


# ---- collectives ------------------------------------------------------------------------------


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over all ranks (unchanged without torch.distributed).

    NCCL reduces only GPU tensors, so the values visit the GPU and come back.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    device = values.device
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    reduced = values.to(device)
    torch.distributed.all_reduce(reduced)
    return reduced.to(values.device)


# ---- throughput ------------------------------------------------------------------------------


class ThroughputMeter:
    """Tokens/s, MFU and the share of step time spent waiting for data, per logging interval.

    Only training steps count (evaluation, checkpoints and reports are excluded), so the
    numbers describe the step loop and compare with a bare PyTorch loop.
    """

    def __init__(self, *, tokens_per_step: int, train_flops_per_token: float, peak_flops: Callable[[], float]):
        self._tokens_per_step = tokens_per_step
        self._flops_per_token = train_flops_per_token
        # All workers together; asked for once, at the first snapshot, when start-up (Ray Data, the
        # controller) no longer competes for the cores a measured peak is timed on.
        self._peak_flops = functools.cache(peak_flops)
        self.reset()

    def reset(self) -> None:
        self._steps = 0
        self._step_seconds = 0.0
        self._data_wait_seconds = 0.0

    def add_step(self, seconds: float, data_wait_seconds: float) -> None:
        self._steps += 1
        self._step_seconds += seconds
        self._data_wait_seconds += data_wait_seconds

    def snapshot(self) -> dict[str, float]:
        """Rates over the steps since the last snapshot (then resets)."""
        seconds = max(self._step_seconds, 1e-9)
        tokens_per_s = self._tokens_per_step * self._steps / seconds
        result = {
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self._flops_per_token / self._peak_flops(),
            "data_wait_fraction": self._data_wait_seconds / seconds,
            "step_time_s": seconds / max(self._steps, 1),
        }
        self.reset()
        return result


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, *, size: Optional[int] = None,
                          repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` (size x size) @ (size x size) matmuls on `device` in `dtype`,
    on this process's intra-op threads: the peak the training step's matmuls can reach here.
    About 0.1 s on a 2-core CPU (size 1024), a few ms on a GPU (size 8192)."""
    size = size or (1024 if device.type == "cpu" else 8192)
    # Constant operands: a matmul's speed does not depend on the values, and drawing random ones
    # would move the global RNG mid-training (a resumed run would then diverge from an unbroken one).
    a_NN = torch.full((size, size), 0.5, device=device, dtype=dtype)
    b_NN = torch.full((size, size), 0.5, device=device, dtype=dtype)

    def seconds_of_one() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        a_NN @ b_NN
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    seconds_of_one()  # warm-up: allocation, kernel selection
    best = min(seconds_of_one() for _ in range(repeats))
    return 2 * size**3 / best


# ---- routing statistics ------------------------------------------------------------------------


@dataclass
class LayerRouting:
    """One MoE layer's routing over a batch, summed/averaged over all workers."""

    layer: int  # index of the transformer block
    tokens_per_expert: np.ndarray  # (E,) token-expert assignments
    dropped_fraction: float
    router_entropy: float

    @property
    def max_mean_load(self) -> float:
        mean = float(self.tokens_per_expert.mean())
        return float(self.tokens_per_expert.max()) / mean if mean > 0 else 0.0

    @property
    def load_share(self) -> np.ndarray:
        total = float(self.tokens_per_expert.sum())
        return self.tokens_per_expert / total if total > 0 else self.tokens_per_expert.astype(float)

    @property
    def load_cv(self) -> float:
        """Coefficient of variation of the load (std / mean): 0 when perfectly balanced."""
        mean = float(self.tokens_per_expert.mean())
        return float(self.tokens_per_expert.std()) / mean if mean > 0 else 0.0

    def dead_experts(self, threshold: float) -> int:
        """Experts whose share is below `threshold` x the uniform share 1/E (none when nothing was routed)."""
        if float(self.tokens_per_expert.sum()) == 0:
            return 0
        return int((self.load_share < threshold / len(self.tokens_per_expert)).sum())


def aggregate_routing(stats: list[dict[str, Any]], *, all_reduce: bool,
                      window_load: Optional[list] = None) -> list[LayerRouting]:
    """The model's per-layer stats -> LayerRouting, summed (counts) / averaged (rates) over ranks.

    `window_load`: `model.pop_expert_load()`, the counts of a whole logging interval, which
    then replace the last micro-batch's counts. Every rank must call this with all_reduce=True
    together (it is one collective).
    """
    if not stats:
        return []
    counts = [s["tokens_per_expert"] for s in stats] if window_load is None else [c for _, c in window_load]
    counts_LE = torch.stack([torch.as_tensor(c).detach().double().cpu() for c in counts])
    rates_L2 = torch.tensor([[float(s["dropped_fraction"]), float(s["router_entropy"])] for s in stats],
                            dtype=torch.float64)
    if all_reduce and torch.distributed.is_initialized():
        packed = all_reduce_sum(torch.cat([counts_LE, rates_L2], dim=1))
        world = torch.distributed.get_world_size()
        counts_LE, rates_L2 = packed[:, : counts_LE.shape[1]], packed[:, counts_LE.shape[1]:] / world
    return [
        LayerRouting(layer=int(stats[i].get("layer", i)), tokens_per_expert=counts_LE[i].numpy(),
                     dropped_fraction=float(rates_L2[i, 0]), router_entropy=float(rates_L2[i, 1]))
        for i in range(len(stats))
    ]


def routing_scalars(layers: list[LayerRouting], dead_threshold: float) -> dict[str, float]:
    scalars = {}
    for layer in layers:
        share = layer.load_share
        prefix = f"moe/layer_{layer.layer}/"
        scalars.update({
            prefix + "dropped_fraction": layer.dropped_fraction,
            prefix + "router_entropy": layer.router_entropy,
            prefix + "max_mean_load": layer.max_mean_load,
            prefix + "load_cv": layer.load_cv,
            prefix + "min_share": float(share.min()),
            prefix + "max_share": float(share.max()),
            prefix + "dead_experts": float(layer.dead_experts(dead_threshold)),
        })
    if layers:
        scalars["moe/dead_experts"] = float(sum(layer.dead_experts(dead_threshold) for layer in layers))
    return scalars


def expert_load_image(layers: list[LayerRouting]) -> np.ndarray:
    """A (H, W, 3) uint8 heatmap of each layer's load share per expert (rows: layers)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    share_LE = np.stack([layer.load_share for layer in layers])
    num_layers, num_experts = share_LE.shape
    figure, axes = plt.subplots(figsize=(max(4.0, 0.35 * num_experts + 2), max(2.0, 0.4 * num_layers + 1.2)), dpi=80)
    image = axes.imshow(share_LE, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(share_LE.max(), 1e-9))
    axes.set_xlabel("expert")
    axes.set_ylabel("block")
    axes.set_yticks(range(num_layers), [str(layer.layer) for layer in layers])
    axes.set_title("share of tokens per expert (uniform = 1/E)")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="raw", dpi=80)
    width, height = figure.canvas.get_width_height()
    plt.close(figure)
    rgba = np.frombuffer(buffer.getvalue(), dtype=np.uint8).reshape(height, width, 4)
    return rgba[:, :, :3].copy()


# ---- TensorBoard ------------------------------------------------------------------------------


class TensorBoardLog:
    """Rank 0's event-file writer; on other ranks every method is a no-op."""

    def __init__(self, log_dir: Optional[str], *, purge_step: Optional[int] = None):
        self._writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: after a restart, events the dead attempt logged past the checkpoint are
            # dropped by TensorBoard's reader, so the curve continues instead of doubling back.
            self._writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    @property
    def active(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def routing(self, step: int, layers: list[LayerRouting], dead_threshold: float) -> None:
        if self._writer is None or not layers:
            return
        self.scalars(step, routing_scalars(layers, dead_threshold))
        for layer in layers:
            counts = layer.tokens_per_expert.astype(float)
            experts = np.arange(len(counts), dtype=float)
            # A histogram whose bucket e holds expert e's token count: TensorBoard draws the load profile.
            self._writer.add_histogram_raw(
                f"moe/layer_{layer.layer}/tokens_per_expert",
                min=0.0,
                max=float(len(counts) - 1),
                num=float(counts.sum()),
                sum=float((counts * experts).sum()),
                sum_squares=float((counts * experts**2).sum()),
                bucket_limits=(experts + 0.5).tolist(),
                bucket_counts=counts.tolist(),
                global_step=step,
            )
        self._writer.add_image("moe/expert_load", expert_load_image(layers), step, dataformats="HWC")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
