"""GenerateConfig: a bad value is one sentence naming its key."""
from __future__ import annotations

import pytest

from moe.configs import ConfigError
from moe_platform.generate.config import GenerateConfig


@pytest.mark.parametrize("changes, key", [
    ({"template": "chatml"}, "generate.template"),
    ({"max_tokens": 0}, "generate.max_tokens"),
    ({"temperature": float("nan")}, "generate.temperature"),
    ({"top_p": 0.0}, "generate.top_p"),
    ({"top_k": -1}, "generate.top_k"),
    ({"seed": -1}, "generate.seed"),
    ({"stop": [""]}, "generate.stop"),
    ({"replicas": 0}, "generate.replicas"),
    ({"num_cpus_per_replica": 0}, "generate.num_cpus_per_replica"),
    ({"num_slots": 0}, "generate.num_slots"),
    ({"quantize": "int4"}, "generate.quantize"),
    ({"quantize": "int8", "num_gpus_per_replica": 1}, "generate.quantize=int8 runs on CPU only"),
    ({"rows_per_part": 0}, "generate.rows_per_part"),
])
def test_a_bad_value_names_its_key(changes, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        GenerateConfig(export_dir="x", **changes)


def test_replica_resources_decide_device_and_threads():
    assert (GenerateConfig(export_dir="x").device, GenerateConfig(export_dir="x").torch_threads) == ("cpu", 1)
    gpu = GenerateConfig(export_dir="x", num_gpus_per_replica=1, num_cpus_per_replica=4)
    assert (gpu.device, gpu.torch_threads) == ("cuda", 4)
    assert GenerateConfig(export_dir="x", num_cpus_per_replica=0.5).torch_threads == 1
