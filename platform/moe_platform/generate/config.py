"""GenerateConfig: the `generate` section of the job config (jobs/generate.py).

Plain types only (an OmegaConf structured config); `__post_init__` rejects a bad value with
one sentence naming the key, before Ray starts. The sampling keys are the defaults of every
row: a row's own `max_tokens`, `temperature`, `top_p`, `top_k`, `seed` or `stop` (a .jsonl key
or .parquet column) wins, and each value is validated exactly as the server validates a
request's (moe_platform.serve.protocol).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from moe.configs import require
from moe_platform.serve.config import QUANTIZE_MODES

# "auto": the export's chat template (tokenizer_config.json, written from a finetune's
# data.prompt_template) renders each prompt as one user turn, as /v1/chat/completions does;
# an export without one gets the raw prompt, as /v1/completions does. "none": always raw.
TEMPLATES = ("auto", "none")


@dataclass
class GenerateConfig:
    # The export to generate with (a Hugging Face model directory, moe/export.py).
    export_dir: str = "${run.output_dir}/export"
    # Prompts: a .jsonl or .parquet file, a directory of them, a glob or a URI - the record
    # formats of instruction data (data.kind=instruction); a response field, if any, is kept
    # as the output's `reference` column.
    input: Optional[str] = None
    # Where the Parquet parts go (part-<file>-<chunk>.parquet, one per chunk of rows_per_part input rows).
    output: Optional[str] = None
    prompt_field: str = "prompt"  # .jsonl key / .parquet string column of the prompt
    reference_field: str = "response"  # kept as `reference` when present (task evaluation)
    template: str = "auto"
    # Per-row defaults, as the server's request fields (temperature 0 = greedy). With `seed` set
    # and no per-row seed, row i (its position in the input) uses seed + i, as the server seeds
    # prompt i of a multi-prompt request: the same seed gives the server's completion.
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    # The replica pool: `replicas` actors across the cluster, each holding the model and
    # `num_slots` continuous-batching slots (a KV cache of num_slots x model.seq_len positions).
    # Fractional CPUs keep a fully booked node from starving Ray Data (docs/ray-notes.md).
    replicas: int = 1
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0  # > 0: the replica runs on cuda
    num_slots: int = 16
    quantize: str = "none"  # "int8": dynamic int8 linear layers and experts (CPU), as serve.quantize
    # Input rows per output part: the unit of progress, of retry and of resumption.
    rows_per_part: int = 256

    def __post_init__(self) -> None:
        require(bool(self.export_dir), "generate.export_dir must not be empty")
        require(bool(self.prompt_field), "generate.prompt_field must not be empty")
        require(self.template in TEMPLATES, f"generate.template must be one of {', '.join(TEMPLATES)}, "
                                            f"got {self.template!r}")
        require(self.max_tokens >= 1, f"generate.max_tokens must be >= 1, got {self.max_tokens}")
        require(math.isfinite(self.temperature) and 0 <= self.temperature <= 2,
                f"generate.temperature must be in [0, 2] (0 = greedy), got {self.temperature}")
        require(0 < self.top_p <= 1, f"generate.top_p must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, f"generate.top_k must be >= 0 (0 = off), got {self.top_k}")
        require(self.seed is None or 0 <= self.seed < 2**63, f"generate.seed must be in [0, 2**63), got {self.seed}")
        require(all(self.stop), "generate.stop must not hold an empty string")
        require(self.replicas >= 1, f"generate.replicas must be >= 1, got {self.replicas}")
        require(self.num_cpus_per_replica > 0,
                f"generate.num_cpus_per_replica must be > 0, got {self.num_cpus_per_replica}")
        require(self.num_gpus_per_replica >= 0,
                f"generate.num_gpus_per_replica must be >= 0, got {self.num_gpus_per_replica}")
        require(self.num_slots >= 1, f"generate.num_slots must be >= 1, got {self.num_slots}")
        require(self.quantize in QUANTIZE_MODES,
                f"generate.quantize must be one of {', '.join(QUANTIZE_MODES)}, got {self.quantize!r}")
        require(not (self.quantize == "int8" and self.num_gpus_per_replica > 0),
                "generate.quantize=int8 runs on CPU only: set generate.num_gpus_per_replica=0")
        require(self.rows_per_part >= 1, f"generate.rows_per_part must be >= 1, got {self.rows_per_part}")

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus_per_replica > 0 else "cpu"

    @property
    def torch_threads(self) -> int:
        """One torch thread per CPU the replica holds: replicas scale out instead of fighting."""
        return max(1, int(self.num_cpus_per_replica))

    def sampling_defaults(self) -> Dict[str, Any]:
        """The per-row defaults as server request fields (the seed is per row: see `seed`)."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "stop": list(self.stop) or None}  # fmt: skip

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
