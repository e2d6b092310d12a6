"""Request validation and response shapes of the completions protocol (no server)."""
import json

import pytest

from moe_platform.serve.protocol import (
    APIError,
    Choice,
    RequestLimits,
    check_context,
    completion_response,
    parse_completion_request,
    sse_event,
)

LIMITS = RequestLimits(default_max_tokens=16, max_tokens_limit=32, max_prompts=4, vocab_size=300)


def parse(body):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_completion_request(raw, LIMITS)


def rejected(body) -> APIError:
    with pytest.raises(APIError) as info:
        parse(body)
    assert info.value.status == 400
    return info.value


def test_defaults_follow_openai():
    request = parse({"prompt": "hi"})
    assert request.prompts == ["hi"]
    assert request.params.max_tokens == 16 and request.params.temperature == 1.0 and request.params.top_p == 1.0
    assert not request.stream and not request.include_usage and request.model is None


def test_all_prompt_forms():
    assert parse({"prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert parse({"prompt": [5, 6]}).prompts == [[5, 6]]
    assert parse({"prompt": [[5], [6, 7]]}).prompts == [[5], [6, 7]]
    assert parse({"prompt": ""}).prompts == [""]


def test_full_request():
    request = parse({
        "model": "m", "prompt": "x", "max_tokens": 8, "temperature": 0, "top_p": 0.5, "top_k": 4,
        "stop": ["\n"], "seed": 3, "stream": True, "stream_options": {"include_usage": True},
        "n": 1, "echo": False, "user": "u", "presence_penalty": 0, "logprobs": None,
    })  # fmt: skip
    assert request.params.greedy and request.params.top_k == 4 and request.params.stop == ("\n",)
    assert request.params.seed == 3 and request.stream and request.include_usage and request.model == "m"


@pytest.mark.parametrize(
    "body, param, code",
    [
        (b"{not json", None, "invalid_json"),
        (b"\xff\xfe", None, "invalid_json"),
        ([1, 2], None, "invalid_json"),
        ({}, "prompt", "missing_field"),
        ({"prompt": None}, "prompt", "missing_field"),
        ({"prompt": 5}, "prompt", "invalid_type"),
        ({"prompt": []}, "prompt", "invalid_type"),
        ({"prompt": [[]]}, "prompt", "invalid_type"),
        ({"prompt": ["a", 1]}, "prompt", "invalid_type"),
        ({"prompt": [1, 300]}, "prompt", "invalid_token"),
        ({"prompt": ["a"] * 5}, "prompt", None),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", None),
        ({"prompt": "x", "max_tokens": -3}, "max_tokens", None),
        ({"prompt": "x", "max_tokens": 33}, "max_tokens", None),
        ({"prompt": "x", "max_tokens": "8"}, "max_tokens", "invalid_type"),
        ({"prompt": "x", "max_tokens": 8.0}, "max_tokens", "invalid_type"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens", "invalid_type"),
        ({"prompt": "x", "temperature": -0.1}, "temperature", None),
        ({"prompt": "x", "temperature": 2.5}, "temperature", None),
        ({"prompt": "x", "temperature": "hot"}, "temperature", "invalid_type"),
        ({"prompt": "x", "top_p": 0}, "top_p", None),
        ({"prompt": "x", "top_p": 1.5}, "top_p", None),
        ({"prompt": "x", "top_k": -1}, "top_k", None),
        ({"prompt": "x", "stop": ""}, "stop", None),
        ({"prompt": "x", "stop": ["a", 1]}, "stop", None),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
        ({"prompt": "x", "seed": "1"}, "seed", "invalid_type"),
        ({"prompt": "x", "seed": -1}, "seed", "invalid_type"),
        ({"prompt": "x", "stream": "yes"}, "stream", "invalid_type"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", None),
        ({"prompt": "x", "stream": True, "stream_options": {"foo": 1}}, "stream_options", None),
        ({"prompt": "x", "model": 3}, "model", "invalid_type"),
        ({"prompt": "x", "n": 2}, "n", "unsupported"),
        ({"prompt": "x", "n": True}, "n", "unsupported"),
        ({"prompt": "x", "echo": True}, "echo", "unsupported"),
        ({"prompt": "x", "logprobs": 1}, "logprobs", "unsupported"),
        ({"prompt": "x", "best_of": 3}, "best_of", "unsupported"),
        ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty", "unsupported"),
        ({"prompt": "x", "max_token": 5}, "max_token", "unknown_field"),
    ],
)
def test_bad_requests_are_400_naming_the_field(body, param, code):
    error = rejected(body)
    assert error.param == param
    if code is not None:
        assert error.code == code
    body_json = error.body()["error"]
    assert set(body_json) == {"message", "type", "param", "code"}
    assert body_json["type"] == "invalid_request_error" and body_json["message"]


def test_context_length_is_checked_with_max_tokens():
    check_context(prompt_tokens=60, max_tokens=4, context_length=64, index=0)
    with pytest.raises(APIError) as info:
        check_context(prompt_tokens=60, max_tokens=5, context_length=64, index=0)
    assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"
    with pytest.raises(APIError) as info:
        check_context(prompt_tokens=64, max_tokens=1, context_length=64, index=1)
    assert info.value.param == "prompt" and "prompt 1" in info.value.message


def test_response_shapes():
    body = completion_response("cmpl-1", "m", [Choice(0, "hi", "length")], {"prompt_tokens": 1})
    assert body["object"] == "text_completion" and body["choices"][0] == {
        "text": "hi", "index": 0, "logprobs": None, "finish_reason": "length",
    }  # fmt: skip
    event = sse_event({"a": 1})
    assert event.startswith("data: ") and event.endswith("\n\n") and json.loads(event[6:]) == {"a": 1}
