"""The per-worker training loop that Ray Train runs (`train_loop_per_worker`).

One stage, on every worker:

    build the model (seeded, identical on all ranks; or weights from init.export_dir)
    -> DeepSpeed engine (ZeRO, AdamW, warmup + cosine)
    -> resume engine, RNG and data position from ray.train.get_checkpoint(), if any
    -> until plan.total_steps: grad_accum micro-batches -> optimizer step -> router bias update
       every log_every:        loss terms, lr, grad norm, tokens/s, MFU, routing stats -> TensorBoard
       every eval_every:       validation loss / perplexity
       every report_every:     ray.train.report(scalars)  (+ a checkpoint every checkpoint_every)

Every collective (all-reduce of metrics, evaluation, checkpoint) happens at steps
all ranks compute identically, so no rank waits for one that skipped it.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Optional

import torch

from moe.parallel import ALL_TO_ALL
from moe_platform.train.checkpointing import TrainState, checkpoint_dir_name, restore_checkpoint, write_checkpoint
from moe_platform.train.config import StageConfig
from moe_platform.train.batches import train_stream, validation_batches, validation_name
from moe_platform.train.engine import (
    build_engine,
    init_deepspeed_comm,
    intra_op_threads,
    keep_large_blocks_on_heap,
    use_bf16,
)
from moe_platform.train.evaluation import combine_validation, distributed_validation_sums
from moe_platform.train.metrics import (
    TensorBoardLog,
    ThroughputMeter,
    aggregate_routing,
    all_reduce_sum,
    measured_matmul_flops,
    routing_scalars,
)
from moe_platform.train.model_io import build_model, load_export_weights, write_model_export
from moe_platform.train.objective import build_objective
from moe_platform.train.plan import TrainPlan

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on each worker: {"stage": StageConfig, "plan": TrainPlan}."""
    _quiet_report_logs()
    _StageRun(loop_config["stage"], loop_config["plan"]).run()


