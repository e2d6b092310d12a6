"""The OpenAI-style completions protocol: request validation, responses, errors.

Pure functions over bytes and dicts (no Ray, no model; bodies are read by
moe.safe_json), so every rule here is unit-tested without a server. Policy, matching the OpenAI API:
- A client mistake is a 4xx with {"error": {"message", "type", "param", "code"}}.
- Unknown request fields are rejected (400, param names the field), as OpenAI
  does: a typo like "max_token" must not silently fall back to a default.
- Known OpenAI fields this server does not implement (echo, logprobs, best_of,
  penalties, logit_bias, suffix, n > 1) are accepted only at their no-op value.
- `user` is accepted and ignored; `top_k` (0 = off) is an extension, as in vLLM.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from moe import safe_json

# A prompt is text or (OpenAI allows this too) a list of token ids.
Prompt = Union[str, List[int]]

MAX_STOP_SEQUENCES = 4
DONE_EVENT = "data: [DONE]\n\n"

# Fields accepted only at the value that means "feature off" (their OpenAI defaults).
# `type(v) is int`: bool is an int in Python, and `n: true` must not pass as 1.
_NO_OP_FIELDS: Dict[str, Callable[[Any], bool]] = {
    "n": lambda v: type(v) is int and v == 1,
    "best_of": lambda v: type(v) is int and v == 1,
    "echo": lambda v: v is False,
    "logprobs": lambda v: False,  # any value asks for logprobs
    "suffix": lambda v: v == "",
    "logit_bias": lambda v: v == {},
    "presence_penalty": lambda v: type(v) in (int, float) and v == 0,
    "frequency_penalty": lambda v: type(v) in (int, float) and v == 0,
}
_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
    "stream", "stream_options", "user", *_NO_OP_FIELDS,
}  # fmt: skip


class APIError(Exception):
    """An error the client sees as an OpenAI-style body with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> Dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: Optional[str] = None, code: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class RequestLimits:
    default_max_tokens: int
    max_tokens_limit: int
    max_prompts: int
    vocab_size: int


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class CompletionRequest:
    model: Optional[str]
    prompts: List[Prompt]
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries the usage


def check_fields(data: Dict[str, Any], known: set, no_ops: Dict[str, Callable[[Any], bool]]) -> None:
    """A 400 for a field this endpoint does not know, or an accepted no-op field set to something
    this server would have to act on (e.g. n=2)."""
    unknown = sorted(set(data) - known)
    if unknown:
        raise invalid(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0], code="unknown_field")
    for name, is_no_op in no_ops.items():
        if data.get(name) is not None and not is_no_op(data[name]):
            raise invalid(f"{name}={data[name]!r} is not supported by this server", param=name, code="unsupported")


def parse_completion_request(body: bytes, limits: RequestLimits) -> CompletionRequest:
    """Raw request body -> a validated request, or APIError(400) naming the bad field."""
    data = parse_json_object(body)
    check_fields(data, _FIELDS, _NO_OP_FIELDS)
    stream = optional_bool(data, "stream", False)
    return CompletionRequest(
        model=optional_str(data, "model"),
        prompts=_prompts(data, limits),
        params=sampling_params(data, limits),
        stream=stream,
        include_usage=include_usage(data, stream),
    )


def parse_json_object(body: bytes) -> Dict[str, Any]:
    """The one way a request body is read: moe.safe_json (bounded depth; NaN/Infinity and
    invalid UTF-8 refused), so a hostile body is a 400, never a RecursionError."""
    try:
        data = safe_json.loads(body)
    except safe_json.JSONInputError as exc:
        raise invalid(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("Request body must be a JSON object", code="invalid_json")
    return data


def _prompts(data: Dict[str, Any], limits: RequestLimits) -> List[Prompt]:
    if "prompt" not in data or data["prompt"] is None:
        raise invalid("'prompt' is required", param="prompt", code="missing_field")
    prompt = data["prompt"]
    if isinstance(prompt, str):
        prompts: List[Prompt] = [prompt]
    elif _is_token_list(prompt) and prompt:
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or (_is_token_list(p) and p) for p in prompt):
        prompts = [p if isinstance(p, str) else list(p) for p in prompt]
    else:
        raise invalid(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of token id lists",
            param="prompt",
            code="invalid_type",
        )
    if len(prompts) > limits.max_prompts:
        raise invalid(f"At most {limits.max_prompts} prompts per request, got {len(prompts)}", param="prompt")
    for p in prompts:
        if not isinstance(p, str) and any(t < 0 or t >= limits.vocab_size for t in p):
            raise invalid(f"Token ids must be in [0, {limits.vocab_size})", param="prompt", code="invalid_token")
    return prompts


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)


