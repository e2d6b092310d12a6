"""How fast is one MoE layer, forward + backward, against a dense SwiGLU of equal active FLOPs?

Variants, run interleaved round by round, in snake order (so drift in machine load hits all alike):
  native        moe.layer.MoELayer, backend=native (sorted dropless dispatch, grouped GEMM)
  ds_dropless   moe.layer.MoELayer, backend=deepspeed, capacity_factor=0 (drop_tokens=False)
  ds_cap1.0     backend=deepspeed, capacity_factor=1.0   (reports its token drop rate)
  ds_cap1.25    backend=deepspeed, capacity_factor=1.25
  hf_loop       a per-expert python loop in the style of HF Mixtral's MixtralSparseMoeBlock
  dense         one SwiGLU with hidden top_k * expert_hidden (the same active FLOPs)
at T tokens, D=512, for three shapes of equal active FLOPs (E=8 k=2 F=1024; E=32 k=4 F=512;
E=64 k=8 F=256). Memory: peak allocated on CUDA; on CPU (no allocator statistics) the bytes
autograd saves for backward, the part of the peak that differs between variants.

    python benchmarks/moe_layer.py [--rounds 9] [--dtype bf16 --device cuda]
    python benchmarks/moe_layer.py --threads 1 --clock process   # a CPU box shared with other jobs

On CPU, `--clock process` times this process's CPU time instead of wall time: with one
thread it is what the layer costs, and other processes on the machine barely move it.
Also on CPU (unless --no-malloc-tuning) glibc is told not to mmap large blocks and never to
trim its heap, and 3 GB of heap (--heap-gib) is faulted in before timing: otherwise fresh
pages fault in on first touch inside timed steps (a 64 MB gather ran 5x slower than the copy
itself; a native step that grew the heap by 32 MB took 100 ms longer). Training workers on CPU
set the same allocator policy (moe_platform.train.engine.keep_large_blocks_on_heap) and reach
this steady state after their first steps; the pre-faulted heap only skips that growth here. It
applies to every variant alike.

The last line is machine-readable:
    native_vs_dense=<r8>,<r32>,<r64> deepspeed_dropless_vs_native=<d8>,<d32>,<d64>
(ratios of median times: native / dense, and deepspeed dropless / native).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.config import ModelConfig, MoEConfig
from moe.experts import SwiGLU
from moe.layer import MoELayer

SHAPES = ((8, 2, 1024), (32, 4, 512), (64, 8, 256))  # (E, K, F)
D_MODEL = 512


def make_config(e: int, k: int, f: int, backend: str, capacity_factor: float = 0.0) -> ModelConfig:
    return ModelConfig(d_model=D_MODEL, n_heads=8, moe=MoEConfig(
        num_experts=e, top_k=k, expert_hidden=f, backend=backend, capacity_factor=capacity_factor))


class HFLoopMoE(nn.Module):
    """Mixtral-style: for each expert, find its tokens with torch.where and run them."""

    def __init__(self, layer: MoELayer, k: int) -> None:
        super().__init__()
        self.k = k
        self.gate = nn.Linear(D_MODEL, layer.router_weight.shape[0], bias=False)
        w = layer.experts.local_weights()
        with torch.no_grad():
            self.gate.weight.copy_(layer.router_weight)  # the same routing as the MoE layers
        self.experts = nn.ModuleList()
        for j in range(w["w1"].shape[0]):
            expert = SwiGLU(D_MODEL, w["w1"].shape[1])
            with torch.no_grad():
                for name in ("w1", "w2", "w3"):
                    getattr(expert, name).weight.copy_(w[name][j])
            self.experts.append(expert)

    def forward(self, x_BTD: Tensor) -> Tensor:
        x = x_BTD.reshape(-1, D_MODEL)
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, selected = probs.topk(self.k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        expert_mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)  # (E, K, T)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(expert_mask[e])
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.view_as(x_BTD)


def saved_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes of distinct storages autograd keeps for backward during fn()."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def same_initial_weights(layers: list[MoELayer], std: float) -> None:
    """One draw of Normal(0, std) weights (the model's init, moe/state.py) loaded into every MoE
    variant: a bare MoELayer's native weights are torch.empty (the model loads its own), and
    an uninitialised (zero or NaN) router sends every token to the same k experts, which would
    time a different, GEMM-friendlier layer. Same weights, same routing for every variant."""
    sd = {key: torch.randn_like(t) * std for key, t in layers[0].canonical_state("").items()}
    for layer in layers:
        layer.load_canonical_state(sd, "")


def build_variants(e: int, k: int, f: int, device, dtype) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    variants: dict[str, nn.Module] = {"native": MoELayer(make_config(e, k, f, "native"))}
    for name, cf in (("ds_dropless", 0.0), ("ds_cap1.0", 1.0), ("ds_cap1.25", 1.25)):
        variants[name] = MoELayer(make_config(e, k, f, "deepspeed", cf))
    same_initial_weights(list(variants.values()), make_config(e, k, f, "native").init_std)
    variants["hf_loop"] = HFLoopMoE(variants["native"], k)
    variants["dense"] = SwiGLU(D_MODEL, k * f)
    for m in variants.values():
        m.to(device=device, dtype=dtype).train()
        for layer in m.modules():
            if isinstance(layer, MoELayer):
                layer.collect_stats = True  # for the drop rate; costs one small host copy per call
    return variants


def step(module: nn.Module, x: Tensor, grad: Tensor) -> Tensor:
    x.grad = None
    module.zero_grad(set_to_none=True)  # as a training step would: no gradient accumulation
    y = module(x)
    y.backward(grad)
    return y


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def clock() -> float:
    return time.process_time() if ARGS.clock == "process" else time.perf_counter()


def tune_cpu_malloc(heap_gib: float) -> None:
    """The training workers' allocator policy (large blocks stay on glibc's heap, which is never
    trimmed), then `heap_gib` of heap faulted in before timing. glibc 2.36's posix_memalign
    (every torch CPU tensor) asks for 64 + 32 bytes more than a freed block of the same size
    offers, so the heap keeps growing for many steps, and every growth is fresh pages faulted in
    during a timed step (on this VM ~100 ms per 32 MB). A training run reaches the steady state
    after its first steps; the benchmark reaches it by touching its working set once up front."""
    from moe_platform.train.engine import keep_large_blocks_on_heap

    keep_large_blocks_on_heap()
    blocks = [torch.zeros(8 << 20) for _ in range(int(heap_gib * 32))]  # 32 MB each
    del blocks  # freed in order: they coalesce into the heap's top, faulted in and kept


def bench_shape(e: int, k: int, f: int, args) -> dict[str, dict]:
    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    variants = build_variants(e, k, f, device, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, args.tokens, D_MODEL, generator=g).to(device, dtype).requires_grad_()
    grad = torch.randn(1, args.tokens, D_MODEL, generator=g).to(device, dtype)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(2):  # warm-up: first-use costs, and the allocator growing to its working set
        for m in variants.values():
            step(m, x, grad)
    names = list(variants)
    for r in range(args.rounds):
        # Snake order (forward, then backward): no variant always runs right after the same one.
        for name in names if r % 2 == 0 else names[::-1]:
            m = variants[name]
            sync(device)
            t0 = clock()
            step(m, x, grad)
            sync(device)
            times[name].append(clock() - t0)
    results = {}
    for name, m in variants.items():
        results[name] = {"times": times[name], "memory": measure_memory(m, x, grad, device)}
        stats = [layer.stats for layer in m.modules() if isinstance(layer, MoELayer)]
        results[name]["dropped"] = stats[0]["dropped_fraction"] if stats else None
    return results


def measure_memory(m: nn.Module, x: Tensor, grad: Tensor, device) -> int:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step(m, x, grad)
        return torch.cuda.max_memory_allocated()
    return saved_bytes(lambda: m(x))


def report(shape, results) -> None:
    e, k, f = shape
    print(f"\nE={e} k={k} F={f}  (T={ARGS.tokens}, D={D_MODEL}, {ARGS.dtype}, {ARGS.device})")
    print(f"  {'variant':<12} {'median ms':>10} {'min':>8} {'max':>8} {'vs dense':>9} {'mem MB':>8} {'dropped':>8}")
    dense = statistics.median(results["dense"]["times"])
    for name, r in results.items():
        t = r["times"]
        med = statistics.median(t)
        dropped = "" if r["dropped"] is None else f"{r['dropped']:.3f}"
        print(f"  {name:<12} {med * 1e3:10.1f} {min(t) * 1e3:8.1f} {max(t) * 1e3:8.1f} {med / dense:9.2f} "
              f"{r['memory'] / 2**20:8.1f} {dropped:>8}")


def main() -> None:
    all_results = []
    for shape in SHAPES:
        results = bench_shape(*shape, ARGS)
        report(shape, results)
        all_results.append(results)
    mem_note = "peak allocated" if torch.device(ARGS.device).type == "cuda" else "saved for backward"
    print(f"\n(mem MB = {mem_note}; times ({ARGS.clock} clock, {torch.get_num_threads()} threads) are forward + "
          f"backward of one layer, medians of {ARGS.rounds} rounds)")
    med = lambda r, n: statistics.median(r[n]["times"])  # noqa: E731
    nvd = ",".join(f"{med(r, 'native') / med(r, 'dense'):.2f}" for r in all_results)
    dvn = ",".join(f"{med(r, 'ds_dropless') / med(r, 'native'):.2f}" for r in all_results)
    print(f"native_vs_dense={nvd} deepspeed_dropless_vs_native={dvn}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="wall time, or this process's CPU time (CPU only; use with --threads 1)")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc alone: default mmap threshold, no pre-faulted heap (CPU)")
    p.add_argument("--heap-gib", type=float, default=3.0, help="heap to fault in before timing (CPU)")
    return p.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
    if ARGS.clock == "process" and torch.device(ARGS.device).type != "cpu":
        raise SystemExit("--clock process measures CPU time; use the wall clock on an accelerator.")
    if torch.device(ARGS.device).type == "cpu" and not ARGS.no_malloc_tuning:
        tune_cpu_malloc(ARGS.heap_gib)
    main()
