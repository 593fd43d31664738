"""Ollama's whole surface through the gateway (issue #11), as its users meet it.

- Claude apps (the ``anthropic`` SDK) talk to ``POST /v1/messages``: it is
  inference (GPU slot, task, keep_alive load call), and every error the
  gateway makes there is in Anthropic's shape.
- Speech apps (the ``openai`` SDK) upload audio to
  ``POST /v1/audio/transcriptions``: inference too, the upload byte for byte.
- Ollama's cloud models (``kimi-k2:cloud``, ``gpt-oss:120b-cloud``) run on
  ollama.com on the box owner's account: refused unless ALLOW_OLLAMA_CLOUD=1,
  and then forwarded without the GPU slot.
- Account and web routes (``/api/me``, ``/api/user/keys``, web search) are
  refused like management routes, whatever the path's spelling.
- Compressed request bodies are decoded (gzip, deflate, zstd), bombs refused.
- Browsers get Ollama's CORS behaviour; ``GET /`` answers like Ollama.
- An unreachable Ollama is explained in plain words.

Everything is checked from outside: a real gunicorn, the stub Ollama, the
real SDKs.
"""

import gzip
import hashlib
import http.client
import json
import socket
import time
import uuid
import zlib

import anthropic
import ollama
import openai
import pytest
import requests
import zstandard

from conftest import asr_job_holds_the_gpu, gateway_error, proc_status_kib

HI = [{"role": "user", "content": "hi"}]
# Anthropic's error types (docs.anthropic.com, "Errors"); Ollama's NewError uses the same.
ANTHROPIC_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                   "request_too_large", "rate_limit_error", "api_error", "overloaded_error"}
MiB = 1024 * 1024


# ---------------------------------------------------------------- helpers


def fresh_model(base="llama3.2"):
    """A model name no worker has loaded yet, so the /v1 keep_alive load call is not skipped."""
    return "%s:t%s" % (base, uuid.uuid4().hex[:10])


def task_id(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:8])


def messages_body(model, **extra):
    return dict({"model": model, "max_tokens": 64, "messages": HI}, **extra)


def anthropic_error(answer, status, kind):
    """An error the gateway made on /v1/messages, checked to be Anthropic's shape."""
    assert answer.status_code == status, (answer.status_code, answer.text)
    assert answer.headers["Content-Type"].startswith("application/json"), answer.headers
    document = answer.json()
    assert document.get("type") == "error" and isinstance(document.get("error"), dict), answer.text
    assert set(document) <= {"type", "error", "request_id"}, answer.text
    error = document["error"]
    assert error.get("type") == kind, answer.text
    assert isinstance(error.get("message"), str) and error["message"].strip(), answer.text
    assert set(error) <= {"type", "message", "code", "param", "provider", "task_id"}, answer.text
    return error


def sse_events(content):
    """[(event name or None, parsed data)] of an SSE body; comment lines skipped."""
    events = []
    for block in content.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = None, []
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[len(b"event:"):].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[len(b"data:"):].strip())
        if data:
            events.append((name, json.loads(b"\n".join(data))))
    return events


def raw_status(gateway, method, target, body=b"{}", headers=()):
    """Send a request exactly as written (no client cleans the path); the status code."""
    head = "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n" \
           "Content-Length: %d\r\nConnection: close\r\n" % (method, target, gateway.port, len(body))
    head += "".join("%s: %s\r\n" % h for h in headers)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        answer = b""
        while b"\r\n" not in answer:
            piece = sock.recv(4096)
            if not piece:
                break
            answer += piece
    assert answer.startswith(b"HTTP/1.1 "), answer
    return int(answer.split(b" ", 2)[1])


def cors_headers(answer):
    return {k.lower(): v for k, v in answer.headers.items() if k.lower().startswith("access-control-")}


def listed(value):
    return {part.strip().lower() for part in (value or "").split(",") if part.strip()}


