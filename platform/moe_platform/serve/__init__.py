"""moe_platform.serve: a Ray Serve OpenAI-style completions endpoint for model exports.

`ServeConfig` is the `serve` section of the job config. The Serve application is in
`moe_platform.serve.app` (`build_app(args)` for `serve run`/`serve deploy`,
`deploy(config)` for jobs and tests); importing this package does not import Ray.
"""
from moe_platform.serve.config import API_KEY_ENV, AutoscalingConfig, ServeConfig

__all__ = ["API_KEY_ENV", "AutoscalingConfig", "ServeConfig"]
