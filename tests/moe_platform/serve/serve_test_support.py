"""Moved to testkit.serving (tests/testkit/serving.py): import from there. This alias stays only so
that branches written against the old module still import; delete it once nothing does."""
from testkit.serving import API_KEY, Served, deploy_for_test, ensure_serve_port, free_port  # noqa: F401
from testkit.serving import tiny_serve_model as tiny_model_config  # noqa: F401