@pytest.fixture(autouse=True)
def no_sdk_keys_from_the_environment(monkeypatch):
    """The stories decide for themselves which key a client sends."""
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "OLLAMA_API_KEY",
                 "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def claude(gateway, key="x"):
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=10)


# ---------------------------------------------------------------- gateways


@pytest.fixture(scope="module")
def ten_mib_gateway(start_gateway):
    return start_gateway(MAX_BODY_BYTES="10485760", WORKERS="1")


@pytest.fixture(scope="module")
def cloud_gateway(start_gateway):
    return start_gateway(ALLOW_OLLAMA_CLOUD="1", WORKERS="1", SLOT_WAIT_S="0")


@pytest.fixture(scope="module")
def management_gateway(start_gateway):
    return start_gateway(ALLOW_MANAGEMENT="1", WORKERS="1")


# ================================================================ 1. /v1/messages


def test_claude_app_gets_a_message_as_a_task_after_the_keep_alive_load_call(gateway, stub):
    model, tid = fresh_model(), task_id("msg")
    sent = json.dumps(messages_body(model)).encode()
    answer = gateway.post("/v1/messages", data=sent, headers={"Content-Type": "application/json",
                                                              "anthropic-version": "2023-06-01", "X-Task-Id": tid})
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Task-Id"] == tid
    message = answer.json()
    assert (message["type"], message["role"], message["content"][0]["text"]) == \
        ("message", "assistant", "Hello from the")
    # the native load call first, exactly the model and the default lifetime; then the body unchanged
    assert [r.path for r in stub.received] == ["/api/generate", "/v1/messages"]
    assert stub.received[0].method == "POST"
    assert stub.received[0].json() == {"model": model, "keep_alive": "30s"}
    assert stub.received[1].body == sent
    document = gateway.wait_state(tid, {"SUCCESS", "FAILED"})
    assert document["state"] == "SUCCESS", document
    ext = document["extensions"]
    assert (ext["model"], ext["path"], ext["stream"]) == (model, "/v1/messages", False)
    assert (ext["prompt_tokens"], ext["completion_tokens"]) == (7, 3), ext  # Anthropic usage input/output_tokens


