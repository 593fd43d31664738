"""A client that only changes its base URL sees Ollama, and Ollama sees the
client's own request: same method, path, query and body bytes."""

import json
import time

import ollama
import openai
import pytest
import requests

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def openai_client(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1/", api_key="unused", max_retries=0, timeout=10)


@pytest.fixture
def ollama_client(gateway):
    return ollama.Client(host=gateway.url, timeout=10)


def test_openai_sdk_chat_plain_reaches_upstream_unchanged(gateway, stub, openai_client):
    answer = openai_client.chat.completions.create(model="llama3.2", messages=CHAT)
    assert answer.choices[0].message.content == "Hello from the"
    assert answer.usage.prompt_tokens == 7
    chats = stub.requests_to("/v1/chat/completions")
    assert len(chats) == 1
    assert chats[0].method == "POST"
    assert chats[0].json() == {"model": "llama3.2", "messages": CHAT}


def test_openai_sdk_chat_streamed_arrives_delta_by_delta(gateway, stub, openai_client):
    stream = openai_client.chat.completions.create(model="llama3.2", messages=CHAT, stream=True,
                                                   extra_headers={"X-Stub": "chunks=5"})
    deltas = [c.choices[0].delta.content for c in stream if c.choices]
    assert deltas == ["Hello", " from", " the", " stub", " upstream", ""]


def test_openai_sdk_completions_embeddings_and_models(gateway, stub, openai_client):
    assert openai_client.completions.create(model="llama3.2", prompt="say").choices[0].text == "Hello from the"
    embedding = openai_client.embeddings.create(model="nomic-embed-text", input=["a", "b"])
    assert [len(d.embedding) for d in embedding.data] == [3, 3]
    assert [m.id for m in openai_client.models.list()] == ["llama3.2:latest", "nomic-embed-text:latest"]
    paths = [r.path for r in stub.received]
    # paths are never rewritten: /v1 stays /v1 (only the keep_alive load calls are native)
    assert [p for p in paths if p.startswith("/v1/")] == ["/v1/completions", "/v1/embeddings", "/v1/models"]


def test_ollama_client_chat_generate_embed_and_metadata(gateway, stub, ollama_client):
    assert ollama_client.chat(model="llama3.2", messages=CHAT)["message"]["content"] == "Hello from the"
    streamed = [part["message"]["content"] for part in ollama_client.chat(model="llama3.2", messages=CHAT,
                                                                          stream=True)]
    assert streamed == ["Hello", " from", " the", ""]
    assert ollama_client.generate(model="llama3.2", prompt="hi", stream=False)["response"] == "Hello from the"
    assert len(ollama_client.embed(model="nomic-embed-text", input="x")["embeddings"]) == 1
    assert [m.model for m in ollama_client.list().models] == ["llama3.2:latest", "nomic-embed-text:latest"]
    assert ollama_client.show("llama3.2").details.family == "llama"
    # both loaded: the stub keeps a loaded-model list as Ollama does
    assert {m.model for m in ollama_client.ps().models} == {"llama3.2:latest", "nomic-embed-text:latest"}
    assert gateway.get("/api/version").json() == {"version": "0.12.0"}
    assert [(r.method, r.path) for r in stub.received] == [
        ("POST", "/api/chat"), ("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/embed"),
        ("GET", "/api/tags"), ("POST", "/api/show"), ("GET", "/api/ps"), ("GET", "/api/version"),
    ]


def test_body_query_and_headers_are_forwarded_as_sent(gateway, stub):
    body = b'{"model": "llama3.2",   "prompt": "x", "keep_alive": "5m", "stream": false}'
    answer = gateway.post("/api/generate?debug=1&x=%2F", data=body, headers={
        "Content-Type": "application/json", "X-Custom": "kept", "Connection": "keep-alive, X-Hop",
        "X-Hop": "dropped", "Keep-Alive": "timeout=5", "TE": "trailers", "Upgrade": "h2c",
        "Proxy-Authorization": "Basic eA==", "Authorization": "Bearer client-key",
    })
    assert answer.status_code == 200
    [seen] = stub.requests_to("/api/generate")
    assert seen.body == body  # needed no change: byte for byte
    assert seen.query == "debug=1&x=%2F"
    assert seen.headers["x-custom"] == "kept"
    assert seen.headers["authorization"] == "Bearer client-key"  # no GATEWAY_API_KEYS: end-to-end
    assert seen.headers["content-type"] == "application/json"
    for hop in ("x-hop", "keep-alive", "te", "upgrade", "proxy-authorization"):
        assert hop not in seen.headers
    assert seen.headers["host"] == stub.url[len("http://"):]  # the upstream's own Host, not ours


def test_every_proxied_response_carries_a_task_id(gateway, stub):
    given = gateway.get("/api/tags", headers={"X-Task-Id": "mine-1"})
    assert given.headers["X-Task-Id"] == "mine-1"
    generated = gateway.get("/v1/models").headers["X-Task-Id"]
    assert len(generated) == 36 and generated.count("-") == 4


def test_sse_chunks_reach_the_client_as_the_upstream_sends_them(gateway, stub):
    """Measured from outside: each piece arrives within milliseconds of the
    stub writing it, while the stub waits 300 ms between pieces."""
    answer = gateway.post("/v1/chat/completions", stream=True, headers={"X-Stub": "chunks=4,chunk_delay=0.3"},
                          json={"model": "llama3.2", "stream": True, "messages": CHAT})
    arrivals = []
    for line in answer.iter_lines():
        if line.startswith(b"data: {"):
            arrivals.append(time.monotonic())
    [record] = stub.requests_to("/v1/chat/completions")
    assert len(arrivals) == 5
    # the stub runs in this process: one clock for "sent" and "arrived"
    delays = [arrived - sent for arrived, sent in zip(arrivals, record.sent_at)]
    # each piece within milliseconds of leaving the stub (the stub notes the
    # time just after its write, so a fast relay can be a hair ahead of it)
    assert all(-0.01 <= d < 0.02 for d in delays), delays
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:4])]
    assert all(0.25 < g < 0.45 for g in gaps), gaps  # not buffered: paced like the upstream