def sampling_params(data: Dict[str, Any], limits: RequestLimits) -> SamplingParams:
    max_tokens = _optional_int(data, "max_tokens", limits.default_max_tokens)
    if not 1 <= max_tokens <= limits.max_tokens_limit:
        raise invalid(f"max_tokens must be in [1, {limits.max_tokens_limit}], got {max_tokens}", param="max_tokens")
    temperature = _optional_number(data, "temperature", 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise invalid(f"temperature must be in [0, 2], got {temperature}", param="temperature")
    top_p = _optional_number(data, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise invalid(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    top_k = _optional_int(data, "top_k", 0)
    if top_k < 0:
        raise invalid(f"top_k must be >= 0 (0 = off), got {top_k}", param="top_k")
    seed = data.get("seed")
    if seed is not None and (type(seed) is not int or not 0 <= seed < 2**63):
        raise invalid("seed must be an integer in [0, 2**63)", param="seed", code="invalid_type")
    return SamplingParams(max_tokens, temperature, top_p, top_k, seed, _stop(data))


def _stop(data: Dict[str, Any]) -> Tuple[str, ...]:
    stop = data.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid(f"At most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}", param="stop")
    return tuple(stops)


def include_usage(data: Dict[str, Any], stream: bool) -> bool:
    options = data.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise invalid("stream_options is only allowed when stream is true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise invalid("stream_options must be an object with only 'include_usage'", param="stream_options")
    return optional_bool(options, "include_usage", False, param="stream_options.include_usage")


def _optional_int(data: Dict[str, Any], name: str, default: int) -> int:
    value = data.get(name)
    if value is None:
        return default
    if type(value) is not int:
        raise invalid(f"{name} must be an integer, got {_json_type(value)}", param=name, code="invalid_type")
    return value


def _optional_number(data: Dict[str, Any], name: str, default: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if type(value) not in (int, float) or not math.isfinite(value):
        raise invalid(f"{name} must be a number, got {_json_type(value)}", param=name, code="invalid_type")
    return float(value)


def optional_bool(data: Dict[str, Any], name: str, default: bool, param: Optional[str] = None) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if type(value) is not bool:
        raise invalid(f"{name} must be a boolean, got {_json_type(value)}", param=param or name, code="invalid_type")
    return value


def optional_str(data: Dict[str, Any], name: str) -> Optional[str]:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise invalid(f"{name} must be a string, got {_json_type(value)}", param=name, code="invalid_type")
    return value


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


# ---- responses ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: Optional[str]  # "stop" (eos or a stop string), "length" (max_tokens), None mid-stream


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    completion_id: str, model: str, choices: Sequence[Choice], usage_counts: Optional[Dict[str, int]]
) -> Dict[str, Any]:
    response: Dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [_choice_json(c) for c in choices],
    }
    if usage_counts is not None:
        response["usage"] = usage_counts
    return response


def _choice_json(choice: Choice) -> Dict[str, Any]:
    return {"text": choice.text, "index": choice.index, "logprobs": None, "finish_reason": choice.finish_reason}


def sse_event(payload: Dict[str, Any]) -> str:
    """One server-sent event: `data: {json}` and a blank line."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def model_list(model: str, owned_by: str, metadata: Dict[str, Any]) -> Dict[str, Any]:
    entry = {"id": model, "object": "model", "created": int(time.time()), "owned_by": owned_by, **metadata}
    return {"object": "list", "data": [entry]}


def check_context(prompt_tokens: int, max_tokens: int, context_length: int, index: int) -> None:
    """Prompt plus max_tokens must fit the model's context window (OpenAI rejects, never truncates)."""
    if prompt_tokens + max_tokens > context_length:
        which = f"prompt {index}" if index else "the prompt"
        raise invalid(
            f"This model's maximum context length is {context_length} tokens; {which} has {prompt_tokens} tokens "
            f"and max_tokens is {max_tokens} ({prompt_tokens + max_tokens} in all). "
            "Shorten the prompt or lower max_tokens.",
            param="prompt" if prompt_tokens >= context_length else "max_tokens",
            code="context_length_exceeded",
        )
