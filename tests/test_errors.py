"""Every error in the README's "Errors", produced for real and checked from outside;
the API key; configuration that stops the start; health and readiness."""

import json
import os
import socket
import subprocess
import sys
import time

import openai
import pytest
import requests

from conftest import GatewayProcess, REPO, free_port, gateway_error

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


def assert_envelope(answer, status, code, provider="gateway", task_id=None):
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    error = gateway_error(answer)
    assert (error["code"], error["type"], error["provider"], error["param"]) == (code, code, provider, None)
    assert error["message"]
    if task_id is not None:
        assert error["task_id"] == task_id
        assert answer.headers["X-Task-Id"] == task_id
    return error


def test_invalid_json_is_refused(gateway, stub):
    answer = gateway.post("/api/chat", data=b'{"model": ', headers={"X-Task-Id": "bad-json"})
    assert_envelope(answer, 400, "invalid_json", task_id="bad-json")
    assert stub.received == []


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"null", b"\xff\xfe{}", b"[" * 100000])
def test_body_that_is_not_a_json_object_is_refused(gateway, stub, body):
    answer = gateway.post("/v1/chat/completions", data=body, headers={"X-Task-Id": "not-object"})
    assert_envelope(answer, 400, "invalid_json", task_id="not-object")
    assert stub.received == []


@pytest.mark.parametrize("task_id", ["-starts-with-dash", "has space", "x" * 129, "semi;colon", "_index", "ünï"])
def test_bad_task_id_is_refused(gateway, stub, task_id):
    answer = requests.get(gateway.url + "/api/tags", headers={"X-Task-Id": task_id.encode("utf-8")}, timeout=5)
    assert_envelope(answer, 400, "invalid_task_id")
    assert "X-Task-Id" not in answer.headers
    assert stub.received == []


def test_oversized_body_is_refused_before_it_is_read(start_gateway, stub):
    gateway = start_gateway(MAX_BODY_BYTES="1000", WORKERS="1")
    assert gateway.post("/api/chat", data=json.dumps(dict(CHAT, pad="x" * 900))).status_code == 200
    answer = gateway.post("/api/chat", data=b"{" + b" " * 2000 + b"}", headers={"X-Task-Id": "too-big"})
    assert_envelope(answer, 413, "body_too_large", task_id="too-big")
    # A 1 GB Content-Length with a small body: answered at once, nothing read
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    started = time.monotonic()
    sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n{}")
    sock.settimeout(3)
    head = sock.recv(4096)
    assert time.monotonic() - started < 1.0
    assert head.startswith(b"HTTP/1.1 413 ")
    sock.close()
    # a chunked request body over the limit too
    answer = requests.post(gateway.url + "/api/chat", data=iter([b"{", b" " * 1500, b"}"]), timeout=5)
    assert_envelope(answer, 413, "body_too_large")
    assert len(stub.received) == 1


def test_chunked_request_body_is_forwarded(gateway, stub):
    answer = requests.post(gateway.url + "/api/chat", data=iter([b'{"model": "llama3.2", ', b'"stream": false}']),
                           timeout=5)
    assert answer.status_code == 200
    assert stub.received[0].json() == {"model": "llama3.2", "stream": False, "keep_alive": "30s"}


@pytest.mark.parametrize("path", ["/nothing", "/v2/chat", "/tasks"])
def test_unknown_route_gets_404_envelope(gateway, path):
    assert_envelope(gateway.get(path), 404, "not_found")


def test_dot_segments_in_paths_are_refused(gateway, stub):
    for path in ("/api/./pull", "/api//pull", "/api/x/../pull"):
        sock = socket.create_connection(("127.0.0.1", gateway.port))
        sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        sock.settimeout(3)
        assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")
        sock.close()
    assert stub.received == []


@pytest.mark.parametrize("method,path", [("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"),
                                         ("POST", "/api/copy"), ("DELETE", "/api/delete"),
                                         ("POST", "/api/blobs/sha256:abc"), ("POST", "/api/pull/")])
def test_management_endpoints_are_refused(gateway, stub, method, path):
    answer = requests.request(method, gateway.url + path, json={"model": "llama3.2"}, timeout=5,
                              headers={"X-Task-Id": "mgmt-1"})
    error = assert_envelope(answer, 403, "management_disabled", task_id="mgmt-1")
    assert "ALLOW_MANAGEMENT" in error["message"]
    assert stub.received == []