def test_first_ndjson_line_is_not_held_back(gateway, stub):
    started = time.monotonic()
    answer = gateway.post("/api/chat", stream=True, headers={"X-Stub": "chunks=2,chunk_delay=1.0"},
                          json={"model": "llama3.2", "messages": CHAT})
    first = next(answer.iter_lines())
    first_at = time.monotonic() - started
    assert json.loads(first)["message"]["content"] == "Hello"
    assert first_at < 0.5, first_at  # the second piece comes a second later
    answer.close()


def test_sse_gets_keepalive_comments_while_upstream_is_silent(gateway, stub):
    # HEARTBEAT_SEC is 0.5 on the test gateways; the stub stays silent 1.7 s
    answer = gateway.post("/v1/chat/completions", stream=True, headers={"X-Stub": "stall=1.7"},
                          json={"model": "llama3.2", "stream": True, "messages": CHAT})
    lines = [line for line in answer.iter_lines() if line]
    comments = [line for line in lines if line.startswith(b":")]
    assert len(comments) >= 2 and all(line == b": keep-alive" for line in comments)
    first_data = next(i for i, line in enumerate(lines) if line.startswith(b"data:"))
    assert all(line.startswith(b":") for line in lines[:first_data])
    assert lines[-1] == b"data: [DONE]"


def test_ndjson_gets_no_keepalive_lines(gateway, stub):
    answer = gateway.post("/api/chat", headers={"X-Stub": "stall=1.2"},
                          json={"model": "llama3.2", "messages": CHAT})
    lines = answer.content.splitlines()
    assert all(json.loads(line) for line in lines)
    assert len(lines) == 4


def test_gzip_body_is_forwarded_with_its_encoding_and_length(gateway, stub):
    answer = requests.post(gateway.url + "/api/chat", headers={"X-Stub": "gzip=1"}, timeout=5,
                           json={"model": "llama3.2", "messages": CHAT, "stream": False})
    assert answer.headers["Content-Encoding"] == "gzip"
    assert answer.json()["message"]["content"] == "Hello from the"  # requests decoded it: bytes were intact


def test_pooled_client_reuses_its_connection_after_a_pause(gateway, stub):
    """gunicorn's 2 s default keep-alive would close the pooled connection
    under the client; its next POST would fail without a retry."""
    session = requests.Session()
    first = session.post(gateway.url + "/api/chat", json={"model": "llama3.2", "messages": CHAT}, timeout=5)
    time.sleep(3)
    second = session.post(gateway.url + "/api/chat", json={"model": "llama3.2", "messages": CHAT}, timeout=5)
    assert first.status_code == second.status_code == 200


