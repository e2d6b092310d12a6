"""Running our jobs on real Ray clusters: the runtime_env, token auth and the submit helper."""