def _quiet_report_logs() -> None:
    """Ray Train logs every report with its whole metrics dict at INFO on every worker; the
    driver's progress line (progress.py) says the same in one line. Its warnings still show."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a Ray version that moved it: keep its logs
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class _StageRun:
    def __init__(self, stage: StageConfig, plan: TrainPlan):
        import ray.train

        self.stage, self.plan, self.trainer = stage, plan, stage.trainer
        self._join_worker_group()
        checkpoint = ray.train.get_checkpoint()
        self._build_model_and_engine(from_export=checkpoint is None)
        self.state = self._resume(checkpoint) if checkpoint is not None else self._fresh_start()
        self._build_data_streams()
        self._build_logging()

    # ---- start ---------------------------------------------------------------------------------

    def _join_worker_group(self) -> None:
        """This worker's rank, device and threads, and DeepSpeed's view of the process group."""
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.set_num_threads(intra_op_threads(self.trainer.torch_threads, context.get_local_world_size()))
        if self.device.type == "cpu":
            keep_large_blocks_on_heap()
        init_deepspeed_comm("nccl" if self.trainer.use_gpu else "gloo")

    def _build_model_and_engine(self, *, from_export: bool) -> None:
        """The model (initial weights, then PEFT), the DeepSpeed engine around it, and the objective."""
        stage = self.stage
        # Same seed on every rank: replicated weights start identical (DeepSpeed also broadcasts them).
        torch.manual_seed(self.trainer.seed)
        self.model = build_model(stage.model, expert_parallel_size=self.trainer.expert_parallel_size,
                                 device=self.device)
        if from_export and stage.init.export_dir:
            load_export_weights(self.model, stage.init.export_dir)
        if stage.peft.enabled:
            # After the initial weights, before the engine: DeepSpeed's optimizer sees only what trains.
            from moe.peft import apply_peft

            counts = apply_peft(self.model, stage.peft)
            if self.rank == 0:
                log.info("peft: %s trainable of %s parameters on this rank", f"{counts['trainable']:,}",
                         f"{counts['total']:,}")
        self.engine = build_engine(self.model, self.trainer, total_steps=self.plan.total_steps)
        self.objective = build_objective(stage, self.device)
        self.terms = tuple(self.objective.terms)

    def _fresh_start(self) -> TrainState:
        # Per-rank streams from here on (router jitter etc.); checkpoints restore them exactly.
        torch.manual_seed(self.trainer.seed + 1 + self.rank)
        return TrainState()

    def _resume(self, checkpoint) -> TrainState:
        with checkpoint.as_directory() as directory:
            state = restore_checkpoint(self.engine, directory, self.rank, self.world_size)
        log.info("rank %d resumed at step %d (epoch %d, batch %d) from %s", self.rank, state.step,
                 state.position.epoch, state.position.batches_in_epoch, checkpoint.path)
        return state

    def _build_data_streams(self) -> None:
        """The weighted mixture of the tasks' train streams (one task for a single dataset), at the
        state's positions, and each task's validation shard."""
        import ray.train

        tasks = self.plan.tasks
        self.batches = train_stream(self.plan, ray.train.get_dataset_shard, trainer=self.trainer, rank=self.rank,
                                    device=self.device, position=self.state.position,
                                    task_positions=self.state.task_positions)
        self.tasks = {task.name: task for task in tasks}
        self.validation_shards = {task.name: ray.train.get_dataset_shard(validation_name(task.name))
                                  for task in tasks if task.eval_batches}
        self._validation_cache: Optional[dict[str, list[dict]]] = None

    def _build_logging(self) -> None:
        """TensorBoard (rank 0), the throughput meter and the running sums of a logging interval."""
        self.tensorboard = TensorBoardLog(
            os.path.join(self.stage.run.output_dir, TENSORBOARD_DIR) if self.rank == 0 else None,
            purge_step=self.state.step + 1 if self.state.step else None,
        )
        self.meter = ThroughputMeter(
            tokens_per_step=self.plan.tokens_per_step,
            train_flops_per_token=self.stage.model.flops_per_token,
            peak_flops=lambda: self._peak_flops_per_worker() * self.world_size,
        )
        self._interval_sums = torch.zeros(len(self.terms) + 1, dtype=torch.float64, device=self.device)
        self._interval_micro_batches = 0
        self._routing_collected = False
        self._comm: dict[str, float] = {}  # expert-parallel all-to-all cost of the last logging step
        self.latest: dict[str, float] = {}

    def _peak_flops_per_worker(self) -> float:
        """trainer.peak_flops_per_worker, or this worker's measured matmul rate (every worker alike)."""
        if self.trainer.peak_flops_per_worker is not None:
            return self.trainer.peak_flops_per_worker
        dtype = torch.bfloat16 if use_bf16(self.trainer) else torch.float32
        peak = measured_matmul_flops(self.device, dtype)
        if self.rank == 0:
            log.info("MFU against this worker's measured matmul peak, %.3g FLOP/s in %s "
                     "(trainer.peak_flops_per_worker sets it)", peak, str(dtype).removeprefix("torch."))
        return peak

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        if self.state.step >= self.plan.total_steps:
            log.info("rank %d: the run already finished (%d steps); nothing to train", self.rank, self.state.step)
            return
        try:
            while self.state.step < self.plan.total_steps:
                step = self.state.step + 1
                self._train_step(collect_routing=self._log_due(step))
                self._maybe_fail(step)
                self._after_step(step)
        finally:
            self.tensorboard.close()

    def _train_step(self, *, collect_routing: bool) -> None:
        # Routing statistics cost a sync and a copy: only on steps that log them.
        self.model.set_routing_stats(collect_routing)
        self._routing_collected = collect_routing
        self._lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler steps after it)
        # Only the native backend's all-to-alls are ours to measure (DeepSpeed's run inside its MoE layer).
        measure_comm = (collect_routing and self.trainer.expert_parallel_size > 1
                        and self.stage.model.moe.backend == "native")
        if measure_comm:
            ALL_TO_ALL.start()
        started = time.perf_counter()
        data_wait = 0.0
        for _ in range(self.trainer.grad_accum_steps):
            waited_from = time.perf_counter()
            batch = next(self.batches)
            data_wait += time.perf_counter() - waited_from
            output = self.objective(self.engine, batch)
            self.engine.backward(output.loss)
            self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            self._accumulate(output)
        self.model.update_router_bias()
        self.state.step += 1
        self.state.tokens += self.plan.tokens_per_step
        self.state.position, self.state.task_positions = self.batches.position, self.batches.task_positions
        seconds = time.perf_counter() - started
        self.meter.add_step(seconds, data_wait)
        if measure_comm:
            sent, comm_seconds = ALL_TO_ALL.stop()
            self._comm = {"perf/all_to_all_bytes_per_step": float(sent),
                          "perf/all_to_all_time_fraction": comm_seconds / max(seconds, 1e-9)}

    def _accumulate(self, output) -> None:
        # Summed where the loss lives: no host sync per micro-batch on a GPU.
        zero = torch.zeros((), device=output.loss.device)
        terms = [output.loss.detach()] + [output.metrics.get(name, zero) for name in self.terms]
        self._interval_sums += torch.stack([t.detach().double() for t in terms])
        self._interval_micro_batches += 1

    def _due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.plan.total_steps

    def _report_due(self, step: int) -> bool:
        return self._due(step, self.trainer.report_every) or self._due(step, self.trainer.checkpoint_every)

    def _log_due(self, step: int) -> bool:
        """Reports carry fresh metrics, so a report step is a logging step too."""
        return self._due(step, self.trainer.log_every) or self._report_due(step)

    def _after_step(self, step: int) -> None:
        if self._log_due(step):
            self._log_training(step)
        if step == self.plan.total_steps or (self.trainer.eval_every and step % self.trainer.eval_every == 0):
            self._validate(step)
        if self._report_due(step):
            self._report(step, with_checkpoint=self._due(step, self.trainer.checkpoint_every))

    # ---- metrics ---------------------------------------------------------------------------------

    def _log_training(self, step: int) -> None:
        """All ranks: average the interval's losses over ranks; rank 0 writes TensorBoard."""
        sums = self._interval_sums.cpu()
        count = torch.tensor([float(self._interval_micro_batches)], dtype=torch.float64)
        packed = all_reduce_sum(torch.cat([sums, count]))
        means = packed[:-1] / packed[-1].clamp(min=1.0)
        self._interval_sums.zero_()
        self._interval_micro_batches = 0
        scalars = {
            "train/loss": float(means[0]),
            **{f"train/{name}_loss": float(value) for name, value in zip(self.terms, means[1:])},
            "train/lr": float(self._lr),
            "train/grad_norm": _as_float(self.engine.get_global_grad_norm()),
            **{f"perf/{name}": value for name, value in self.meter.snapshot().items()},
            **self._comm_means(),
            "progress/tokens": float(self.state.tokens),
            "progress/epoch": float(self.state.position.epoch),
        }
        # Loads cover the whole interval (every micro-batch of every worker); entropy and dropped
        # fraction describe the step's last micro-batch.
        window_load = self.model.pop_expert_load()
        routing = aggregate_routing(self.model.routing_stats(), all_reduce=True,
                                    window_load=window_load) if self._routing_collected else []
        routing_values = routing_scalars(routing, self.trainer.dead_expert_threshold)
        self.tensorboard.scalars(step, scalars)
        self.tensorboard.routing(step, routing, self.trainer.dead_expert_threshold)
        self.tensorboard.flush()
        self.latest.update(scalars)
        # Reports carry the health numbers, so the driver's progress line can warn about dead experts.
        self.latest.update({k: v for k, v in routing_values.items() if k.endswith(("dead_experts", "max_mean_load"))})

    def _comm_means(self) -> dict[str, float]:
        """The logging step's all-to-all bytes (per rank) and time share, averaged over ranks.
        Every rank has the same keys (all measure the same steps), so the all-reduce matches."""
        if not self._comm:
            return {}
        keys = sorted(self._comm)
        means = all_reduce_sum(torch.tensor([self._comm[k] for k in keys], dtype=torch.float64)) / self.world_size
        return dict(zip(keys, means.tolist()))

    def _validate(self, step: int) -> None:
        if not self.plan.eval_batches:
            return
        sums = {task: distributed_validation_sums(self.engine, batches)
                for task, batches in self._validation_batches().items()}
        values = combine_validation(sums)
        self.tensorboard.scalars(step, values)
        self.tensorboard.flush()
        self.latest.update(values)
        if self.rank == 0:
            log.info("step %d: validation loss %.4f, perplexity %.2f", step, values["val/loss"],
                     values["val/perplexity"])

    def _validation_batches(self) -> dict[str, list[dict]]:
        """Read once, then kept: a fresh Ray Data execution per evaluation costs seconds."""
        if self._validation_cache is None:
            self._validation_cache = {
                task: list(validation_batches(shard, self.tasks[task], batch_size=self.trainer.micro_batch_size,
                                              device=self.device))
                for task, shard in self.validation_shards.items()
            }
        return self._validation_cache

    # ---- reporting and checkpoints ---------------------------------------------------------------

    def _report(self, step: int, *, with_checkpoint: bool) -> None:
        import ray.train

        metrics = {**self.latest, "step": step, "total_steps": self.plan.total_steps}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        directory = write_checkpoint(
            engine=self.engine,
            state=self.state,
            rank=self.rank,
            world_size=self.world_size,
            expert_parallel_size=self.trainer.expert_parallel_size,
            stage_dict=self.stage.to_dict(),
            metrics=self.latest,
            write_model_export=lambda target: write_model_export(
                self.model, target, tokenizer_path=self.plan.tokenizer_path, rank=self.rank,
                peft=self.stage.peft, base_export_dir=self.stage.init.export_dir),
        )
        try:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=checkpoint_dir_name(step),
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _maybe_fail(self, step: int) -> None:
        """Test hook (trainer.fail_at_step): the last rank dies abruptly, once per run directory."""
        if self.trainer.fail_at_step != step or self.rank != self.world_size - 1:
            return
        marker = os.path.join(self.stage.run.output_dir, f".failed_at_step_{step}")
        if os.path.exists(marker):
            return
        with open(marker, "w") as fh:
            fh.write(f"rank {self.rank} exited on purpose after step {step}\n")
        log.warning("trainer.fail_at_step=%d: rank %d exits now (test hook)", step, self.rank)
        os._exit(1)


def _as_float(value) -> float:
    if value is None:
        return 0.0
    return float(value.item() if torch.is_tensor(value) else value)
