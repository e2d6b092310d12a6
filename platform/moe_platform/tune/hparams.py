"""TensorBoard HPARAMS data of a sweep, written with TensorBoard's own protos (no TensorFlow).

    <tune dir>/trials/                        run "."  : the experiment (searched keys, metrics)
    <tune dir>/trials/<trial>/tensorboard/    run      : one session (the trial's values), next to the
                                                         training scalars the pretraining loop writes there

TensorBoard's HPARAMS tab reads a session's metrics from the scalars of its own
run, so `val/loss` and `train/loss` come straight from the pretraining loop and
update live; when the sweep ends, `tune/*` summary scalars and the session's end
status are added. Open with `tensorboard --logdir <tune dir>/trials`.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from moe_platform.tune.config import DISCRETE_KINDS, ParamSpec

# Scalars the sweep adds to each trial's run when it ends (besides the loop's own val/*, train/*).
SUMMARY_TAGS = {
    "tune/best_metric": "best value of tune.metric",
    "tune/steps": "optimizer steps trained",
    "tune/stopped_early": "1 = stopped by ASHA",
}
STATUS_SUCCESS, STATUS_FAILURE = "STATUS_SUCCESS", "STATUS_FAILURE"


def write_experiment(log_dir: str, space: list[ParamSpec], metric: str) -> None:
    """The experiment summary: which hparams exist (with their domains) and which metrics to show."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    metrics = [metric] + [tag for tag in ("val/loss", "train/loss") if tag != metric]
    experiment = api_pb2.Experiment(
        name="sweep",
        time_created_secs=time.time(),
        hparam_infos=[_hparam_info(spec) for spec in space],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=tag) for tag in metrics]
        + [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=tag, description=text)
           for tag, text in SUMMARY_TAGS.items()],
    )
    _write(log_dir, "_hparams_/experiment", plugin_data_pb2.HParamsPluginData(experiment=experiment))


def write_session_start(log_dir: str, params: dict[str, Any], *, group_name: str) -> None:
    """A trial's hparam values; TensorBoard groups sessions with the same group_name (trial repeats)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo(group_name=group_name, start_time_secs=time.time())
    for key, value in params.items():
        _set_value(start.hparams[key], value)
    _write(log_dir, "_hparams_/session_start_info", plugin_data_pb2.HParamsPluginData(session_start_info=start))


def write_session_end(log_dir: str, status: str, *, scalars: dict[str, float], step: int) -> None:
    """The trial's summary scalars (SUMMARY_TAGS) at its last step, and its end status."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=log_dir)
    try:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(status), end_time_secs=time.time())
    _write(log_dir, "_hparams_/session_end_info", plugin_data_pb2.HParamsPluginData(session_end_info=end))


# ---- protos ------------------------------------------------------------------------------------


def _hparam_info(spec: ParamSpec):
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2

    info = api_pb2.HParamInfo(name=spec.key, display_name=spec.key)
    candidates = spec.candidates()
    kinds = {_value_kind(value) for value in candidates}
    if len(kinds) != 1:
        return info  # mixed types (e.g. a number or null): no declared domain
    kind = kinds.pop()
    types = {"number": api_pb2.DATA_TYPE_FLOAT64, "bool": api_pb2.DATA_TYPE_BOOL}
    info.type = types.get(kind, api_pb2.DATA_TYPE_STRING)
    if spec.kind in DISCRETE_KINDS:
        values = [struct_pb2.Value() for _ in candidates]
        for proto, value in zip(values, candidates):
            _set_value(proto, value)
        info.domain_discrete.CopyFrom(struct_pb2.ListValue(values=values))
    else:
        info.domain_interval.CopyFrom(api_pb2.Interval(min_value=float(spec.low), max_value=float(spec.high)))
    return info


def _value_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "string"


def _set_value(proto, value: Any) -> None:
    """A google.protobuf Value from a scalar (bool before number: bool is an int in Python)."""
    kind = _value_kind(value)
    if kind == "bool":
        proto.bool_value = value
    elif kind == "number":
        proto.number_value = float(value)
    else:
        proto.string_value = "null" if value is None else str(value)


def _write(log_dir: str, tag: str, plugin_data) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata
    from torch.utils.tensorboard.writer import FileWriter

    summary = Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(plugin_data),
                                           tensor=metadata.NULL_TENSOR)])
    writer = FileWriter(log_dir)
    try:
        writer.add_summary(summary)
    finally:
        writer.close()


def read_sessions(log_dir: str) -> dict[str, dict[str, Any]]:
    """{run: {hparam: value}} of the session starts under log_dir, read back with TensorBoard's reader."""
    from tensorboard.backend.event_processing import event_multiplexer
    from tensorboard.plugins.hparams import metadata

    multiplexer = event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(log_dir)
    multiplexer.Reload()
    sessions = {}
    for run, tags in multiplexer.PluginRunToTagToContent(metadata.PLUGIN_NAME).items():
        content = tags.get(metadata.SESSION_START_INFO_TAG)
        if content is not None:
            start = metadata.parse_session_start_info_plugin_data(content)
            sessions[run] = {key: _python_value(value) for key, value in start.hparams.items()}
    return sessions


def _python_value(proto) -> Optional[Any]:
    kind = proto.WhichOneof("kind")
    return getattr(proto, kind) if kind else None
