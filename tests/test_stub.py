"""The stub upstream on its own (no gateway): it answers the routes the gateway's
tests lean on in the shapes Ollama's source gives them (see the stub's
docstring), and the real SDKs parse what it says."""

import gzip
import hashlib
import json
import socket
import time

import pytest
import requests

from stub_upstream import keep_alive_seconds, model_name, zstandard

ASK = [{"role": "user", "content": "hi"}]
MESSAGE = {"model": "llama3.2", "max_tokens": 64, "messages": ASK}


def sse_events(text):
    """[(event name, data)] of an SSE body."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields.get("event"), json.loads(fields["data"])))
    return events


def ps(stub):
    return requests.get(stub.url + "/api/ps", timeout=5).json()["models"]


# ---------------------------------------------------------------- the root


def test_root_says_ollama_is_running(stub):
    answer = requests.get(stub.url + "/", timeout=5)
    assert (answer.status_code, answer.text) == (200, "Ollama is running")
    assert answer.headers["Content-Type"] == "text/plain; charset=utf-8"
    head = requests.head(stub.url + "/", timeout=5)
    assert (head.status_code, head.content, head.headers["Content-Length"]) == (200, b"", "17")
    assert [(r.method, r.path) for r in stub.received] == [("GET", "/"), ("HEAD", "/")]


# ---------------------------------------------------------------- /v1/messages


def test_messages_answer_carries_anthropic_usage(stub):
    answer = requests.post(stub.url + "/v1/messages", json=MESSAGE, timeout=5)
    assert answer.status_code == 200
    body = answer.json()
    assert body["id"].startswith("msg_") and len(body["id"]) == 28
    assert (body["type"], body["role"], body["model"], body["stop_reason"]) == \
        ("message", "assistant", "llama3.2", "end_turn")
    assert body["content"] == [{"type": "text", "text": "Hello from the"}]
    assert body["usage"] == {"input_tokens": 7, "output_tokens": 3}


def test_messages_stream_follows_ollamas_event_sequence(stub):
    answer = requests.post(stub.url + "/v1/messages", json=dict(MESSAGE, stream=True),
                           headers={"X-Stub": "chunks=2"}, timeout=5)
    assert answer.headers["Content-Type"] == "text/event-stream"
    events = sse_events(answer.text)
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert all(name == data["type"] for name, data in events)
    start = events[0][1]["message"]
    # Ollama's len/4 estimate ("user" + "hi" -> 1); the real count comes in message_delta
    assert start["usage"] == {"input_tokens": 1, "output_tokens": 0} and start["content"] == []
    assert [d["delta"]["text"] for n, d in events if n == "content_block_delta"] == ["Hello", " from"]
    assert events[5][1] == {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                            "usage": {"input_tokens": 7, "output_tokens": 2}}
    assert stub.requests_to("/v1/messages")[0].pieces_sent == 7  # one chunk per event, as Ollama flushes


def test_messages_stream_can_fail_with_an_anthropic_error_event(stub):
    answer = requests.post(stub.url + "/v1/messages", json=dict(MESSAGE, stream=True),
                           headers={"X-Stub": "sse_error_after=2"}, timeout=5)
    events = sse_events(answer.text)
    assert [name for name, _ in events] == ["message_start", "content_block_start", "error"]
    assert events[-1][1] == {"type": "error", "error": {"type": "overloaded_error", "message": "cloud overloaded"}}


@pytest.mark.parametrize("body,knobs,status,kind", [
    (dict(MESSAGE, max_tokens=0), "", 400, "invalid_request_error"),
    ({"max_tokens": 5, "messages": ASK}, "", 400, "invalid_request_error"),
    (dict(MESSAGE, messages=[]), "", 400, "invalid_request_error"),
    (dict(MESSAGE, model="missing"), "", 404, "not_found_error"),
    (MESSAGE, "status=401", 401, "authentication_error"),
    (MESSAGE, "status=429", 429, "rate_limit_error"),
    (MESSAGE, "status=503", 503, "overloaded_error"),
    (dict(MESSAGE, stream=True), "status=500", 500, "api_error"),
])
def test_messages_errors_come_in_anthropics_shape(stub, body, knobs, status, kind):
    answer = requests.post(stub.url + "/v1/messages", json=body, headers={"X-Stub": knobs}, timeout=5)
    assert answer.status_code == status
    assert answer.headers["Content-Type"].startswith("application/json")
    error = answer.json()
    assert set(error) == {"type", "error", "request_id"} and error["type"] == "error"
    assert error["error"]["type"] == kind and error["error"]["message"]
    assert error["request_id"].startswith("req_")


def test_messages_ignore_keep_alive_like_ollama(stub):
    stub.load("llama3.2", 3600)
    requests.post(stub.url + "/v1/messages", json=dict(MESSAGE, keep_alive=0), timeout=5)
    assert stub.loaded["llama3.2:latest"]["keep_alive"] == 3600


def test_anthropic_sdk_parses_the_stub(stub):
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=stub.url, api_key="unused", max_retries=0, timeout=10)
    message = client.messages.create(**MESSAGE)
    assert message.content[0].text == "Hello from the"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (7, 3)
    with client.messages.stream(**MESSAGE, extra_headers={"X-Stub": "chunks=5"}) as stream:
        assert list(stream.text_stream) == ["Hello", " from", " the", " stub", " upstream"]
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 5
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(**dict(MESSAGE, model="missing"))
    assert caught.value.body["error"]["type"] == "not_found_error"
    seen = stub.requests_to("/v1/messages")[0]
    # the SDK's key comes as x-api-key or (SDK 2.x) as a bearer token: a gateway must expect both
    assert "unused" in (seen.headers.get("x-api-key"), seen.headers.get("authorization", "")[len("Bearer "):])
    assert "anthropic-version" in seen.headers


# ---------------------------------------------------------------- /v1/audio/transcriptions


def test_transcription_echoes_the_file_byte_for_byte(stub):
    audio = bytes(range(256)) * 40 + b"\r\n--not-a-boundary\r\n\r\n"
    answer = requests.post(stub.url + "/v1/audio/transcriptions", timeout=5,
                           data={"model": "whisper", "language": "de"},
                           files={"file": ("clip.wav", audio, "audio/wav")})
    assert answer.status_code == 200
    assert answer.json() == {"text": "Hello from the", "received": {
        "model": "whisper", "filename": "clip.wav", "content_type": "audio/wav", "bytes": len(audio),
        "sha256": hashlib.sha256(audio).hexdigest(), "fields": {"model": "whisper", "language": "de"}}}
    [seen] = stub.requests_to("/v1/audio/transcriptions")
    assert seen.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert seen.form["file"] == audio and audio in seen.body
    plain = requests.post(stub.url + "/v1/audio/transcriptions", timeout=5,
                          data={"model": "whisper", "response_format": "text"}, files={"file": ("a.wav", b"x")})
    assert (plain.headers["Content-Type"], plain.text) == ("text/plain", "Hello from the")


def test_transcription_refusals_are_openai_errors(stub):
    url = stub.url + "/v1/audio/transcriptions"
    no_file = requests.post(url, data={"model": "whisper"}, files={"other": ("a", b"x")}, timeout=5)
    assert no_file.status_code == 400 and no_file.json()["error"]["message"].startswith("file is required")
    not_form = requests.post(url, json={"model": "whisper"}, timeout=5)
    assert not_form.status_code == 400 and "multipart" in not_form.json()["error"]["message"]
    empty = requests.post(url, data={"model": "whisper"}, files={"file": ("a.wav", b"")}, timeout=5)
    assert empty.json()["error"]["message"] == "audio file is empty"


def test_openai_sdk_transcribes_through_the_stub(stub):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=stub.url + "/v1/", api_key="unused", max_retries=0, timeout=10)
    result = client.audio.transcriptions.create(model="whisper", file=("a.wav", b"RIFF....WAVE"))
    assert result.text == "Hello from the"
    assert stub.requests_to("/v1/audio/transcriptions")[0].form["file"] == b"RIFF....WAVE"


# ---------------------------------------------------------------- loaded models and keep_alive


def test_ps_lists_loaded_models_longest_left_first(stub):
    assert ps(stub) == []
    requests.post(stub.url + "/api/generate", json={"model": "llama3.2", "keep_alive": "1h"}, timeout=5)
    requests.post(stub.url + "/api/embed", json={"model": "nomic-embed-text", "input": "x"}, timeout=5)
    models = ps(stub)
    assert [m["name"] for m in models] == ["llama3.2:latest", "nomic-embed-text:latest"]
    assert set(models[0]) == {"name", "model", "size", "digest", "details", "expires_at", "size_vram",
                              "context_length"}
    assert stub.loaded["llama3.2:latest"]["keep_alive"] == 3600
    assert stub.loaded["nomic-embed-text:latest"]["keep_alive"] == 300  # Ollama's default 5m
    assert stub.loaded_models() == ["llama3.2:latest", "nomic-embed-text:latest"]


def test_v1_request_keeps_the_lifetime_a_native_call_set(stub):
    """server/sched.go useLoadedRunner: no keep_alive keeps the runner's duration."""
    requests.post(stub.url + "/api/generate", json={"model": "llama3.2", "keep_alive": "1h"}, timeout=5)
    requests.post(stub.url + "/v1/chat/completions", json={"model": "llama3.2", "messages": ASK,
                                                           "keep_alive": "1s"}, timeout=5)
    requests.post(stub.url + "/api/chat", json={"model": "llama3.2", "messages": ASK, "stream": False}, timeout=5)
    assert stub.loaded["llama3.2:latest"]["keep_alive"] == 3600
    requests.post(stub.url + "/v1/chat/completions", json={"model": "qwen2.5:7b", "messages": ASK}, timeout=5)
    assert stub.loaded["qwen2.5:7b"]["keep_alive"] == 300  # not loaded before: the default


