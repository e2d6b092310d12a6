"""The completions endpoint over real HTTP on the session's Ray Serve (loopback only).

One application per module (fixture `served_app`); every request is bounded by a
client timeout and the concurrent ones by a fixed count.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from testkit.serving import API_KEY

PROMPTS = ["The quick brown", "def main", "Ray Serve", "naïve café", "experts route", "hello", "a", "东京"]


def greedy(client, prompt, max_tokens=12, **extra):
    reply = client.complete(prompt=prompt, max_tokens=max_tokens, temperature=0, **extra)
    assert reply.status == 200, reply.body
    return reply.body


def assert_error(reply, status, code=None, param=None):
    assert reply.status == status, (reply.status, reply.body)
    error = reply.body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error


# ---- endpoints and auth ------------------------------------------------------------------


def test_healthz_is_open_and_models_lists_the_served_model(served_app):
    health = served_app.client(api_key=None).request("GET", "/healthz")
    assert health.status == 200 and health.body["status"] == "ok"
    models = served_app.client().models()
    assert models.status == 200
    assert models.body["object"] == "list" and models.body["data"][0]["id"] == "tiny"
    assert models.body["data"][0]["context_length"] == 64


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {API_KEY}", "Bearer"])
def test_missing_or_wrong_api_key_is_401(served_app, header):
    client = served_app.client(api_key=None)
    headers = {"Authorization": header} if header else {}
    for method, path, body in [("POST", "/v1/completions", {"prompt": "x"}), ("GET", "/v1/models", None)]:
        assert_error(client.request(method, path, body, headers=headers), 401, code="invalid_api_key")


# ---- completions ---------------------------------------------------------------------------


def test_plain_completion_has_text_finish_reason_and_usage(served_app):
    body = greedy(served_app.client(), "The quick brown", max_tokens=8)
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert isinstance(choice["text"], str) and choice["index"] == 0
    assert choice["finish_reason"] in ("length", "stop")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streaming_sends_sse_chunks_then_done_and_matches_the_plain_reply(served_app):
    client = served_app.client()
    plain = greedy(client, "def main", max_tokens=10)
    request = dict(prompt="def main", max_tokens=10, temperature=0, stream_options={"include_usage": True})
    events = list(client.stream(**request))
    assert events[-1] == "[DONE]"
    usage_event = events[-2]
    assert usage_event["choices"] == [] and usage_event["usage"] == plain["usage"]
    chunks = events[:-2]
    assert chunks and all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_raw_stream_is_event_stream_with_data_lines(served_app):
    client = served_app.client()
    conn = client._connect()
    try:
        body = json.dumps({"prompt": "hello", "max_tokens": 3, "stream": True}).encode()
        conn.request("POST", client.prefix + "/v1/completions", body=body, headers=client._headers(None))
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
        text = response.read().decode()
    finally:
        conn.close()
    blocks = [b for b in text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks) and blocks[-1] == "data: [DONE]"


def test_a_list_of_prompts_gives_one_choice_each_equal_to_the_prompt_alone(served_app):
    client = served_app.client()
    body = greedy(client, PROMPTS[:3])
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for prompt, choice in zip(PROMPTS[:3], body["choices"]):
        assert choice["text"] == greedy(client, prompt)["choices"][0]["text"]


def test_concurrent_greedy_requests_are_batched_and_equal_to_each_served_alone(served_app):
    client = served_app.client()
    alone = [greedy(client, p)["choices"][0]["text"] for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: greedy(client, p)["choices"][0]["text"], PROMPTS))
    assert together == alone
    health = client.request("GET", "/healthz").body
    assert health["largest_batch"] >= 2, health  # they really were decoded together


def test_a_seeded_sample_does_not_depend_on_its_batch(served_app):
    client = served_app.client()
    request = dict(prompt="Ray Serve", max_tokens=12, temperature=1.0, seed=1234)
    alone = client.complete(**request).body["choices"][0]["text"]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client.complete, **request)] + [
            pool.submit(client.complete, prompt=p, max_tokens=12, temperature=0.8) for p in PROMPTS[:3]
        ]
        batched = futures[0].result().body["choices"][0]["text"]
    assert batched == alone


def test_a_stop_string_cuts_the_text_and_finishes_with_stop(served_app):
    client = served_app.client()
    full = greedy(client, "The quick brown", max_tokens=16)["choices"][0]["text"]
    # Greedy decoding of a fixed-seed model: the same text every run, long enough for a stop string.
    assert len(full.strip()) >= 5, f"the random model's output is too short to pick a stop string: {full!r}"
    stop = full[3:5]
    body = greedy(client, "The quick brown", max_tokens=16, stop=[stop])
    assert body["choices"][0]["text"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


# ---- client mistakes: always 4xx, never 5xx -----------------------------------------------

BAD_REQUESTS = [
    (b"{oops", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_json", None),
    ({"max_tokens": 4}, 400, "missing_field", "prompt"),
    ({"prompt": 7}, 400, "invalid_type", "prompt"),
    ({"prompt": "x", "max_tokens": "4"}, 400, "invalid_type", "max_tokens"),
    ({"prompt": "x", "temperature": "warm"}, 400, "invalid_type", "temperature"),
    ({"prompt": "x", "max_tokens": 0}, 400, None, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10_000}, 400, None, "max_tokens"),
    ({"prompt": list(range(10, 110)), "max_tokens": 1}, 400, "context_length_exceeded", "prompt"),
    ({"prompt": list(range(10, 60)), "max_tokens": 30}, 400, "context_length_exceeded", "max_tokens"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model_not_found", "model"),
    ({"prompt": "x", "max_tokenz": 3}, 400, "unknown_field", "max_tokenz"),
    ({"prompt": "x", "n": 2}, 400, "unsupported", "n"),
    ({"prompt": [1, 99999]}, 400, "invalid_token", "prompt"),
]


@pytest.mark.parametrize("body, status, code, param", BAD_REQUESTS)
def test_bad_input_is_a_4xx_with_an_openai_error_body(served_app, body, status, code, param):
    reply = served_app.client().request("POST", "/v1/completions", body)
    assert_error(reply, status, code=code, param=param)


def test_unknown_route_wrong_method_and_oversized_body(served_app):
    client = served_app.client()
    assert_error(client.request("GET", "/v1/nope"), 404, code="not_found")
    assert_error(client.request("GET", "/v1/completions"), 405, code="method_not_allowed")
    huge = json.dumps({"prompt": "x" * (served_app.config.max_request_bytes + 1)}).encode()
    assert_error(client.request("POST", "/v1/completions", huge), 413, code="request_too_large")


def test_a_stock_openai_client_works(served_app):
    import openai  # in the test extra: this test runs, never skips

    client = openai.OpenAI(base_url=served_app.url + "/v1", api_key=API_KEY, timeout=60)
    completion = client.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0)
    assert completion.choices[0].text == greedy(served_app.client(), "hello", max_tokens=5)["choices"][0]["text"]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="hello", max_tokens=5, temperature=0, stream=True) if c.choices)  # fmt: skip
    assert streamed == completion.choices[0].text