def test_streamed_message_counts_tokens_from_message_delta(gateway, stub):
    model, tid = fresh_model(), task_id("msg-stream")
    answer = gateway.post("/v1/messages", json=messages_body(model, stream=True),
                          headers={"X-Task-Id": tid, "X-Stub": "chunks=4"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    names = [name for name, _ in sse_events(answer.content)]
    assert names == ["message_start", "content_block_start"] + ["content_block_delta"] * 4 + \
        ["content_block_stop", "message_delta", "message_stop"]
    assert [r.path for r in stub.received] == ["/api/generate", "/v1/messages"]
    assert stub.received[0].json() == {"model": model, "keep_alive": "30s"}
    document = gateway.wait_state(tid, {"SUCCESS", "FAILED"})
    assert document["state"] == "SUCCESS", document
    ext = document["extensions"]
    assert (ext["model"], ext["stream"]) == (model, True)
    # message_start carries Ollama's len/4 estimate (1 here); message_delta the real 7 and 4
    assert (ext["prompt_tokens"], ext["completion_tokens"]) == (7, 4), ext


def test_anthropic_sdk_works_unchanged_create_stream_and_raw_stream(gateway, stub):
    client = claude(gateway)
    message = client.messages.create(model=fresh_model(), max_tokens=64, messages=HI)
    assert message.content[0].text == "Hello from the"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (7, 3)

    with client.messages.stream(model=fresh_model(), max_tokens=64, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from the" and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 3

    events = list(client.messages.create(model=fresh_model(), max_tokens=64, messages=HI, stream=True))
    assert [e.type for e in events] == ["message_start", "content_block_start"] + ["content_block_delta"] * 3 + \
        ["content_block_stop", "message_delta", "message_stop"]
    assert len(stub.requests_to("/v1/messages")) == 3


def test_message_while_the_gpu_is_held_gets_overloaded_error_with_retry_after(gateway, stub):
    tid = task_id("msg-busy")
    with asr_job_holds_the_gpu(gateway):
        answer = gateway.post("/v1/messages", json=messages_body(fresh_model()), headers={"X-Task-Id": tid})
    error = anthropic_error(answer, 503, "overloaded_error")
    assert answer.headers["Retry-After"].isdigit()
    assert answer.headers["X-Task-Id"] == tid
    assert error.get("code", "gpu_busy") == "gpu_busy", error
    assert stub.requests_to("/v1/messages") == []
    document = gateway.wait_state(tid, {"FAILED", "SUCCESS"})
    assert (document["state"], document["stage"]) == ("FAILED", "gpu_busy")


def test_anthropic_sdk_sees_gpu_busy_as_a_503_overloaded_error(gateway, stub):
    with asr_job_holds_the_gpu(gateway):
        with pytest.raises(anthropic.APIStatusError) as raised:
            claude(gateway).messages.create(model=fresh_model(), max_tokens=64, messages=HI)
    error = raised.value
    assert isinstance(error, (anthropic.InternalServerError, getattr(anthropic, "OverloadedError", ())))
    assert error.status_code == 503
    assert "overloaded_error" in json.dumps(error.body) or "overloaded_error" in str(error), (error.body, str(error))
    assert stub.requests_to("/v1/messages") == []


def test_message_with_broken_json_gets_invalid_request_error(gateway, stub):
    answer = gateway.post("/v1/messages", data=b'{"model": "llama3.2", ', headers={"Content-Type": "application/json"})
    anthropic_error(answer, 400, "invalid_request_error")
    assert stub.received == []


def test_message_without_the_right_key_gets_authentication_error(keyed_gateway, stub):
    body = messages_body(fresh_model())
    anthropic_error(keyed_gateway.post("/v1/messages", json=body), 401, "authentication_error")
    anthropic_error(keyed_gateway.post("/v1/messages", json=body, headers={"x-api-key": "k2"}),
                    401, "authentication_error")
    anthropic_error(keyed_gateway.post("/v1/messages", json=body, headers={"Authorization": "Bearer k2"}),
                    401, "authentication_error")
    with pytest.raises(anthropic.AuthenticationError) as raised:
        claude(keyed_gateway, key="wrong").messages.create(model=fresh_model(), max_tokens=64, messages=HI)
    assert raised.value.status_code == 401
    assert stub.received == []
    # the right key works, from the SDK and as x-api-key, and is not passed on to Ollama
    assert claude(keyed_gateway, key="k1").messages.create(model=fresh_model(), max_tokens=8, messages=HI).content
    assert keyed_gateway.post("/v1/messages", json=messages_body(fresh_model()),
                              headers={"x-api-key": "k1"}).status_code == 200
    assert len(stub.requests_to("/v1/messages")) == 2
    for record in stub.received:
        assert "authorization" not in record.headers and "x-api-key" not in record.headers


def test_message_over_max_body_bytes_gets_request_too_large(ten_mib_gateway, stub):
    # Declared over the limit: answered from Content-Length, the body is never read
    conn = http.client.HTTPConnection("127.0.0.1", ten_mib_gateway.port, timeout=5)
    conn.putrequest("POST", "/v1/messages")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10485760 + 1))
    conn.endheaders(b'{"model": "llama3.2", "messages": [')
    answer = conn.getresponse()
    assert answer.status == 413, answer.read()
    document = json.loads(answer.read())
    conn.close()
    assert document["type"] == "error" and document["error"]["type"] == "request_too_large", document
    assert document["error"]["message"].strip()
    assert stub.received == []


def test_message_when_ollama_is_down_gets_api_error(ollama_down_gateway):
    tid = task_id("msg-down")
    answer = ollama_down_gateway.post("/v1/messages", json=messages_body(fresh_model()), headers={"X-Task-Id": tid})
    anthropic_error(answer, 503, "api_error")
    assert answer.headers["X-Task-Id"] == tid


def test_message_stream_cut_mid_way_ends_with_an_anthropic_error_event(gateway, stub):
    tid = task_id("msg-cut")
    answer = gateway.post("/v1/messages", json=messages_body(fresh_model(), stream=True),
                          headers={"X-Task-Id": tid, "X-Stub": "chunks=5,reset_after=2,chunk_delay=0.1"})
    assert answer.status_code == 200
    events = sse_events(answer.content)
    assert [name for name, _ in events] == ["message_start", "content_block_start", "error"], answer.content
    data = events[-1][1]
    assert data["type"] == "error" and isinstance(data.get("error"), dict), data
    assert data["error"]["type"] in ANTHROPIC_TYPES and data["error"]["message"].strip(), data
    assert set(data) <= {"type", "error", "request_id"} and \
        set(data["error"]) <= {"type", "message", "code", "param", "provider", "task_id"}, data
    document = gateway.wait_state(tid, {"FAILED", "SUCCESS"})
    assert document["state"] == "FAILED", document
    assert gateway.wait_slot_free(1)


def test_anthropic_sdk_stream_raises_on_the_mid_stream_error(gateway, stub):
    stream = claude(gateway).messages.create(model=fresh_model(), max_tokens=64, messages=HI, stream=True,
                                             extra_headers={"X-Stub": "chunks=5,reset_after=2,chunk_delay=0.1"})
    with pytest.raises(anthropic.APIStatusError) as raised:
        list(stream)
    assert isinstance(raised.value.body, dict) and raised.value.body.get("type") == "error", raised.value.body
    assert gateway.wait_slot_free(1)


# ================================================================ 2. transcriptions


BOUNDARY = "edgegate-test-7d1f0c"
AUDIO = b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(range(256)) * 40 + b"\r\n--\r\n\r\n\x00\xff" * 50


def multipart(model, audio, boundary=BOUNDARY):
    b = boundary.encode()
    return (b"--" + b + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + model.encode() + b"\r\n"
            b"--" + b + b'\r\nContent-Disposition: form-data; name="language"\r\n\r\nen\r\n'
            b"--" + b + b'\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n--" + b + b"--\r\n")


def test_transcription_waits_for_no_one_while_the_gpu_is_held(gateway, stub):
    with asr_job_holds_the_gpu(gateway):
        answer = gateway.post("/v1/audio/transcriptions", data=multipart("whisper-x", AUDIO),
                              headers={"Content-Type": "multipart/form-data; boundary=" + BOUNDARY})
    assert answer.status_code == 503, answer.text
    assert gateway_error(answer)["code"] == "gpu_busy"
    assert answer.headers["Retry-After"].isdigit()
    assert stub.requests_to("/v1/audio/transcriptions") == []


def test_transcription_upload_reaches_ollama_byte_for_byte_as_a_task(gateway, stub):
    model, tid = fresh_model("whisper-x"), task_id("asr")
    sent = multipart(model, AUDIO)
    answer = gateway.post("/v1/audio/transcriptions", data=sent, headers={
        "Content-Type": "multipart/form-data; boundary=" + BOUNDARY, "X-Task-Id": tid})
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Task-Id"] == tid
    received = answer.json()["received"]
    assert received["sha256"] == hashlib.sha256(AUDIO).hexdigest() and received["bytes"] == len(AUDIO)
    [record] = stub.requests_to("/v1/audio/transcriptions")
    assert record.body == sent
    assert record.headers["content-type"] == "multipart/form-data; boundary=" + BOUNDARY
    document = gateway.wait_state(tid, {"SUCCESS", "FAILED"})
    assert document["state"] == "SUCCESS", document
    assert document["extensions"]["model"] == model


def test_openai_sdk_transcribes_through_the_gateway(gateway, stub):
    client = openai.OpenAI(base_url=gateway.url + "/v1/", api_key="x", max_retries=0, timeout=10)
    raw = client.audio.transcriptions.with_raw_response.create(model="whisper-x", file=("a.wav", AUDIO, "audio/wav"))
    transcription = raw.parse()
    assert transcription.text == "Hello from the"
    tid = raw.headers["X-Task-Id"]
    [record] = stub.requests_to("/v1/audio/transcriptions")
    assert record.form["file"] == AUDIO and record.form["model"] == "whisper-x"
    assert json.loads(raw.text)["received"]["sha256"] == hashlib.sha256(AUDIO).hexdigest()
    document = gateway.wait_state(tid, {"SUCCESS", "FAILED"})
    assert (document["state"], document["extensions"]["model"]) == ("SUCCESS", "whisper-x"), document


# ================================================================ 3. Ollama cloud models


CLOUD_MODELS = ["gpt-oss:120b-cloud", "qwen3-coder:480b-cloud", "kimi-k2:cloud", "deepseek-v3.1:671b-cloud"]


def inference_request(route, model):
    """(path, body) of an ordinary inference request on ``route``."""
    return {
        "/api/chat": ("/api/chat", {"model": model, "messages": HI, "stream": False}),
        "/api/generate": ("/api/generate", {"model": model, "prompt": "hi", "stream": False}),
        "/v1/chat/completions": ("/v1/chat/completions", {"model": model, "messages": HI}),
        "/v1/messages": ("/v1/messages", messages_body(model)),
    }[route]


def cloud_refusal_message(answer, route):
    """The message of a 403 cloud_model_disabled, in the route's shape."""
    if route == "/v1/messages":
        error = anthropic_error(answer, 403, "permission_error")
        assert error.get("code") == "cloud_model_disabled", answer.text
        return error["message"]
    assert answer.status_code == 403, answer.text
    error = gateway_error(answer)
    assert (error["code"], error["provider"]) == ("cloud_model_disabled", "gateway"), error
    return error["message"]


@pytest.mark.parametrize("route", ["/api/chat", "/api/generate", "/v1/chat/completions", "/v1/messages"])
@pytest.mark.parametrize("model", CLOUD_MODELS)
def test_cloud_models_are_refused_by_default_and_nothing_reaches_ollama(gateway, stub, route, model):
    path, body = inference_request(route, model)
    answer = gateway.post(path, json=body)
    assert "ALLOW_OLLAMA_CLOUD=1" in cloud_refusal_message(answer, route)
    assert stub.received == []


@pytest.mark.parametrize("model", ["kimi-k2:Cloud", "gpt-oss:120b-CLOUD"])
def test_cloud_refusal_is_not_bypassed_by_letter_case(gateway, stub, model):
    # Ollama's parseSourceSuffix compares case-insensitively: these are cloud models to it
    answer = gateway.post("/api/chat", json={"model": model, "messages": HI, "stream": False})
    assert "ALLOW_OLLAMA_CLOUD=1" in cloud_refusal_message(answer, "/api/chat")
    assert stub.received == []


@pytest.mark.parametrize("model", ["llama3.2", "mycloud"])
def test_local_models_still_work(gateway, stub, model):
    answer = gateway.post("/api/chat", json={"model": model, "messages": HI, "stream": False})
    assert answer.status_code == 200, answer.text
    assert [r.json()["model"] for r in stub.requests_to("/api/chat")] == [model]


def test_ollama_python_shows_the_cloud_refusal_as_text(gateway, stub):
    client = ollama.Client(host=gateway.url, timeout=10, trust_env=False)
    with pytest.raises(ollama.ResponseError) as raised:
        client.chat(model="kimi-k2:cloud", messages=HI)
    assert raised.value.status_code == 403
    assert isinstance(raised.value.error, str) and "ALLOW_OLLAMA_CLOUD=1" in raised.value.error
    assert stub.received == []


@pytest.mark.parametrize("route,model", list(zip(["/api/chat", "/api/generate", "/v1/chat/completions", "/v1/messages"],
                                                 CLOUD_MODELS)))
def test_allowed_cloud_models_are_tasks_that_do_not_wait_for_the_gpu(cloud_gateway, stub, route, model):
    tid = task_id("cloud")
    path, body = inference_request(route, model)
    with asr_job_holds_the_gpu(cloud_gateway):
        answer = cloud_gateway.post(path, json=body, headers={"X-Task-Id": tid})
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Task-Id"] == tid
        [record] = stub.requests_to(path)
        assert record.json()["model"] == model
        # a local model on the same gateway still needs the slot
        local_path, local_body = inference_request(route, fresh_model())
        assert cloud_gateway.post(local_path, json=local_body).status_code == 503
    document = cloud_gateway.wait_state(tid, {"SUCCESS", "FAILED"})
    assert (document["state"], document["extensions"]["model"]) == ("SUCCESS", model), document


# ================================================================ 4. account and web routes


ACCOUNT_ROUTES = [("POST", "/api/me"), ("POST", "/api/signout"), ("DELETE", "/api/user/keys/abc"),
                  ("POST", "/api/user/keys"), ("POST", "/api/user/keys/abc/rotate"),
                  ("POST", "/api/experimental/web_search"), ("POST", "/api/experimental/web_fetch")]


@pytest.mark.parametrize("method,path", ACCOUNT_ROUTES)
def test_account_and_web_routes_are_refused_like_management(gateway, stub, method, path):
    tid = task_id("acct")
    answer = requests.request(method, gateway.url + path, json={"query": "x", "url": "https://example.com/"},
                              headers={"X-Task-Id": tid}, timeout=5)
    assert answer.status_code == 403, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    error = gateway_error(answer)  # Ollama's shape on /api
    assert (error["code"], error["provider"], error["task_id"]) == ("management_disabled", "gateway", tid)
    assert "ALLOW_MANAGEMENT" in error["message"]
    assert stub.received == []


def test_account_and_web_routes_pass_when_management_is_allowed(management_gateway, stub):
    reachable = [("POST", "/api/me"), ("POST", "/api/signout"), ("DELETE", "/api/user/keys/abc"),
                 ("POST", "/api/experimental/web_search"), ("POST", "/api/experimental/web_fetch")]
    for method, path in reachable:
        answer = requests.request(method, management_gateway.url + path,
                                  json={"query": "x", "url": "https://example.com/"}, timeout=5)
        assert answer.status_code == 200, (path, answer.text)
    assert [(r.method, r.path) for r in stub.received] == reachable
    assert management_gateway.post("/api/user/keys", json={}).status_code != 403
    assert stub.received[-1].path == "/api/user/keys"


SPELLINGS = ["//api/pull", "/api/pull/", "/api/%70ull", "/api/./pull", "/api/x/../pull", "/api%2Fpull",
             "/api/experimental/web_search/", "/api/user/keys/../me"]


@pytest.mark.parametrize("target", SPELLINGS)
def test_refused_routes_cannot_be_reached_by_another_spelling(gateway, stub, target):
    status = raw_status(gateway, "POST", target, b'{"model": "llama3.2", "query": "x"}')
    time.sleep(0.05)  # anything forwarded would have been recorded by now
    forwarded = [(r.method, r.path) for r in stub.received]
    assert forwarded == [], "%s was forwarded to Ollama as %s (answered %d)" % (target, forwarded, status)
    assert status in (400, 403), (target, status)


# ================================================================ 5. compressed request bodies


def compress(encoding, data):
    if encoding == "gzip":
        return gzip.compress(data)
    if encoding == "deflate":
        return zlib.compress(data)  # HTTP's deflate is the zlib format (RFC 9110 8.4.1.2)
    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "zstd"])