def test_keep_alive_zero_unloads_at_once(stub):
    stub.load("llama3.2", keep_alive=600)
    stub.load("qwen2.5:7b")
    answer = requests.post(stub.url + "/api/generate", json={"model": "llama3.2", "keep_alive": 0}, timeout=5)
    assert answer.json() == {"model": "llama3.2", "created_at": "2026-01-01T00:00:00Z", "response": "",
                             "done": True, "done_reason": "unload"}
    chat = requests.post(stub.url + "/api/chat", json={"model": "qwen2.5:7b", "keep_alive": "0s"}, timeout=5)
    assert chat.json()["done_reason"] == "unload" and chat.json()["message"] == {"role": "assistant", "content": ""}
    assert ps(stub) == []
    # with a prompt it answers, then unloads
    answer = requests.post(stub.url + "/api/generate", timeout=5,
                           json={"model": "llama3.2", "prompt": "x", "keep_alive": "0", "stream": False})
    assert answer.json()["response"] == "Hello from the" and ps(stub) == []


def test_load_calls_answer_done_reason_load(stub):
    generate = requests.post(stub.url + "/api/generate", json={"model": "llama3.2"}, timeout=5).json()
    chat = requests.post(stub.url + "/api/chat", json={"model": "llama3.2", "messages": []}, timeout=5).json()
    assert generate["done_reason"] == chat["done_reason"] == "load"
    assert [m["name"] for m in ps(stub)] == ["llama3.2:latest"]


