"""ServeConfig validation: one sentence naming the key; build_app's string args are typed."""
import pytest

from moe_platform.serve.config import API_KEY_ENV, AutoscalingConfig, ServeConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_batch_size": 0}, "serve.max_batch_size=0 must be >= 1"),
        ({"batch_wait_timeout_s": -1.0}, "serve.batch_wait_timeout_s"),
        ({"max_tokens_limit": 8, "default_max_tokens": 16}, "serve.default_max_tokens=16"),
        ({"num_cpus": 0.0, "num_gpus": 0.0}, "serve.num_cpus and serve.num_gpus"),
        ({"port": 0}, "serve.port=0"),
        ({"route_prefix": "v1"}, "serve.route_prefix"),
        ({"api_key": ""}, "serve.api_key"),
        ({"autoscaling": AutoscalingConfig(min_replicas=3, max_replicas=2)}, "serve.autoscaling.min_replicas=3"),
        ({"autoscaling": AutoscalingConfig(target_ongoing_requests=0)}, "serve.autoscaling.target_ongoing_requests"),
    ],
)
def test_bad_values_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        ServeConfig(**kwargs)


def test_from_dict_types_string_args_like_serve_run_passes_them():
    config = ServeConfig.from_dict(
        {"export_dir": "/e", "max_batch_size": "8", "num_cpus": "0.25", "blocking": "false", "model_name": "null",
         "autoscaling": {"min_replicas": 1, "max_replicas": 3}}
    )  # fmt: skip
    assert config.max_batch_size == 8 and config.num_cpus == 0.25 and config.blocking is False
    assert config.model_name is None and config.autoscaling.max_replicas == 3


def test_from_dict_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="serve.max_batch is not a known key"):
        ServeConfig.from_dict({"max_batch": 3})
    with pytest.raises(ValueError, match="serve.port takes int values, got 'http'"):
        ServeConfig.from_dict({"port": "http"})


def test_api_key_comes_from_config_then_environment(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert ServeConfig().resolved_api_key() is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert ServeConfig().resolved_api_key() == "from-env"
    assert ServeConfig(api_key="from-config").resolved_api_key() == "from-config"


def test_model_name_defaults_to_the_export_directory_name():
    assert ServeConfig().served_model_name("/runs/exp1/export/") == "exp1"  # <run.output_dir>/export
    assert ServeConfig().served_model_name("/models/tiny-moe") == "tiny-moe"
    assert ServeConfig(model_name="tiny").served_model_name("/x") == "tiny"
