"""No client can push the server into a 5xx or stall the others (real Serve, loopback only).

A bounded barrage of malformed and hostile requests (types, ranges, NaN/Infinity literals,
huge and deeply nested bodies, invalid UTF-8, huge token ids, clients that vanish
mid-stream) runs concurrently with real requests, which must all complete with the text
they get alone; then a burst above max_ongoing_requests gets 429 + Retry-After at once.
"""
from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from chat_test_support import write_chat_export
from testkit.serving import API_KEY, deploy_for_test

C = "/v1/completions"
CHAT = "/v1/chat/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]

# (path, body): every one is a client mistake (4xx) unless listed in VALID below.
HOSTILE = [
    (C, b"{oops"), (C, b""), (C, b"null"), (C, b"[]"), (C, b'"prompt"'),
    (C, b'{"prompt": "x", "temperature": NaN}'), (C, b'{"prompt": "x", "top_p": Infinity}'),
    (C, b'{"prompt": "x", "max_tokens": -Infinity}'), (C, b'{"prompt": "\xff\xfe"}'), (C, b'{"prompt": "x"}\xc3'),
    (C, b"[" * 100_000), (C, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    (C, b'{"a":' * 2000 + b"1" + b"}" * 2000),
    (C, {"prompt": {"text": "x"}}), (C, {"prompt": None}), (C, {"prompt": [1.5, 2]}), (C, {"prompt": [[1], "x", 3]}),
    (C, {"prompt": [10**30]}), (C, {"prompt": [-1]}), (C, {"prompt": [2**63]}), (C, {"prompt": [True]}),
    (C, {"prompt": [[]]}), (C, {"prompt": []}), (C, {"prompt": ["x"] * 1000}),
    (C, {"prompt": "x", "max_tokens": 1.5}), (C, {"prompt": "x", "max_tokens": True}),
    (C, {"prompt": "x", "max_tokens": 10**30}), (C, {"prompt": "x", "max_tokens": -1}),
    (C, {"prompt": "x", "temperature": -1}), (C, {"prompt": "x", "temperature": 1e308}),
    (C, {"prompt": "x", "temperature": "0"}), (C, {"prompt": "x", "temperature": [0]}),
    (C, {"prompt": "x", "top_p": 0}), (C, {"prompt": "x", "top_p": 1.5}), (C, {"prompt": "x", "top_k": -1}),
    (C, {"prompt": "x", "top_k": 1.5}), (C, {"prompt": "x", "seed": -1}), (C, {"prompt": "x", "seed": 2**64}),
    (C, {"prompt": "x", "seed": "7"}), (C, {"prompt": "x", "stop": [""]}), (C, {"prompt": "x", "stop": [1]}),
    (C, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), (C, {"prompt": "x", "stream": "yes"}),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}), (C, {"prompt": "x", "logprobs": 1}),
    (C, {"prompt": "x", "n": True}), (C, {"prompt": "x", "model": ["tiny"]}), (C, {"prompt": "x", "model": "gpt-4"}),
    (C, {"prompt": list(range(10, 70)), "max_tokens": 10}),
    (CHAT, {}), (CHAT, {"messages": None}), (CHAT, {"messages": [{}]}), (CHAT, {"messages": [[]]}),
    (CHAT, {"messages": [{"role": "user"}]}), (CHAT, {"messages": [{"role": "user", "content": None}]}),
    (CHAT, {"messages": [{"role": "assistant", "content": "x"}]}),  # the template refuses it
    (CHAT, {"messages": [{"role": "user", "content": "<|endoftext|>"}]}),
    (CHAT, {"messages": [{"role": "user", "content": "x" * 5000}], "max_tokens": 4}),
    (CHAT, {"messages": OK_MESSAGES * 300}), (CHAT, {"messages": OK_MESSAGES, "temperature": float("inf")}),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}'),
    ("/v1/nope", {"prompt": "x"}),
]  # fmt: skip
# Odd but legal: served like any request.
VALID = [
    (C, {"prompt": "x", "temperature": 1e-40, "max_tokens": 4}), (C, {"prompt": "x", "top_k": 10**30, "max_tokens": 4}),
    (C, {"prompt": "x", "top_p": 1e-300, "max_tokens": 4}), (C, {"prompt": "", "max_tokens": 2}),
    (C, {"prompt": [299], "max_tokens": 2}), (C, {"prompt": "x", "seed": 2**63 - 1, "max_tokens": 3}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 3,
            "temperature": 5e-324}),
]  # fmt: skip
REAL_PROMPTS = ["The quick brown", "def main", "Ray Serve", "naïve café", "hello", "东京"]


