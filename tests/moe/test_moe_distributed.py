"""Multi-rank CPU tests: 2 spawned processes, gloo, real `deepspeed.initialize` with ZeRO.

One spawn runs everything (spawning and DeepSpeed start-up dominate the cost): for each
backend, the same weights and the same global batches train with EP=1 (ZeRO-1), EP=2
(ZeRO-1) and EP=2 (ZeRO-2); rank 0 writes the all-reduced losses, and the EP=2 model's
export plus its logits, for the test process to compare.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from testkit.models import tiny_model

from moe import ModelConfig, MoETransformer, load_export, optimizer_param_groups, save_export
from moe.parallel import ALL_TO_ALL
from moe.testing import run_distributed_test

STEPS = 4
WORLD = 2
MICRO = 2  # sequences per rank per step
COMM: dict[str, tuple[int, float]] = {}  # run -> (bytes sent, seconds) of rank 0's first step


def tiny_config(backend: str) -> ModelConfig:
    # No router bias on either backend (DeepSpeed's gate has none): the two compute one model.
    return tiny_model(n_heads=4, seq_len=16, ffn_hidden=48, expert_hidden=24, backend=backend, num_shared_experts=1,
                      balance_loss_coef=0.01, z_loss_coef=0.001, bias_update_rate=0.0)


def global_batches(config: ModelConfig) -> torch.Tensor:
    """The same random global batch every step: memorising it makes the loss fall fast,
    so the weights (and the routes) move visibly between steps."""
    g = torch.Generator().manual_seed(123)
    batch = torch.randint(0, config.vocab_size, (WORLD * MICRO, config.seq_len + 1), generator=g)
    return batch.expand(STEPS, -1, -1)


def train(backend: str, ep: int, zero_stage: int, out: Path) -> list[float]:
    import deepspeed
    import torch.distributed as dist

    config = tiny_config(backend)
    torch.manual_seed(0)  # the same initial weights for every EP size and backend
    model = MoETransformer(config, expert_parallel_size=ep)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, weight_decay=0.0), lr=3e-2)
    ds_config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": zero_stage, "contiguous_gradients": True, "reduce_scatter": True},
                 "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    rank = dist.get_rank()
    losses = []
    for step, batch in enumerate(global_batches(config)):
        if step == 0:
            ALL_TO_ALL.start()  # what the first step's expert all-to-alls send and take
        mine = batch[rank * MICRO:(rank + 1) * MICRO]
        _, loss = engine(mine[:, :-1], mine[:, 1:])
        engine.backward(loss)
        engine.step()
        if step == 0:
            COMM[f"{backend}_ep{ep}_zero{zero_stage}"] = ALL_TO_ALL.stop()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / WORLD)
    if ep == 2 and zero_stage == 2:
        checkpoint_round_trip(engine, model, ds_config, out / f"ckpt_{backend}")
    if ep == 2 and zero_stage == 1:
        model.eval()
        probe = global_batches(config)[0, :, :-1]
        with torch.no_grad():
            logits, _ = model(probe)
        save_export(model, out / f"export_{backend}")  # collective: gathers the experts over EP
        if rank == 0:
            torch.save(logits, out / f"logits_{backend}.pt")
    return losses


def checkpoint_round_trip(engine, model: MoETransformer, ds_config: dict, ckpt: Path) -> None:
    """DeepSpeed's own checkpoint (per-expert files) restores the module in a fresh engine."""
    import deepspeed
    import torch.distributed as dist

    engine.save_checkpoint(str(ckpt), tag="t")
    torch.manual_seed(1)  # different initial weights
    fresh = MoETransformer(model.config, expert_parallel_size=model.expert_parallel_size)
    optimizer = torch.optim.AdamW(optimizer_param_groups(fresh), lr=3e-2)
    fresh_engine, *_ = deepspeed.initialize(model=fresh, optimizer=optimizer, config=ds_config)
    fresh_engine.load_checkpoint(str(ckpt), tag="t", load_module_only=True)
    before, after = model.canonical_state_dict(), fresh.canonical_state_dict()
    if dist.get_rank() == 0:
        result = {"same": all(torch.equal(before[k], after[k]) for k in before),
                  "files": sorted(p.name for p in (ckpt / "t").iterdir())}
        (ckpt.parent / f"{ckpt.name}.json").write_text(json.dumps(result))


def _worker(out_dir: str) -> None:
    import torch.distributed as dist

    out = Path(out_dir)
    results = {}
    for backend in ("native", "deepspeed"):
        for ep, stage in ((1, 1), (2, 1), (2, 2)):
            results[f"{backend}_ep{ep}_zero{stage}"] = train(backend, ep, stage, out)
    reload_at_ep2(out)
    if dist.get_rank() == 0:
        (out / "losses.json").write_text(json.dumps(results))
        (out / "comm.json").write_text(json.dumps(COMM))


