"""Is the platform's training loop as fast as a bare PyTorch loop, and does it ever wait for data?

Two loops over the same model, micro-batch, optimizer settings and Parquet rows, in one run:
  bare      one process: rows read once into memory, MoETransformer + torch AdamW, nothing else
  platform  moe_platform.train on a local Ray: Ray Data streaming -> 1 Ray Train worker ->
            DeepSpeed engine (ZeRO-0 by default, fp32) with metrics, routing statistics and reports
Both pin the same number of intra-op threads. The platform's numbers are its own TensorBoard
metrics (perf/tokens_per_s: training-step time only, data wait included; evaluation,
checkpoint and report time excluded), median over logging intervals after the first.
The bare loop runs before and after the platform (drift in machine load hits both alike).

    python benchmarks/train_throughput.py [--steps 60] [--threads 1] [--d-model 128] [--seq-len 256]

Targets: platform >= 0.9x bare tokens/s; data wait < 2% of step time. The last line is
machine-readable: platform_vs_bare=<ratio> data_wait=<fraction> bare_tok_s=<x> platform_tok_s=<y>
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from moe import ModelConfig, MoEConfig, MoETransformer
from moe_platform.data import DocumentStats, Manifest, ShardInfo, SplitInfo, TokenizerInfo
from moe_platform.train import InitConfig, RunConfig, StageConfig, TrainerConfig

VOCAB = 2048
LR = 1e-3


def model_config(args) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=args.d_model, n_layers=4, n_heads=4, seq_len=args.seq_len,
                       ffn_hidden=args.d_model * 3,
                       moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=args.d_model))


def write_dataset(root: str, rows: int, seq_len: int) -> str:
    """Random-token rows following the prepare job's contract (throughput does not care what they say)."""
    from tokenizers import Tokenizer, models

    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    os.makedirs(os.path.join(root, "validation"), exist_ok=True)
    Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0")).save(
        os.path.join(root, "tokenizer.json"))
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(rows, seq_len + 1), dtype=np.int32)
    splits = {}
    for split, chunk in (("train", tokens), ("validation", tokens[:64])):
        relative = f"{split}/part-00000.parquet"
        pq.write_table(pa.table({"tokens": pa.array(chunk.tolist(), type=pa.list_(pa.int32()))}),
                       os.path.join(root, relative), row_group_size=1024)
        splits[split] = SplitInfo(rows=len(chunk), tokens=int(chunk.size),
                                  shards=[ShardInfo(file=relative, rows=len(chunk), tokens=int(chunk.size))])
    Manifest(seq_len=seq_len, vocab_size=VOCAB,
             tokenizer=TokenizerInfo(file="tokenizer.json", sha256="-", eos_id=0, pad_id=1), splits=splits,
             documents=DocumentStats(read=rows, used=rows, skipped=[], tail_tokens_dropped={}),
             fingerprint=f"random-{rows}-{seq_len}", config={}, created="benchmark").save(root)
    return root


def bare_loop(config: ModelConfig, dataset_dir: str, *, steps: int, batch: int, threads: int,
              interval: int) -> float:
    """Median tokens/s over `interval`-step windows of a plain single-process loop (after 3 warm-up steps).

    Medians over windows, as for the platform, so a burst of load on a shared machine skews neither.
    """
    torch.set_num_threads(threads)
    rows = pq.read_table(os.path.join(dataset_dir, "train", "part-00000.parquet")).column("tokens").to_pylist()
    data = torch.tensor(rows, dtype=torch.long)
    torch.manual_seed(0)
    model = MoETransformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    warmup, rates = 3, []
    for step in range(steps + warmup):
        if step >= warmup and (step - warmup) % interval == 0:
            window_start = time.perf_counter()
        rows_BL = data[(step * batch) % (len(data) - batch):][:batch]
        _, loss = model(rows_BL[:, :-1], targets=rows_BL[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup and (step - warmup + 1) % interval == 0:
            rates.append(interval * batch * config.seq_len / (time.perf_counter() - window_start))
    return statistics.median(rates)


def platform_loop(config: ModelConfig, dataset_dir: str, output_dir: str, *, steps: int, batch: int,
                  threads: int, log_every: int, zero_stage: int) -> tuple[float, float]:
    """(median tokens/s, median data-wait fraction) of moe_platform.train with 1 worker."""
    from moe_platform.train import train
    from moe_platform.train.loop import TENSORBOARD_DIR

    trainer = TrainerConfig(num_workers=1, torch_threads=threads, micro_batch_size=batch, lr=LR, warmup_steps=3,
                            max_steps=steps + log_every, log_every=log_every, report_every=log_every,
                            eval_every=0, eval_batches=1, checkpoint_every=10**6, zero_stage=zero_stage,
                            shuffle_buffer_rows=0)
    stage = StageConfig(model=config, dataset_dir=dataset_dir, trainer=trainer,
                        run=RunConfig(output_dir=output_dir, export=False), init=InitConfig())
    result = train(stage)
    scalars = _scalars(os.path.join(result.output_dir, TENSORBOARD_DIR))
    # The first interval holds the warm-up (first Ray Data blocks, allocator growth): left out.
    tokens_per_s = [value for _, value in scalars["perf/tokens_per_s"]][1:]
    data_wait = [value for _, value in scalars["perf/data_wait_fraction"]][1:]
    return statistics.median(tokens_per_s), statistics.median(data_wait)


def _scalars(tensorboard_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    accumulator = ea.EventAccumulator(tensorboard_dir, size_guidance={ea.SCALARS: 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per loop")
    parser.add_argument("--batch", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of both loops")
    parser.add_argument("--zero-stage", type=int, default=0, help="the platform's ZeRO stage (1 worker: 0 saves copies)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray

    config = model_config(args)
    log_every = max(5, args.steps // 6)
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as root:
        dataset_dir = write_dataset(os.path.join(root, "data"), rows=(args.steps + log_every + 8) * args.batch,
                                    seq_len=args.seq_len)
        before = bare_loop(config, dataset_dir, steps=args.steps, batch=args.batch, threads=args.threads,
                           interval=log_every)
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
        platform, data_wait = platform_loop(config, dataset_dir, os.path.join(root, "run"), steps=args.steps,
                                            batch=args.batch, threads=args.threads, log_every=log_every,
                                            zero_stage=args.zero_stage)
        ray.shutdown()
        after = bare_loop(config, dataset_dir, steps=args.steps, batch=args.batch, threads=args.threads,
                          interval=log_every)
    bare = (before + after) / 2
    print(f"model: {config.num_params / 1e6:.2f}M params ({config.num_active_params / 1e6:.2f}M active), "
          f"micro-batch {args.batch} x {args.seq_len} tokens, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"platform ZeRO-{args.zero_stage}")
    print(f"bare PyTorch loop: {before:,.0f} tok/s before, {after:,.0f} tok/s after the platform run")
    print(f"platform (Ray Data + Ray Train + DeepSpeed, 1 worker): {platform:,.0f} tok/s, "
          f"data wait {100 * data_wait:.2f}% of step time")
    print(f"platform / bare = {platform / bare:.3f} (target >= 0.9; {platform / before:.3f} against the run "
          f"before, {platform / after:.3f} against the run after); data wait target < 2%")
    print(f"platform_vs_bare={platform / bare:.3f} data_wait={data_wait:.4f} bare_tok_s={bare:.0f} "
          f"platform_tok_s={platform:.0f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