def test_compressed_request_bodies_are_forwarded_decoded(gateway, stub, encoding, route):
    document = {"model": fresh_model(), "messages": HI, "stream": False, "note": "é" * 200}
    plain = json.dumps(document).encode()
    answer = gateway.post(route, data=compress(encoding, plain),
                          headers={"Content-Type": "application/json", "Content-Encoding": encoding})
    assert answer.status_code == 200, answer.text
    [record] = stub.requests_to(route)
    assert "content-encoding" not in record.headers, record.headers
    assert int(record.headers.get("content-length", -1)) == len(record.body), record.headers
    if route == "/api/chat":
        assert record.json() == dict(document, keep_alive="30s")
    else:
        assert record.body == plain


def test_gzip_bomb_is_refused_quickly_without_inflating_it(ten_mib_gateway, stub):
    bomb = gzip.compress(b'{"model": "llama3.2", "messages": [{"role": "user", "content": "' + b"A" * (50 * MiB),
                         compresslevel=9)
    assert len(bomb) < 100 * 1024
    [worker] = ten_mib_gateway.worker_pids()
    ten_mib_gateway.get("/healthz")
    before = proc_status_kib(worker, "VmRSS")
    started = time.monotonic()
    answer = ten_mib_gateway.post("/api/chat", data=bomb, headers={"Content-Type": "application/json",
                                                                   "Content-Encoding": "gzip"})
    took = time.monotonic() - started
    after = proc_status_kib(worker, "VmRSS")
    assert answer.status_code == 413, answer.text
    assert gateway_error(answer)["code"] == "body_too_large"
    assert took < 2, took
    assert (after - before) * 1024 < 25 * MiB, "the worker grew by %d KiB" % (after - before)
    assert stub.received == []


