"""What each compression buys and costs: held-out loss vs size vs speed of one export's variants.

Variants of a trained export (default: outputs/pretrain/export from `make run`), all in one run:
  fp32         the export as trained
  int8         dynamic int8 linear layers and experts (moe.quantize; serve.quantize=int8)
  pruned-3/4   the least-used quarter of each layer's experts dropped (moe.prune, usage counted on
               --calibration-batches of the train split)
  pruned-1/2   half of them dropped
  pruned-1/2+int8
  + any --extra export (e.g. a distilled student from jobs/distill.py), with its own label

Per variant: held-out loss and perplexity on the same validation rows, total and active
parameters, weights in MB, generation latency at batch 1 (ms per token) and throughput at
batch 8 (tokens/s), greedy, median of --rounds interleaved rounds (this machine is noisy).
Ratios are against fp32 measured in the same run. No Ray: rows are read from the prepared
Parquet shards directly.

    python benchmarks/compression.py [--export-dir outputs/pretrain/export] [--dataset-dir outputs/dataset]
        [--rounds 5] [--threads 1] [--extra outputs/distill/export]

The last line is machine-readable:
    int8_loss_delta=<d> int8_size_ratio=<r> int8_speedup_b1=<s1> int8_speedup_b8=<s8> pruned_half_loss_delta=<p>
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "platform"))

from moe import load_export, load_export_config  # noqa: E402
from moe.export import is_export, weights_bytes  # noqa: E402
from moe.prune import choose_experts, expert_usage, prune_export  # noqa: E402
from moe.quantize import quantize_int8, model_size_bytes  # noqa: E402
from moe_platform.data import Manifest  # noqa: E402


def rows(dataset_dir: str, split: str, count: int) -> torch.Tensor:
    """(count, seq_len + 1) token rows from the start of a prepared split."""
    manifest = Manifest.load(dataset_dir)
    out = []
    for path in manifest.split_paths(split):
        out += pq.read_table(path, columns=["tokens"]).column("tokens").to_pylist()
        if len(out) >= count:
            break
    return torch.tensor(out[:count], dtype=torch.long)


@torch.no_grad()
def held_out_loss(model, data: torch.Tensor, batch: int = 8) -> float:
    losses = []
    for start in range(0, len(data), batch):
        chunk = data[start:start + batch]
        model(chunk[:, :-1], targets=chunk[:, 1:])
        losses.append(float(model.loss_breakdown["lm"]) * chunk.shape[0])
    return sum(losses) / len(data)


@torch.no_grad()
def generation_seconds(model, prompts: list[list[int]], new_tokens: int) -> float:
    started = time.perf_counter()
    model.generate(prompts, max_new_tokens=new_tokens, temperature=0.0)
    return time.perf_counter() - started


def size_mb(model, export_dir: str, int8: bool) -> float:
    if int8:
        return model_size_bytes(model) / 1e6
    return weights_bytes(export_dir) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", default="outputs/pretrain/export")
    parser.add_argument("--dataset-dir", default="outputs/dataset")
    parser.add_argument("--eval-rows", type=int, default=128)
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extra", action="append", default=[], help="another export to compare (label=dir or dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not is_export(args.export_dir) or not os.path.isfile(os.path.join(args.dataset_dir, "manifest.json")):
        sys.exit(f"{args.export_dir} (an export) or {args.dataset_dir}/manifest.json is missing: run `make run` "
                 "first, or pass --export-dir / --dataset-dir")

    config = load_export_config(args.export_dir)
    held_out = rows(args.dataset_dir, "validation", args.eval_rows)
    calibration = rows(args.dataset_dir, "train", args.calibration_batches * 8)[:, :-1]
    scratch = tempfile.mkdtemp(prefix="moe-compression-")
    base = load_export(args.export_dir)
    usage = expert_usage(base, calibration.split(8))
    variants: dict[str, tuple[str, bool]] = {"fp32": (args.export_dir, False), "int8": (args.export_dir, True)}
    e, k = config.moe.num_experts, config.moe.top_k
    for label, keep in (("pruned-3/4", e * 3 // 4), ("pruned-1/2", e // 2)):
        if keep >= max(k, 1) and config.num_moe_layers:
            directory = os.path.join(scratch, label.replace("/", "_"))
            prune_export(args.export_dir, directory, choose_experts(usage, keep=keep, min_share=None))
            variants[label] = (directory, False)
    if "pruned-1/2" in variants:
        variants["pruned-1/2+int8"] = (variants["pruned-1/2"][0], True)
    for extra in args.extra:
        label, _, directory = extra.rpartition("=")
        variants[label or os.path.basename(os.path.dirname(os.path.abspath(directory)))] = (directory, False)

    models = {}
    for label, (directory, int8) in variants.items():
        model = load_export(directory)
        models[label] = quantize_int8(model) if int8 else model
    prompts_b1 = [held_out[0, :16].tolist()]
    prompts_b8 = [row[:16].tolist() for row in held_out[:8]]
    timings = {label: {"b1": [], "b8": []} for label in models}
    for model in models.values():  # warm-up
        generation_seconds(model, prompts_b1, 2)
    for _ in range(args.rounds):  # interleaved: drift in machine load hits every variant alike
        for label, model in models.items():
            timings[label]["b1"].append(generation_seconds(model, prompts_b1, args.new_tokens))
            timings[label]["b8"].append(generation_seconds(model, prompts_b8, args.new_tokens))

    results = {}
    for label, model in models.items():
        directory, int8 = variants[label]
        b1, b8 = statistics.median(timings[label]["b1"]), statistics.median(timings[label]["b8"])
        results[label] = {
            "loss": held_out_loss(model, held_out), "params": model.config.num_params,
            "active": model.config.num_active_params, "mb": size_mb(model, directory, int8),
            "ms_per_token_b1": 1000 * b1 / args.new_tokens, "tok_s_b8": 8 * args.new_tokens / b8,
            "spread_b8": (max(timings[label]["b8"]) - min(timings[label]["b8"])) / b8,
        }
    ref = results["fp32"]
    print(f"export {args.export_dir}: {config.moe.num_experts} experts top-{config.moe.top_k}, "
          f"{args.eval_rows} held-out rows, {args.threads} thread(s), medians of {args.rounds} rounds")
    print(f"{'variant':<16} {'loss':>7} {'dloss':>7} {'params':>10} {'active':>10} {'MB':>7} {'xsize':>6} "
          f"{'ms/tok b1':>10} {'x b1':>6} {'tok/s b8':>9} {'x b8':>6} {'spread':>7}")
    for label, r in results.items():
        print(f"{label:<16} {r['loss']:>7.4f} {r['loss'] - ref['loss']:>+7.4f} {r['params']:>10,} {r['active']:>10,} "
              f"{r['mb']:>7.2f} {r['mb'] / ref['mb']:>6.2f} {r['ms_per_token_b1']:>10.2f} "
              f"{ref['ms_per_token_b1'] / r['ms_per_token_b1']:>6.2f} {r['tok_s_b8']:>9.1f} "
              f"{r['tok_s_b8'] / ref['tok_s_b8']:>6.2f} {r['spread_b8']:>7.1%}")
    int8 = results["int8"]
    half = results.get("pruned-1/2", ref)
    print(f"int8_loss_delta={int8['loss'] - ref['loss']:.4f} int8_size_ratio={int8['mb'] / ref['mb']:.3f} "
          f"int8_speedup_b1={ref['ms_per_token_b1'] / int8['ms_per_token_b1']:.3f} "
          f"int8_speedup_b8={int8['tok_s_b8'] / ref['tok_s_b8']:.3f} "
          f"pruned_half_loss_delta={half['loss'] - ref['loss']:.4f}")


if __name__ == "__main__":
    main()