def test_expired_and_forever_models(stub):
    stub.loaded["old:latest"] = {"keep_alive": 1, "expires_at": time.time() - 1}
    requests.post(stub.url + "/api/generate", json={"model": "llama3.2", "keep_alive": -1}, timeout=5)
    [model] = ps(stub)
    assert model["name"] == "llama3.2:latest" and int(model["expires_at"][:4]) > 2200  # Ollama: now + MaxInt64 ns


def test_cloud_models_never_load(stub):
    for model in ("gpt-oss:120b-cloud", "kimi-k2:cloud", "deepseek:671b:CLOUD"):
        requests.post(stub.url + "/api/chat", json={"model": model, "messages": ASK, "stream": False}, timeout=5)
    assert ps(stub) == []


def test_bad_keep_alive_is_refused_as_ollama_does(stub):
    answer = requests.post(stub.url + "/api/generate", json={"model": "llama3.2", "keep_alive": "300"}, timeout=5)
    assert answer.status_code == 400
    assert answer.json() == {"error": 'time: missing unit in duration "300"'}
    assert ps(stub) == []


def test_reset_forgets_loaded_models(stub):
    stub.load("llama3.2")
    stub.reset()
    assert stub.loaded == {} and ps(stub) == []


@pytest.mark.parametrize("value,seconds", [(0, 0), ("0", 0), ("0s", 0), (90, 90), (1.5, 1.5), ("5m", 300),
                                           ("1h30m", 5400), ("250ms", 0.25), (-1, float("inf")),
                                           ("-5m", float("inf"))])