def reload_at_ep2(out: Path) -> None:
    """A Hugging Face (Mixtral-layout) directory loads split over 2 expert-parallel ranks, as an
    imported checkpoint starts a stage at any EP size that divides its experts."""
    import torch.distributed as dist

    model = load_export(out / "export_native", expert_parallel_size=2)
    with torch.no_grad():
        logits, _ = model(global_batches(model.config)[0, :, :-1])
    if dist.get_rank() == 0:
        torch.save(logits, out / "logits_reloaded_ep2.pt")


@pytest.fixture(scope="module")
def dist_run(deepspeed_ops, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe_dist")
    run_distributed_test(_worker, str(out), world_size=WORLD)
    return out


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_expert_parallel_matches_single_rank_and_zero_stages_train(dist_run: Path, backend: str) -> None:
    losses = json.loads((dist_run / "losses.json").read_text())
    ep1, ep2, ep2_zero2 = (losses[f"{backend}_ep{ep}_zero{s}"] for ep, s in ((1, 1), (2, 1), (2, 2)))
    assert ep2 == pytest.approx(ep1, abs=1e-5)
    assert ep2_zero2 == pytest.approx(ep1, abs=1e-5)
    assert ep1[-1] < ep1[0] - 0.5  # it trains


def test_backends_train_identically_when_nothing_drops(dist_run: Path) -> None:
    losses = json.loads((dist_run / "losses.json").read_text())
    assert losses["deepspeed_ep2_zero1"] == pytest.approx(losses["native_ep2_zero1"], abs=1e-4)


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_expert_parallel_export_loads_in_one_process(dist_run: Path, backend: str) -> None:
    expected = torch.load(dist_run / f"logits_{backend}.pt")
    probe = global_batches(tiny_config(backend))[0, :, :-1]
    for load_backend in ("native", "deepspeed"):  # the export is backend-independent too
        model = load_export(dist_run / f"export_{backend}", backend=load_backend)
        with torch.no_grad():
            logits, _ = model(probe)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_deepspeed_checkpoint_restores_expert_parallel_model(dist_run: Path, backend: str) -> None:
    result = json.loads((dist_run / f"ckpt_{backend}.json").read_text())
    assert result["same"]
    # One file per (MoE layer, global expert), written by the rank that owns the expert.
    experts = [f for f in result["files"] if "expert" in f]
    assert len(experts) == 2 * 4 and "layer_1_expert_3_mp_rank_00_model_states.pt" in experts


def test_canonical_state_is_ep_independent(dist_run: Path) -> None:
    from moe.export import load_export_state

    sd = load_export_state(dist_run / "export_native")[0]
    assert sd["layers.0.ffn.experts.w1"].shape == (4, 24, 32)
    assert dataclasses.asdict(load_export(dist_run / "export_native").config) == dataclasses.asdict(
        tiny_config("native"))


def test_all_to_all_cost_is_measured_only_where_experts_travel(dist_run: Path) -> None:
    comm = json.loads((dist_run / "comm.json").read_text())
    sent, seconds = comm["native_ep2_zero1"]
    assert sent > 0 and seconds > 0  # rows and gradients crossed to the other rank
    assert sent % (32 * 4) == 0  # whole fp32 rows of d_model=32
    assert comm["native_ep1_zero1"] == [0, 0.0]  # EP=1: no all-to-all at all
    assert comm["deepspeed_ep2_zero1"] == [0, 0.0]  # DeepSpeed's own all-to-alls are not ours to count


def test_an_export_reloads_split_over_two_expert_parallel_ranks(dist_run: Path) -> None:
    torch.testing.assert_close(torch.load(dist_run / "logits_reloaded_ep2.pt"),
                               torch.load(dist_run / "logits_native.pt"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_an_ep2_export_equals_the_ep1_reload_export(dist_run: Path, backend: str, tmp_path: Path) -> None:
    """Expert parallelism is invisible in the export: re-exporting the EP=2 export from one
    process writes the same config.json and the same tensors, name for name."""
    from safetensors.torch import load_file

    ep2 = dist_run / f"export_{backend}"
    ep1 = save_export(load_export(ep2), tmp_path / "ep1")
    assert json.loads((ep1 / "config.json").read_text()) == json.loads((ep2 / "config.json").read_text())
    theirs, ours = load_file(str(ep2 / "model.safetensors")), load_file(str(ep1 / "model.safetensors"))
    assert sorted(theirs) == sorted(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
