"""/v1/chat/completions over real HTTP on the session's Ray Serve, with our client and the stock one."""
from __future__ import annotations

import pytest
from chat_test_support import write_chat_export
from testkit.serving import API_KEY, deploy_for_test

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "The quick brown"}]


@pytest.fixture(scope="module")
def chat_app(ray_cluster, serve_port, tiny_export, tmp_path_factory):
    from ray import serve

    export = write_chat_export(tiny_export, tmp_path_factory.mktemp("chat-http") / "export")
    served = deploy_for_test(export, serve_port)
    yield served
    serve.delete(served.config.app_name)


@pytest.fixture(scope="module")
def rendered_ids(chat_app):
    from moe_platform.serve.engine import Engine

    engine = Engine.load(chat_app.config.export_dir)
    return engine.encode_chat(engine.chat_template.render(MESSAGES))


def test_a_chat_reply_is_the_completion_of_the_rendered_conversation(chat_app, rendered_ids):
    client = chat_app.client()
    reply = client.chat(messages=MESSAGES, max_tokens=8, temperature=0)
    assert reply.status == 200, reply.body
    body = reply.body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny"
    (choice,) = body["choices"]
    completion = client.complete(prompt=rendered_ids, max_tokens=8, temperature=0).body
    assert choice["message"] == {"role": "assistant", "content": completion["choices"][0]["text"]}
    assert choice["finish_reason"] == completion["choices"][0]["finish_reason"]
    assert body["usage"] == completion["usage"] and body["usage"]["prompt_tokens"] == len(rendered_ids)


def test_a_streamed_chat_has_a_role_chunk_content_chunks_usage_and_done(chat_app):
    client = chat_app.client()
    plain = client.chat(messages=MESSAGES, max_tokens=8, temperature=0).body
    events = list(client.stream_chat(messages=MESSAGES, max_tokens=8, temperature=0,
                                     stream_options={"include_usage": True}))  # fmt: skip
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"] == plain["usage"]
    chunks = events[:-2]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


def test_the_stock_openai_client_does_chat_and_completions_streaming_and_not(chat_app):
    import openai

    client = openai.OpenAI(base_url=chat_app.url + "/v1", api_key=API_KEY, timeout=60)
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0)
    raw = chat_app.client().chat(messages=MESSAGES, max_tokens=6, temperature=0).body
    assert chat.choices[0].message.content == raw["choices"][0]["message"]["content"]
    assert chat.usage.total_tokens == raw["usage"]["total_tokens"]
    streamed = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                              stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    completion = client.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0)
    streamed = client.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text
    with pytest.raises(openai.BadRequestError, match="special token"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "<|endoftext|>"}])


def test_an_export_without_a_chat_template_answers_chat_with_a_clear_400(served_app):
    reply = served_app.client().chat(messages=MESSAGES)
    assert reply.status == 400 and reply.body["error"]["code"] == "no_chat_template", reply.body
    assert "chat_template in tokenizer_config.json" in reply.body["error"]["message"]