@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("encoding", ["br", "compress"])
def test_unknown_content_encoding_is_refused_with_415(gateway, stub, route, encoding):
    answer = gateway.post(route, data=b"\x8b\x00compressed?", headers={"Content-Type": "application/json",
                                                                       "Content-Encoding": encoding})
    assert answer.status_code == 415, answer.text
    assert gateway_error(answer)["code"] == "unsupported_encoding"
    assert stub.received == []


@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions"])
def test_corrupt_gzip_is_refused_with_400(gateway, stub, route):
    corrupt = gzip.compress(json.dumps({"model": "llama3.2", "messages": HI}).encode())
    corrupt = corrupt[:12] + bytes(b ^ 0x5A for b in corrupt[12:-8]) + corrupt[-8:]
    answer = gateway.post(route, data=corrupt, headers={"Content-Type": "application/json",
                                                        "Content-Encoding": "gzip"})
    assert answer.status_code == 400, answer.text
    gateway_error(answer)
    assert stub.received == []


# ================================================================ 6. CORS


PREFLIGHT_HEADERS = "authorization,content-type,x-api-key,x-task-id,anthropic-version"


def preflight(gateway, origin, path="/v1/chat/completions"):
    return requests.options(gateway.url + path, timeout=5, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": PREFLIGHT_HEADERS})


def assert_preflight_allowed(answer, origin, any_origin=False):
    assert answer.status_code == 204, (answer.status_code, answer.text)
    allowed = answer.headers.get("Access-Control-Allow-Origin")
    assert allowed == origin or (any_origin and allowed == "*"), answer.headers
    assert "post" in listed(answer.headers.get("Access-Control-Allow-Methods")), answer.headers
    assert listed(PREFLIGHT_HEADERS) <= listed(answer.headers.get("Access-Control-Allow-Headers")), answer.headers
    assert answer.headers.get("Access-Control-Max-Age", "").isdigit(), answer.headers


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://127.0.0.1:8080", "app://obsidian.md",
                                    "vscode-webview://abc", "http://localhost"])
