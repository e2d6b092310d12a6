"""Generate over a prompt file with Ray Data: a pool of model replicas, Parquet out, resumable.

    python jobs/generate.py generate.input=prompts.jsonl generate.output=outputs/generations
    python jobs/generate.py generate.export_dir=outputs/finetune/export generate.input=s3://bucket/prompts/ \
        generate.output=s3://bucket/generations generate.replicas=8 generate.num_gpus_per_replica=1
    python jobs/generate.py ... generate.temperature=0.7 generate.top_p=0.9 generate.seed=1

Input: .jsonl/.parquet records with a `prompt` (generate.prompt_field); a `response` is kept
as `reference`, and a row may carry its own max_tokens/temperature/top_p/top_k/seed/stop.
Output: Parquet parts with prompt, generated_text, token counts and finish_reason - valid
instruction data for prepare/finetune (data.response_field=generated_text), which is
sequence-level distillation in two commands. A rerun skips the parts already complete.
"""
from __future__ import annotations

import sys

from jobs.common import init_ray, job
from jobs.config import RootConfig
from moe_platform.data import DataError


@job
def main(config: RootConfig) -> None:
    from moe_platform.generate.batch import run_generation  # Ray and torch: only once the config is valid

    try:
        summary = run_generation(config.generate, start_ray=init_ray)
    except DataError as exc:
        print(f"generate error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(summary.summary())


if __name__ == "__main__":
    main()