# ---------------------------------------------------------------- keep_alive and model


def test_api_inference_without_keep_alive_gets_the_default(gateway, stub):
    gateway.post("/api/chat", json={"model": "llama3.2", "messages": CHAT, "stream": False})
    gateway.post("/api/embed", json={"model": "nomic-embed-text", "input": "x"})
    assert [r.json()["keep_alive"] for r in stub.received] == ["30s", "30s"]


@pytest.mark.parametrize("value", ["5m", 0, -1, None])
def test_api_keep_alive_present_is_left_alone(gateway, stub, value):
    gateway.post("/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False, "keep_alive": value})
    [seen] = stub.requests_to("/api/generate")
    assert seen.json()["keep_alive"] == value


def test_v1_request_is_preceded_by_a_native_load_call(start_gateway, stub):
    gateway = start_gateway(WORKERS=1)
    gateway.post("/v1/chat/completions", json={"model": "llama3.2", "messages": CHAT})
    first, second = stub.received
    assert (first.path, first.json()) == ("/api/generate", {"model": "llama3.2", "keep_alive": "30s"})
    assert second.path == "/v1/chat/completions"
    assert second.json() == {"model": "llama3.2", "messages": CHAT}  # the /v1 body is unchanged
    assert first.finished_at <= second.arrived_at

    # the same model, same lifetime, used again well within it: no second load call
    gateway.post("/v1/chat/completions", json={"model": "llama3.2", "messages": CHAT})
    assert [r.path for r in stub.received].count("/api/generate") == 1

    # the client's own keep_alive is the one set; embeddings load through /api/embed
    gateway.post("/v1/chat/completions", json={"model": "llama3.2", "messages": CHAT, "keep_alive": "1h"})
    gateway.post("/v1/embeddings", json={"model": "nomic-embed-text", "input": "x"})
    loads = [(r.path, r.json()) for r in stub.received if r.path.startswith("/api/")]
    assert loads[1:] == [("/api/generate", {"model": "llama3.2", "keep_alive": "1h"}),
                         ("/api/embed", {"model": "nomic-embed-text", "keep_alive": "30s"})]


def test_v1_keep_alive_zero_from_client_sends_no_load_call(gateway, stub):
    gateway.post("/v1/chat/completions", json={"model": "llama3.2", "messages": CHAT, "keep_alive": 0})
    assert [r.path for r in stub.received] == ["/v1/chat/completions"]


def test_default_model_replaces_missing_and_aliased_models(start_gateway, stub):
    gateway = start_gateway(DEFAULT_MODEL="qwen2.5:7b", KEEP_ALIVE_DEFAULT="", WORKERS=1)
    gateway.post("/api/chat", json={"messages": CHAT, "stream": False})
    gateway.post("/api/chat", json={"model": "ollama", "messages": CHAT, "stream": False})
    gateway.post("/api/chat", json={"model": "local", "messages": CHAT, "stream": False})
    gateway.post("/api/chat", json={"model": "llama3.2", "messages": CHAT, "stream": False})
    assert [r.json().get("model") for r in stub.received] == ["qwen2.5:7b", "qwen2.5:7b", "qwen2.5:7b", "llama3.2"]
    assert all("keep_alive" not in r.json() for r in stub.received)  # KEEP_ALIVE_DEFAULT="" disables it


def test_a_model_in_steady_use_gets_one_load_call_and_another_only_once_it_may_have_expired(start_gateway, stub):
    """Each request restarts the model's lifetime in Ollama, so a model used
    every second with keep_alive 3s is never reloaded; after a pause longer
    than its lifetime (less a margin) it gets a load call again. /metrics
    counts what the upstream received."""
    gateway = start_gateway(WORKERS=1, KEEP_ALIVE_DEFAULT="3s")
    for _ in range(5):
        assert gateway.post("/v1/chat/completions", json={"model": "llama3.2", "messages": CHAT}).status_code == 200
        time.sleep(1)
    assert [r.path for r in stub.received].count("/api/generate") == 1
    time.sleep(1.5)  # 2.5 s since the last use: past 3 s less the 1 s margin
    gateway.post("/v1/chat/completions", json={"model": "llama3.2", "messages": CHAT})
    assert [r.path for r in stub.received].count("/api/generate") == 2
    text = gateway.get("/metrics").text
    assert "edgegate_keep_alive_load_calls_total 2.0" in text