@pytest.fixture(scope="module")
def app(ray_cluster, serve_port, tiny_export, tmp_path_factory):
    from ray import serve

    export = write_chat_export(tiny_export, tmp_path_factory.mktemp("barrage") / "export")
    served = deploy_for_test(export, serve_port, max_batch_size=4, batch_wait_timeout_s=0.02)
    yield served
    serve.delete(served.config.app_name)


def post(served, path, body, timeout_s=60.0):
    return served.client(timeout_s=timeout_s).request("POST", path, body)


def vanish_mid_stream(served) -> int:
    """Start a long streamed completion, read its first bytes, and hang up."""
    client = served.client()
    conn = client._connect()
    try:
        body = json.dumps({"prompt": "hello", "max_tokens": 50, "stream": True}).encode()
        conn.request("POST", client.prefix + C, body=body, headers=client._headers(None))
        response = conn.getresponse()
        response.read(20)
        return response.status
    finally:
        conn.sock.close() if conn.sock else None
        conn.close()


def greedy_text(served, prompt):
    reply = served.client().complete(prompt=prompt, max_tokens=10, temperature=0)
    assert reply.status == 200, reply.body
    return reply.body["choices"][0]["text"]


def test_hostile_requests_get_4xx_while_real_requests_all_complete(app):
    alone = {p: greedy_text(app, p) for p in REAL_PROMPTS}
    with ThreadPoolExecutor(8) as pool:
        real = [pool.submit(greedy_text, app, p) for p in REAL_PROMPTS * 2]
        hostile = [(path, body, pool.submit(post, app, path, body)) for path, body in HOSTILE]
        valid = [(path, body, pool.submit(post, app, path, body)) for path, body in VALID]
        vanished = [pool.submit(vanish_mid_stream, app) for _ in range(6)]
        assert [f.result() for f in real] == [alone[p] for p in REAL_PROMPTS * 2]
        for path, body, future in hostile:
            reply = future.result()
            assert 400 <= reply.status < 500, (path, str(body)[:80], reply.status, reply.body)
            assert reply.body["error"]["message"], reply.body
        for path, body, future in valid:
            reply = future.result()
            assert reply.status == 200, (path, body, reply.status, reply.body)
        assert [f.result() for f in vanished] == [200] * 6
    # Clients that hung up freed their slots: the replica drains to idle, and still serves.
    deadline = time.monotonic() + 60
    while (health := app.client().request("GET", "/healthz").body)["running"] or health["queued"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.5)
    assert health["status"] == "ok"
    assert greedy_text(app, "hello") == alone["hello"]


def test_an_oversized_body_is_413_before_it_is_read(app):
    huge = b'{"prompt": "' + b"x" * (app.config.max_request_bytes + 10) + b'"}'
    reply = post(app, C, huge)
    assert reply.status == 413 and reply.body["error"]["code"] == "request_too_large"


@pytest.fixture(scope="module")
def tight_app(ray_cluster, serve_port, tiny_export):
    from ray import serve

    served = deploy_for_test(tiny_export, serve_port, max_batch_size=1, max_ongoing_requests=1,
                             max_queued_requests=1, retry_after_s=2)  # fmt: skip
    yield served
    serve.delete(served.config.app_name)


def test_a_burst_above_the_queue_bound_gets_429_with_retry_after_at_once(tight_app):
    def slow(_):
        return tight_app.client().complete(prompt="hello", max_tokens=40, temperature=0)

    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(slow, range(12)))
    statuses = sorted(r.status for r in replies)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    assert all(r.headers.get("retry-after") == "2" for r in replies if r.status == 429)
