"""Does the default MoE beat the dense model of equal active compute? Trained through the platform.

For every seed and run length, on one prepared dataset, the platform trains (Ray Train +
DeepSpeed, the job defaults of jobs/conf/config.yaml, nothing else changed):
  dense     model.moe.moe_every=0 model.ffn_hidden=<top_k * expert_hidden + shared hidden>
            (the same active FLOPs per token as the MoE)
  moe       the default model
  <name>    any variant given as --variant 'name: override override ...'
then evaluates every export on the held-out split (jobs/evaluate.py's code path) and prints:
  - held-out loss at equal steps, the paired difference to dense per seed, its mean and spread;
  - held-out loss at equal wall-clock: each model's validation curve (every --eval-every steps,
    TensorBoard event times) read at the time the dense run took to finish;
  - routing health of the export on the held-out split: max/mean load per block, smallest
    expert share (x uniform), dead experts;
and writes <out>/results.json and <out>/curves.png (held-out loss against tokens and against time).

    python jobs/prepare.py data.input=~/prose data.dataset_dir=outputs/prose      # any corpus
    python benchmarks/moe_vs_dense.py --dataset-dir outputs/prose --seeds 0 1 2 --steps 200 600

Runs are resumable: a finished run (its export exists) is read back, not retrained, when its
config is the one asked for (else it stops naming the difference); `--only dense` trains a subset. The box
should be otherwise idle for the wall-clock column; the loss columns do not depend on load.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # jobs/ (run from anywhere)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    return name.strip(), overrides.split()


def dense_overrides(config) -> list[str]:
    """The dense model whose feed-forward costs what the MoE's active experts cost per token."""
    moe = config.model.moe
    active_hidden = moe.top_k * moe.expert_hidden + moe.shared_hidden
    return ["model.moe.moe_every=0", f"model.ffn_hidden={active_hidden}"]


def run_one(name: str, overrides: list[str], seed: int, steps: int, args) -> dict:
    from jobs.common import compose_config
    from jobs.pretrain import pretrain_stage
    from moe_platform.train import evaluate_export, train
    from moe_platform.train.trainer import claim_output_dir, with_absolute_paths

    output_dir = os.path.join(args.out, f"{name}_steps{steps}_seed{seed}")
    config = compose_config([
        f"data.dataset_dir={args.dataset_dir}", f"run.output_dir={output_dir}", f"trainer.seed={seed}",
        f"trainer.max_steps={steps}", f"trainer.eval_every={args.eval_every}", "trainer.eval_batches=null",
        f"trainer.checkpoint_every={steps}", *args.common, *overrides,
    ])
    export_dir = os.path.join(output_dir, "export")
    started = time.time()
    stage = pretrain_stage(config)
    if os.path.isfile(os.path.join(export_dir, "config.json")):
        # A finished run is read back only if it was trained with this config (a changed default
        # recipe must not be compared under its old numbers): TrainConfigError names the first difference.
        claim_output_dir(with_absolute_paths(stage))
    else:
        train(stage)
    report = evaluate_export(export_dir, args.dataset_dir, split="validation")
    curve = validation_curve(os.path.join(output_dir, "tensorboard"))
    tokens_per_step = config.trainer.samples_per_step * config.model.seq_len
    return {
        "name": name, "seed": seed, "steps": steps, "overrides": overrides, "loss": report.loss,
        "active_params": config.model.num_active_params, "total_params": config.model.num_params,
        "tokens_per_step": tokens_per_step, "curve": curve, "wall_s": time.time() - started,
        "routing": [{"block": layer.layer, "max_mean": layer.max_mean_load,
                     "min_share_x_uniform": float(layer.load_share.min()) * len(layer.load_share),
                     "dead": layer.dead_experts(0.25)} for layer in report.routing],
    }