def test_keep_alive_values_read_like_go_durations(value, seconds):
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["300", "5x", "", True, [1]])
def test_keep_alive_values_ollama_refuses(value):
    with pytest.raises(ValueError):
        keep_alive_seconds(value)


@pytest.mark.parametrize("name,shown", [("llama3.2", "llama3.2:latest"), ("qwen2.5:7b", "qwen2.5:7b"),
                                        ("host:5000/ns/model", "host:5000/ns/model:latest"),
                                        ("foo-cloud", "foo-cloud:latest"), ("gpt-oss:20b-cloud", None),
                                        ("kimi-k2:cloud", None), ("", None), (5, None)])
def test_model_names_as_ps_shows_them(name, shown):
    assert model_name(name) == shown


# ---------------------------------------------------------------- account and web routes


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/api/me", None), ("POST", "/api/signout", None), ("DELETE", "/api/user/keys/c3NoLWVkMjU1MTk", None),
    ("POST", "/api/experimental/web_search", {"query": "ollama"}),
    ("POST", "/api/experimental/web_fetch", {"url": "https://ollama.com"}),
    ("GET", "/api/status", None), ("GET", "/api/experimental/model-recommendations", None),
])
def test_account_and_web_routes_answer(stub, method, path, body):
    answer = requests.request(method, stub.url + path, json=body, timeout=5)
    assert answer.status_code == 200
    answer.json()
    assert [(r.method, r.path) for r in stub.received] == [(method, path)]


def test_web_search_without_a_body_is_refused(stub):
    answer = requests.post(stub.url + "/api/experimental/web_search", timeout=5)
    assert (answer.status_code, answer.json()) == (400, {"error": "missing request body"})


# ---------------------------------------------------------------- the record


def test_record_keeps_headers_and_body_as_they_came(stub):
    raw = gzip.compress(json.dumps({"model": "llama3.2", "messages": ASK, "stream": False}).encode())
    requests.post(stub.url + "/api/chat", data=raw, headers={"Content-Encoding": "gzip", "X-Case-Kept": "v"},
                  timeout=5)
    [seen] = stub.received
    assert seen.body == raw  # not decoded: Ollama decodes no gzip request body (it answers 400)
    assert json.loads(seen.decoded())["model"] == "llama3.2"
    assert ("X-Case-Kept", "v") in seen.raw_headers and seen.headers["content-encoding"] == "gzip"


def test_record_keeps_duplicate_headers_and_a_chunked_body(stub):
    body = b'{"model": "llama3.2", "stream": false, "messages": [{"role": "user", "content": "hi"}]}'
    with socket.create_connection(("127.0.0.1", stub.server_address[1])) as sock:
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nX-Twice: a\r\nX-Twice: b\r\n"
                     b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n" % (10, body[:10]) + b"%x\r\n%s\r\n" % (len(body) - 10, body[10:])
                     + b"0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    [seen] = stub.received
    assert seen.body == body and seen.chunked
    assert [v for n, v in seen.raw_headers if n == "X-Twice"] == ["a", "b"]


@pytest.mark.skipif(zstandard is None, reason="zstandard is not installed")
def test_zstd_body_on_v1_is_decoded_as_ollama_does(stub):
    raw = zstandard.ZstdCompressor().compress(json.dumps({"model": "llama3.2", "messages": ASK}).encode())
    answer = requests.post(stub.url + "/v1/chat/completions", data=raw, timeout=5,
                           headers={"Content-Encoding": "zstd", "Content-Type": "application/json"})
    assert answer.status_code == 200
    assert stub.received[0].body == raw
    native = requests.post(stub.url + "/api/chat", data=raw, headers={"Content-Encoding": "zstd"}, timeout=5)
    assert native.status_code == 400  # /api/* decodes nothing