def test_management_endpoints_pass_when_allowed(start_gateway, stub):
    gateway = start_gateway(ALLOW_MANAGEMENT="1", WORKERS="1")
    assert gateway.post("/api/pull", json={"model": "llama3.2"}).json() == {"status": "success"}
    assert [r.path for r in stub.received] == ["/api/pull"]


def test_upstream_down_gives_503_unreachable(start_gateway):
    gateway = start_gateway(UPSTREAM_BASE="http://127.0.0.1:%d" % free_port(), WORKERS="1")
    started = time.monotonic()
    answer = gateway.post("/api/chat", json=CHAT, headers={"X-Task-Id": "down-1"})
    assert time.monotonic() - started < 2  # refused connections, retried twice, fast
    assert_envelope(answer, 503, "upstream_unreachable", provider="ollama", task_id="down-1")
    assert answer.headers["Retry-After"] == "2"
    openai_answer = gateway.post("/v1/chat/completions", json=CHAT)
    assert_envelope(openai_answer, 503, "upstream_unreachable", provider="ollama")
    assert gateway.post("/api/chat", json=CHAT).status_code == 503  # the gateway stays up
    assert gateway.wait_slot_free(1)


def test_upstream_too_slow_gives_504(start_gateway, stub):
    gateway = start_gateway(UPSTREAM_READ_TIMEOUT_S="0.5", WORKERS="1")
    answer = gateway.post("/api/chat", json=CHAT, headers={"X-Stub": "delay=3", "X-Task-Id": "slow-1"})
    assert_envelope(answer, 504, "upstream_timeout", provider="ollama", task_id="slow-1")
    assert gateway.wait_slot_free(1)


def test_upstream_reset_before_answer_gives_502(gateway, stub):
    answer = gateway.post("/api/chat", json=CHAT, headers={"X-Stub": "reset_after=0", "X-Task-Id": "reset-0"})
    assert_envelope(answer, 502, "upstream_error", provider="ollama", task_id="reset-0")


def test_upstream_reset_mid_stream_ends_sse_with_an_error_event(gateway, stub):
    # chunk_delay: an RST makes the kernel drop data not yet read, so the
    # gateway must have read the first pieces before it comes
    answer = gateway.post("/v1/chat/completions", json=dict(CHAT, stream=True),
                          headers={"X-Stub": "chunks=5,reset_after=2,chunk_delay=0.1", "X-Task-Id": "reset-sse"})
    assert answer.status_code == 200
    events = [line for line in answer.content.split(b"\n\n") if line.startswith(b"data: ")]
    assert len(events) == 3
    error = json.loads(events[-1][len(b"data: "):])["error"]
    assert (error["code"], error["provider"], error["task_id"]) == ("upstream_error", "ollama", "reset-sse")
    assert gateway.wait_slot_free(1)


def test_upstream_reset_mid_stream_ends_ndjson_with_an_error_line(gateway, stub):
    answer = gateway.post("/api/chat", json=CHAT, headers={"X-Stub": "chunks=5,reset_after=2,chunk_delay=0.1"})
    lines = answer.content.splitlines()
    assert len(lines) == 3
    last = json.loads(lines[-1])  # Ollama's shape: the text, and the gateway's fields beside it
    assert set(last) == {"error", "code", "provider", "task_id"} and isinstance(last["error"], str)
    assert (last["code"], last["provider"]) == ("upstream_error", "ollama")


def test_openai_sdk_sees_the_mid_stream_error(gateway, stub):
    client = openai.OpenAI(base_url=gateway.url + "/v1/", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="llama3.2", messages=CHAT["messages"], stream=True,
                                            extra_headers={"X-Stub": "chunks=5,reset_after=2"})
    with pytest.raises(openai.APIError) as raised:
        list(stream)
    assert "Ollama at http://127.0.0.1" in str(raised.value) and "failed" in str(raised.value)


def test_upstream_404_on_v1_is_enveloped(gateway, stub):
    answer = gateway.post("/v1/chat/completions", json=dict(CHAT, model="missing"), headers={"X-Task-Id": "nf-1"})
    error = assert_envelope(answer, 404, "not_found", provider="ollama", task_id="nf-1")
    assert error["message"] == "model 'missing' not found"
    client = openai.OpenAI(base_url=gateway.url + "/v1/", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=CHAT["messages"])