def validation_curve(tensorboard_dir: str) -> list[tuple[int, float, float]]:
    """(step, seconds since the first event, val/loss) from the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard_dir, size_guidance={"scalars": 0})
    events.Reload()
    start = min(e.wall_time for tag in events.Tags()["scalars"] for e in events.Scalars(tag))
    return [(e.step, e.wall_time - start, e.value) for e in events.Scalars("val/loss")]


def loss_at_time(curve: list, seconds: float) -> float:
    """Validation loss at `seconds`, linear between evaluations (the last one if later)."""
    points = [(t, loss) for _, t, loss in curve]
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            return l0 + (l1 - l0) * (seconds - t0) / max(t1 - t0, 1e-9)
    return points[-1][1] if seconds >= points[-1][0] else points[0][1]


def summarise(results: list[dict], names: list[str]) -> str:
    lines = []
    for steps in sorted({r["steps"] for r in results}):
        dense = {r["seed"]: r for r in results if r["steps"] == steps and r["name"] == "dense"}
        if not dense:
            lines.append(f"\n({steps} steps: no dense run in this invocation, so no paired differences; "
                         "add dense to --only)")
        lines.append(f"\n== {steps} steps: held-out loss (paired difference to dense of the same seed; "
                     "negative = better than dense)")
        lines.append(f"{'variant':<16}{'seed':>5}{'loss':>9}{'vs dense':>10}{'at dense time':>15}"
                     f"{'max/mean per block':>28}{'min share xU':>14}{'dead':>6}")
        for name in names:
            rows = sorted((r for r in results if r["steps"] == steps and r["name"] == name), key=lambda r: r["seed"])
            diffs, time_diffs = [], []
            for r in rows:
                base = dense.get(r["seed"])
                diff = 100 * (r["loss"] / base["loss"] - 1) if base else float("nan")
                at_time = loss_at_time(r["curve"], base["curve"][-1][1]) if base else float("nan")
                time_diff = 100 * (at_time / base["curve"][-1][2] - 1) if base else float("nan")
                if name != "dense" and base:  # unpaired (e.g. --only without dense): no difference to average
                    diffs.append(diff)
                    time_diffs.append(time_diff)
                routing = r["routing"]
                max_mean = " ".join(f"{block['max_mean']:.2f}" for block in routing)
                min_share = min((block["min_share_x_uniform"] for block in routing), default=float("nan"))
                dead = sum(block["dead"] for block in routing)
                lines.append(f"{name:<16}{r['seed']:>5}{r['loss']:>9.4f}{diff:>+9.2f}%{time_diff:>+14.2f}%"
                             f"{max_mean:>28}{min_share:>14.2f}{dead:>6}")
            if len(diffs) > 1:
                lines.append(f"{name:<16} mean paired difference {statistics.mean(diffs):+.2f}% "
                             f"(sd {statistics.stdev(diffs):.2f}, worst {max(diffs):+.2f}%); at dense's "
                             f"wall-clock {statistics.mean(time_diffs):+.2f}% (worst {max(time_diffs):+.2f}%)")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["steps"] for r in results})
    figure, axes = plt.subplots(len(lengths), 2, figsize=(11, 4 * len(lengths)), squeeze=False)
    colours = {}
    for r in results:
        row = lengths.index(r["steps"])
        colour = colours.setdefault(r["name"], f"C{len(colours)}")
        steps, seconds, losses = zip(*r["curve"])
        label = r["name"] if r["seed"] == min(x["seed"] for x in results) else None
        axes[row][0].plot([s * r["tokens_per_step"] / 1e6 for s in steps], losses, color=colour, label=label, alpha=0.8)
        axes[row][1].plot(seconds, losses, color=colour, label=label, alpha=0.8)
    for row, steps in enumerate(lengths):
        axes[row][0].set(xlabel="training tokens (M)", ylabel="held-out loss", title=f"{steps} steps: loss vs tokens")
        axes[row][1].set(xlabel="wall-clock (s)", ylabel="held-out loss", title=f"{steps} steps: loss vs time")
        axes[row][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", required=True, help="a prepared dataset (jobs/prepare.py)")
    parser.add_argument("--out", default="outputs/moe_vs_dense")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 600])
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--variant", action="append", default=[],
                        help="'name: key=value ...' trained beside dense and the default moe")
    parser.add_argument("--common", nargs="*", default=[], help="overrides applied to every run")
    parser.add_argument("--only", nargs="+", default=None, help="train and report only these variants (names)")
    args = parser.parse_args()
    args.dataset_dir, args.out = os.path.abspath(args.dataset_dir), os.path.abspath(args.out)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.makedirs(args.out, exist_ok=True)

    from jobs.common import compose_config, init_ray

    default = compose_config([f"data.dataset_dir={args.dataset_dir}", *args.common])
    variants = [("dense", dense_overrides(default)), ("moe", []), *map(parse_variant, args.variant)]
    if args.only:
        unknown = set(args.only) - {name for name, _ in variants}
        if unknown:
            parser.error(f"--only {' '.join(sorted(unknown))}: not a variant (dense, moe or a --variant name)")
        variants = [(name, overrides) for name, overrides in variants if name in args.only]
    init_ray()
    results = []
    for steps in args.steps:
        for seed in args.seeds:
            for name, overrides in variants:
                results.append(run_one(name, overrides, seed, steps, args))
                print(f"{name} steps={steps} seed={seed}: held-out loss {results[-1]['loss']:.4f}", flush=True)
                with open(os.path.join(args.out, "results.json"), "w") as fh:
                    json.dump(results, fh, indent=1)
    print(summarise(results, [name for name, _ in variants]))
    plot(results, os.path.join(args.out, "curves.png"))
    print(f"\nresults {os.path.join(args.out, 'results.json')}\nchart   {os.path.join(args.out, 'curves.png')}")


if __name__ == "__main__":
    main()
