"""moe_platform.stages: multi-stage training and model compression around exports.

    config.py     the `pipeline`, `upcycle` and `prune` sections
    pipeline.py   run a list of stages, each from the previous stage's export, resumable
    compare.py    several exports side by side: loss, perplexity, parameters, size, tokens/s, chart
    pruning.py    expert usage on calibration data -> drop the least-used experts -> export

The model-level transforms (LoRA, upcycling, pruning, int8) live in `moe/`; this
package feeds them data through Ray Data and writes reports. Nothing here reads Hydra.
"""
