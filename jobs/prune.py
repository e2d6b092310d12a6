"""Expert pruning: count how often the router uses each expert on calibration data, drop the
least-used ones per layer, export, and report held-out loss against experts removed.

    python jobs/prune.py prune.export_dir=outputs/pretrain/export prune.keep=6
    python jobs/prune.py prune.export_dir=... prune.min_share=0.05 prune.output_dir=outputs/pruned/export

Calibration and held-out rows come from data.dataset_dir (prune.split / prune.eval_split).
The report is printed and saved as <prune.output_dir>/prune_report.json.
"""
from __future__ import annotations

import os
import sys

from jobs.common import ConfigError, init_ray, job
from jobs.config import RootConfig
from moe_platform.data import DataError


def run_prune(config: RootConfig):
    from moe.export import check_export  # torch and Ray: only once the config is valid
    from moe_platform.stages.pruning import prune_export_with_calibration

    settings = config.prune
    export_dir = os.path.abspath(settings.export_dir)
    try:
        check_export(export_dir, "prune.export_dir", need_tokenizer=False)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    settings.check_choice()  # a ConfigError naming the key
    init_ray()
    try:
        report = prune_export_with_calibration(export_dir, config.data.resolved().dataset_dir, settings)
    except (DataError, ValueError) as exc:
        print(f"prune failed: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"pruned {export_dir}: {report.num_experts} -> {report.kept} experts per MoE layer")
    print(report.table())
    print(f"export  {report.output_dir}")
    return report


@job
def main(config: RootConfig) -> None:
    run_prune(config)


if __name__ == "__main__":
    main()
