"""Is a default training run as fast as a bare PyTorch loop on the same model, data and steps?

Two runs of the same default model (jobs/conf/config.yaml's model section), micro-batch and
steps over the same prepared dataset, side by side in one process:
  bare      one process, torch's default thread count: rows read once into memory,
            MoETransformer + torch AdamW + warmup/cosine + clipping, nothing else
  platform  what `python jobs/pretrain.py` runs with its DEFAULT trainer settings: Ray Data
            streaming with the shuffle buffer -> 1 Ray Train worker (its default intra-op threads,
            trainer.torch_threads=null) -> DeepSpeed engine at ZeRO-1, metrics, reports, validation
            and checkpoints at their default cadence, the export at the end
Both are timed from start to finish (the whole wall-clock of the run; for the platform, from
`train()` to its return on an already started Ray). The platform's data wait is its own
TensorBoard metric (perf/data_wait_fraction, median over logging intervals after the first).
The bare loop runs before and after the platform (drift in machine load hits both alike).

    python jobs/prepare.py                                 # the default dataset (outputs/dataset)
    python benchmarks/train_throughput.py [--dataset-dir outputs/dataset] [--steps 200]

Targets: platform >= 0.9x bare; data wait < 2% of step time. The step loops' own rates are
printed too: the fixed cost (Ray Train's actors, engine set-up, validation, export) is paid once,
so a longer run's ratio approaches theirs. The last line is machine-readable:
platform_vs_bare=<ratio> data_wait=<fraction> bare_s=<seconds> platform_s=<seconds>
step_loop_vs_bare=<ratio>
"""
from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import statistics
import sys
import tempfile
import time

import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # jobs/

from moe import MoETransformer
from moe.parallel import optimizer_param_groups
from moe_platform.train.engine import warmup_cosine


def bare_loop(config, dataset_dir: str, *, steps: int) -> tuple[float, float]:
    """(seconds for `steps` optimizer steps of a plain loop, data loading and model build included;
    tokens/s of its step loop alone)."""
    started = time.perf_counter()
    trainer, model_config = config.trainer, config.model
    files = sorted(glob.glob(os.path.join(dataset_dir, "train", "*.parquet")))
    data = torch.tensor([row for f in files for row in pq.read_table(f).column("tokens").to_pylist()])
    torch.manual_seed(trainer.seed)
    model = MoETransformer(model_config)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, trainer.weight_decay), lr=trainer.lr,
                                  betas=(trainer.beta1, trainer.beta2), eps=trainer.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
        step, warmup_steps=trainer.warmup_steps, total_steps=steps, min_lr_ratio=trainer.min_lr_ratio))
    order = torch.randperm(len(data))
    batch = trainer.micro_batch_size
    loop_started = time.perf_counter()
    for step in range(steps):
        index = order[(step * batch) % (len(data) - batch):][:batch]
        rows_BL = data[index].long()
        _, loss = model(rows_BL[:, :-1], targets=rows_BL[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_router_bias()
    finished = time.perf_counter()
    return finished - started, steps * batch * model_config.seq_len / (finished - loop_started)


def platform_run(config, output_dir: str) -> tuple[float, float, float]:
    """(seconds, median data-wait fraction, median step-loop tokens/s) of the pretraining job's
    training call; the medians skip the first logging interval (start-up)."""
    from jobs.pretrain import pretrain_stage
    from moe_platform.train import train
    from moe_platform.train.loop import TENSORBOARD_DIR

    config.run.output_dir = output_dir
    started = time.perf_counter()
    result = train(pretrain_stage(config))
    seconds = time.perf_counter() - started
    scalars = _scalars(os.path.join(result.output_dir, TENSORBOARD_DIR))
    data_wait = [value for _, value in scalars["perf/data_wait_fraction"]][1:]
    tokens_per_s = [value for _, value in scalars["perf/tokens_per_s"]][1:]
    return (seconds, statistics.median(data_wait) if data_wait else math.nan,
            statistics.median(tokens_per_s) if tokens_per_s else math.nan)


def _scalars(tensorboard_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    accumulator = ea.EventAccumulator(tensorboard_dir, size_guidance={ea.SCALARS: 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset-dir", default="outputs/dataset", help="a prepared dataset (jobs/prepare.py)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of both runs (the job default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from jobs.common import compose_config, init_ray

    dataset_dir = os.path.abspath(args.dataset_dir)
    if not glob.glob(os.path.join(dataset_dir, "train", "*.parquet")):
        parser.error(f"no prepared dataset at --dataset-dir {dataset_dir} (no train/*.parquet): "
                     "run `python jobs/prepare.py` first or name one")
    config = compose_config([f"data.dataset_dir={dataset_dir}", f"trainer.max_steps={args.steps}"])
    before, before_rate = bare_loop(config, dataset_dir, steps=args.steps)
    init_ray()
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as root:
        platform, data_wait, platform_rate = platform_run(config, os.path.join(root, "run"))
    after, after_rate = bare_loop(config, dataset_dir, steps=args.steps)
    bare, bare_rate = (before + after) / 2, (before_rate + after_rate) / 2
    model = config.model
    print(f"model: {model.num_params / 1e6:.2f}M params ({model.num_active_params / 1e6:.2f}M active), "
          f"{args.steps} steps of {config.trainer.micro_batch_size} x {model.seq_len} tokens, "
          f"{os.cpu_count()} CPUs, bare loop at torch's default {torch.get_num_threads()} threads")
    print(f"bare PyTorch loop: {before:.1f} s before, {after:.1f} s after the platform run")
    print(f"platform (jobs/pretrain.py defaults: Ray Data + Ray Train + DeepSpeed ZeRO-1, validation, "
          f"checkpoints, export): {platform:.1f} s, data wait {100 * data_wait:.2f}% of step time")
    print(f"platform speed / bare = {bare / platform:.3f} (target >= 0.9; {before / platform:.3f} against the "
          f"run before, {after / platform:.3f} against the run after); data wait target < 2%")
    print(f"step loops alone (what a long run approaches): platform {platform_rate:,.0f} tokens/s (median "
          f"over logging intervals), bare {before_rate:,.0f} and {after_rate:,.0f} -> {platform_rate / bare_rate:.3f}")
    print(f"platform_vs_bare={bare / platform:.3f} data_wait={data_wait:.4f} bare_s={bare:.1f} "
          f"platform_s={platform:.1f} step_loop_vs_bare={platform_rate / bare_rate:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
