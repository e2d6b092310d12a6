"""Sparse upcycling: a dense export -> an MoE export whose experts all start as the dense FFN.

    python jobs/upcycle.py upcycle.dense_export_dir=outputs/dense/export \
        model.moe.num_experts=8 model.moe.top_k=2 upcycle.output_dir=outputs/upcycle/export
    python jobs/finetune.py init.export_dir=outputs/upcycle/export ...      # or pretrain further

The MoE layout is the `model.moe` section (num_experts, top_k, moe_every, balance loss, ...);
every expert of an MoE block is a copy of that block's dense SwiGLU (expert_hidden = the
dense ffn_hidden), the router is freshly initialised (upcycle.seed), so the upcycled model
computes exactly the dense model's function at step 0. No Ray needed.
"""
from __future__ import annotations

import dataclasses

from jobs.common import ConfigError, job
from jobs.config import RootConfig


def run_upcycle(config: RootConfig) -> str:
    from moe import load_export_config
    from moe.upcycle import upcycle_export

    settings = config.upcycle
    if not settings.dense_export_dir:
        raise ConfigError("upcycle.dense_export_dir must name the dense export")
    try:
        dense = load_export_config(settings.dense_export_dir)
        moe = dataclasses.replace(config.model.moe, expert_hidden=dense.ffn_hidden)
        out = upcycle_export(settings.dense_export_dir, settings.output_dir, moe, seed=settings.seed)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"upcycle: {exc}") from None
    upcycled = load_export_config(out)
    print(f"upcycled {settings.dense_export_dir} ({dense.num_params:,} parameters)\n"
          f"      -> {out} ({upcycled.num_params:,} parameters, {upcycled.num_active_params:,} active, "
          f"{upcycled.moe.num_experts} experts top-{upcycled.moe.top_k} in {upcycled.num_moe_layers} blocks)")
    return str(out)


@job
def main(config: RootConfig) -> None:
    run_upcycle(config)


if __name__ == "__main__":
    main()
