"""Export a checkpoint as a Hugging Face model directory, loadable at any expert-parallel size.

    python jobs/export.py outputs/pretrain                     # the run's newest complete checkpoint
    python jobs/export.py outputs/pretrain/checkpoints/step_00000200 --output /tmp/my-export

No Ray, no GPU and no knowledge of the training worker count needed: every checkpoint
already holds its EP-independent model files, which this verifies and copies.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from moe_platform.train import CheckpointError, export_checkpoint, resolve_checkpoint


def default_output(checkpoint: str) -> str:
    """<run>/export for a checkpoint at <run>/checkpoints/step_*, else <checkpoint>/../export."""
    checkpoints_dir = os.path.dirname(checkpoint)
    return os.path.join(os.path.dirname(checkpoints_dir), "export")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a run.output_dir, its checkpoints/ directory, or one step_* checkpoint")
    parser.add_argument("--output", help="where to write the export (default: <run.output_dir>/export)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        checkpoint = resolve_checkpoint(args.path)
        output = export_checkpoint(checkpoint, args.output or default_output(checkpoint))
    except CheckpointError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(f"exported {checkpoint}\n     -> {output}")
    blocker = transformers_blocker(output)
    if blocker:
        print(f"note: transformers cannot load this export: {blocker} (config.json model_type=moe_platform); "
              "moe.load_export and jobs/serve.py can")
    return 0


def transformers_blocker(export_dir: str) -> str | None:
    """The setting that keeps transformers (and vLLM) from loading the export, or None."""
    from moe.export import export_blocker, load_export_config

    return export_blocker(load_export_config(export_dir))


if __name__ == "__main__":
    sys.exit(main())