def test_browser_preflight_from_ollamas_default_origins_needs_no_key(keyed_gateway, stub, origin):
    assert_preflight_allowed(preflight(keyed_gateway, origin), origin)
    assert stub.received == []


def test_browser_request_from_an_allowed_origin_can_read_task_id_and_retry_after(gateway, keyed_gateway, stub):
    origin = "http://localhost:3000"
    answer = gateway.post("/v1/chat/completions", json={"model": "llama3.2", "messages": HI},
                          headers={"Origin": origin})
    assert answer.status_code == 200, answer.text
    assert answer.headers.get("Access-Control-Allow-Origin") == origin, answer.headers
    exposed = listed(answer.headers.get("Access-Control-Expose-Headers"))
    assert {"x-task-id", "retry-after"} <= exposed, answer.headers
    # the key is still needed for the request itself
    refused = keyed_gateway.post("/v1/chat/completions", json={"model": "llama3.2", "messages": HI},
                                 headers={"Origin": origin})
    assert refused.status_code == 401
    assert gateway_error(refused)["code"] == "unauthorized"


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost.evil.example"])
def test_foreign_origin_gets_no_cors_headers(gateway, stub, origin):
    assert cors_headers(preflight(gateway, origin)) == {}
    answer = gateway.post("/v1/chat/completions", json={"model": "llama3.2", "messages": HI},
                          headers={"Origin": origin})
    assert cors_headers(answer) == {}, answer.headers