def test_upstream_404_on_api_is_forwarded_verbatim(gateway, stub):
    answer = gateway.post("/api/chat", json=dict(CHAT, model="missing"), headers={"X-Task-Id": "nf-2"})
    assert answer.status_code == 404
    assert answer.json() == {"error": "model 'missing' not found"}
    assert answer.headers["X-Task-Id"] == "nf-2"


def test_upstream_500_html_on_api_is_forwarded_and_the_gateway_keeps_serving(gateway, stub):
    answer = gateway.post("/api/chat", json=CHAT, headers={"X-Stub": "html500=1"})
    assert answer.status_code == 500 and b"<html>" in answer.content
    assert gateway.post("/api/chat", json=dict(CHAT, stream=False)).status_code == 200


def test_truncated_upstream_body_ends_the_stream_with_an_error_line(gateway, stub):
    answer = gateway.post("/api/chat", json=CHAT, headers={"X-Stub": "chunks=4,truncate_after=2"})
    lines = answer.content.splitlines()
    last = json.loads(lines[-1])
    assert last.keys() == {"error", "code", "provider", "task_id"} and isinstance(last["error"], str)
    assert gateway.wait_slot_free(1)


# ---------------------------------------------------------------- API keys


@pytest.fixture(scope="module")
def keyed_gateway(start_gateway, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text("# operators\nkey-one\nkey-two\n")
    return start_gateway(GATEWAY_API_KEYS="@%s" % key_file, WORKERS="1")


@pytest.mark.parametrize("path", ["/v1/models", "/api/tags", "/slots", "/tasks/status", "/readyz", "/nothing"])
def test_every_route_but_healthz_needs_a_key(keyed_gateway, stub, path):
    answer = keyed_gateway.get(path)
    assert_envelope(answer, 401, "unauthorized")
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert_envelope(keyed_gateway.get(path, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    assert keyed_gateway.get("/healthz").status_code == 200
    assert stub.received == []


def test_a_valid_key_passes_and_is_not_forwarded(keyed_gateway, stub):
    assert keyed_gateway.get("/v1/models", headers={"Authorization": "Bearer key-two"}).status_code == 200
    assert keyed_gateway.get("/api/tags", headers={"X-API-Key": "key-one"}).status_code == 200
    client = openai.OpenAI(base_url=keyed_gateway.url + "/v1/", api_key="key-one", max_retries=0)
    assert client.models.list().data
    assert len(stub.received) == 3
    for record in stub.received:
        assert "authorization" not in record.headers and "x-api-key" not in record.headers


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("name,value,expected", [
    ("UPSTREAM_BASE", "http://127.0.0.1:11434/v1", "UPSTREAM_BASE"),
    ("UPSTREAM_BASE", "ftp://x", "UPSTREAM_BASE"),
    ("GPU_SLOTS", "zero", "GPU_SLOTS"),
    ("GPU_SLOTS", "0", "GPU_SLOTS"),
    ("SLOT_WAIT_S", "-1", "SLOT_WAIT_S"),
    ("HEARTBEAT_SEC", "soon", "HEARTBEAT_SEC"),
    ("KEEP_ALIVE_DEFAULT", "forever", "KEEP_ALIVE_DEFAULT"),
    ("KEEP_ALIVE_DEFAULT", "0", "KEEP_ALIVE_DEFAULT"),
    ("REDIS_URL", "http://localhost", "REDIS_URL"),
    ("ALLOW_MANAGEMENT", "maybe", "ALLOW_MANAGEMENT"),
    ("GATEWAY_API_KEYS", "@/nonexistent/keys", "GATEWAY_API_KEYS"),
    ("WORKERS", "0", "WORKERS"),
    ("MAX_BODY_BYTES", "64MB", "MAX_BODY_BYTES"),
])
def test_bad_configuration_stops_the_start_with_one_line(name, value, expected, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPSTREAM_", "REDIS_"))}
    env.update({"STATE_DIR": str(tmp_path), "GATEWAY_BIND": "127.0.0.1:%d" % free_port(), name: value})
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "gateway:app"],
                          cwd=REPO, env=env, capture_output=True, timeout=30)
    assert done.returncode != 0
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("edgegate: configuration error: %s=" % expected)


def test_starts_with_no_redis_and_no_ollama(tmp_path):
    """The README's first command on a bare machine: requests get 503, never a crash."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPSTREAM_", "REDIS_", "GATEWAY_"))}
    gateway = GatewayProcess({"UPSTREAM_BASE": "http://127.0.0.1:%d" % free_port()})
    gateway.env = dict(env, **{k: gateway.env[k] for k in ("GATEWAY_BIND", "STATE_DIR", "UPSTREAM_BASE")})
    gateway.env["WORKERS"] = "2"
    gateway.start()
    try:
        assert_envelope(gateway.post("/api/chat", json=CHAT), 503, "upstream_unreachable", provider="ollama")
        assert gateway.get("/healthz").status_code == 200
        ready = gateway.get("/readyz")
        assert_envelope(ready, 503, "upstream_unreachable", provider="ollama")
    finally:
        gateway.stop()


# ---------------------------------------------------------------- health


def test_healthz_never_touches_upstream(gateway, stub):
    answer = gateway.get("/healthz").json()
    assert answer["status"] == "ok" and set(answer) == {"status", "pid"}
    assert answer["pid"] in gateway.worker_pids()
    assert stub.received == []


def test_readyz_checks_upstream_and_store(gateway, stub):
    answer = gateway.get("/readyz")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ready", "store": "sqlite"}
    assert [r.path for r in stub.received] == ["/api/version"]


def test_readyz_names_a_failing_upstream(gateway, stub):
    stub.defaults = {"status": "500"}
    answer = gateway.get("/readyz")
    error = assert_envelope(answer, 503, "upstream_unreachable", provider="ollama")
    assert "upstream" in error["message"]


@pytest.mark.parametrize("body", [b'{"model": "llama3.2", "temperature": NaN}', b'{"model": "llama3.2", "x": Infinity}',
                                  b'{"model": "llama3.2", "x": "\\ud800"}', '{"model": "llama3.2"}'.encode("utf-16")])
def test_json_that_ollamas_decoder_refuses_is_refused_here(gateway, stub, body):
    answer = gateway.post("/api/chat", data=body, headers={"X-Task-Id": "strict-json"})
    assert_envelope(answer, 400, "invalid_json", task_id="strict-json")
    assert stub.received == []


@pytest.mark.parametrize("model", [3, None, ["llama3.2"], {"name": "llama3.2"}])
def test_a_model_that_is_not_a_string_is_refused_before_the_slot(gateway, stub, model):
    answer = gateway.post("/v1/chat/completions", json={"model": model, "messages": CHAT["messages"]})
    assert_envelope(answer, 400, "invalid_request")
    assert stub.received == [] and gateway.wait_slot_free(1)


def test_an_answer_shorter_than_its_content_length_closes_the_clients_connection(gateway, stub):
    """The client was promised 200 bytes and gets 19: its connection is
    closed so that it sees the cut at once, instead of waiting on a
    kept-alive connection for bytes that never come."""
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    body = json.dumps(dict(CHAT, stream=False)).encode()
    sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nX-Stub: short_body=1\r\nX-Task-Id: short-1\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    sock.settimeout(5)
    started, received = time.monotonic(), b""
    while True:
        data = sock.recv(65536)
        if not data:
            break
        received += data
    assert time.monotonic() - started < 3  # closed, not left waiting
    assert b"Content-Length: 200" in received and len(received.partition(b"\r\n\r\n")[2]) < 200
    document = gateway.wait_state("short-1", ["SUCCESS", "FAILED"])
    assert (document["state"], document["stage"]) == ("FAILED", "upstream_error")


def test_every_status_the_gateway_sends_has_its_real_reason_phrase(gateway, stub):
    """Reason phrases come from the standard library (``http.HTTPStatus``), for
    the gateway's own answers (415, a CORS preflight's 204, 404, 409) and the
    worker's (405)."""
    import http

    seen = [
        gateway.post("/api/chat", data=b"x", headers={"Content-Encoding": "br"}),
        requests.options(gateway.url + "/api/chat", headers={"Origin": "http://localhost:3000",
                                                             "Access-Control-Request-Method": "POST"}, timeout=5),
        gateway.get("/nowhere"),
        requests.request("TRACE", gateway.url + "/api/tags", timeout=5),
    ]
    assert [answer.status_code for answer in seen] == [415, 204, 404, 405]
    for answer in seen:
        assert answer.reason == http.HTTPStatus(answer.status_code).phrase, (answer.status_code, answer.reason)
