"""moe_platform.data: raw corpus -> tokenizer + packed Parquet shards + manifest.json.

The contract other packages code against is in `manifest` (layout, `Manifest.load`,
`split_paths`); `DataConfig` is the `data` section of the job config.
"""
from moe_platform.data.config import DataConfig
from moe_platform.data.errors import DataError, ManifestError
from moe_platform.data.manifest import (
    FORMAT_VERSION,
    LOSS_MASK_COLUMN,
    SPLITS,
    TOKENS_COLUMN,
    DocumentStats,
    Manifest,
    ShardInfo,
    Skip,
    SplitInfo,
    TokenizerInfo,
)

__all__ = [
    "FORMAT_VERSION",
    "LOSS_MASK_COLUMN",
    "SPLITS",
    "TOKENS_COLUMN",
    "DataConfig",
    "DataError",
    "DocumentStats",
    "Manifest",
    "ManifestError",
    "ShardInfo",
    "Skip",
    "SplitInfo",
    "TokenizerInfo",
]