def test_cors_origins_adds_an_origin_to_the_defaults(start_gateway, stub):
    gateway = start_gateway(CORS_ORIGINS="https://app.example.com", WORKERS="1")
    assert_preflight_allowed(preflight(gateway, "https://app.example.com"), "https://app.example.com")
    assert_preflight_allowed(preflight(gateway, "http://localhost:3000"), "http://localhost:3000")
    assert cors_headers(preflight(gateway, "https://evil.example")) == {}
    answer = gateway.post("/v1/chat/completions", json={"model": "llama3.2", "messages": HI},
                          headers={"Origin": "https://app.example.com"})
    assert answer.headers.get("Access-Control-Allow-Origin") == "https://app.example.com", answer.headers


def test_cors_origins_star_allows_any_origin(start_gateway, stub):
    gateway = start_gateway(CORS_ORIGINS="*", WORKERS="1")
    assert_preflight_allowed(preflight(gateway, "https://evil.example"), "https://evil.example", any_origin=True)
    answer = gateway.post("/v1/chat/completions", json={"model": "llama3.2", "messages": HI},
                          headers={"Origin": "https://anything.example"})
    assert answer.headers.get("Access-Control-Allow-Origin") in ("https://anything.example", "*"), answer.headers


# ================================================================ 7. GET / and HEAD /


def test_ollama_cli_probe_of_root_is_answered_by_ollama_without_a_key(keyed_gateway, stub):
    answer = keyed_gateway.get("/")
    assert (answer.status_code, answer.text) == (200, "Ollama is running")
    head = requests.head(keyed_gateway.url + "/", timeout=5)
    assert head.status_code == 200
    assert [(r.method, r.path) for r in stub.received] == [("GET", "/"), ("HEAD", "/")]


# ================================================================ 8. readable errors


@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions", "/v1/messages"])
def test_unreachable_ollama_is_explained_in_plain_words(ollama_down_gateway, route):
    path, body = inference_request(route, fresh_model())
    answer = ollama_down_gateway.post(path, json=body)
    assert answer.status_code == 503, answer.text
    if route == "/v1/messages":
        message = anthropic_error(answer, 503, "api_error")["message"]
    else:
        message = gateway_error(answer)["message"]
    assert "cannot connect to Ollama at http://127.0.0.1:%d" % ollama_down_gateway.upstream_port in message, message
    assert "connection refused" in message, message
    for noise in ("HTTPConnectionPool", "WatchedPool", "Max retries", "object at 0x"):
        assert noise not in message, message
