"""cluster/serve/llm_serve_config.yaml: Ray Serve LLM (vLLM) hosting an export on GPU nodes.

vLLM needs a CUDA build of torch and a GPU, so it is no test dependency: the file is checked
structurally, with Ray's own schemas (the Serve deploy schema and ray.serve.llm's LLMConfig, a
pydantic model that validates without vLLM)."""

from __future__ import annotations

from cluster_test_support import CLUSTER_DIR, load_yaml
from ray.serve.schema import ServeDeploySchema

CONFIG = CLUSTER_DIR / "serve" / "llm_serve_config.yaml"


def test_the_llm_serve_config_matches_rays_serve_schema_and_llm_config():
    # Internal path: the public ray.serve.llm.LLMConfig import insists on vLLM being installed.
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    config = load_yaml(CONFIG)
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    (llm,) = [LLMConfig(**entry) for entry in app["args"]["llm_configs"]]
    assert llm.llm_engine == "vLLM" and llm.accelerator_type
    assert llm.model_loading_config.model_source.endswith("/export")  # an export directory, nothing downloaded
    assert llm.engine_kwargs["max_model_len"] >= 1
    assert "trust_remote_code" not in llm.engine_kwargs  # exports load with transformers' own code
    autoscaling = llm.deployment_config["autoscaling_config"]
    assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"]
