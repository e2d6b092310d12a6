"""moe_platform.generate: offline batch generation on Ray Data, and task metrics.

`GenerateConfig` is the `generate` section of the job config; `run_generation` (batch.py)
is what jobs/generate.py calls. Replicas (replica.py) run the serving engine's scheduler, so
a row generates what the server would answer. Importing this package does not import Ray.
"""
from moe_platform.generate.config import GenerateConfig

__all__ = ["GenerateConfig"]
