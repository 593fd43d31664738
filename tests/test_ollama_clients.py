"""Ollama's own clients show the gateway's errors as text (issue #16).

Ollama answers an error with ``{"error": "<message>"}``, and its clients read
exactly that: ollama-python's ``ResponseError`` takes ``body["error"]`` as
``.error`` (``ollama/_types.py``), and ollama-js's ``checkOk`` does
``new ResponseError(body.error, status)`` (``ollama/dist/browser.mjs``), an
``Error`` whose message is ``String(body.error)``. Given the OpenAI-style
envelope, ``body["error"]`` is an object: Python apps print a dict, JS apps
print ``[object Object]``. So on ``/api/*`` (and ``/``) the gateway's own
errors are ``{"error": "<message>", "code", "provider", "task_id"}``, and a
stream cut mid-way ends with one last line of that shape; ``/v1/*`` and the
gateway's own routes keep the OpenAI-style envelope.

The clients are the real ones: the ``ollama`` Python package, and the
``ollama`` npm package run by ``node`` (``tests/js/``, installed with
``npm ci --prefix tests/js`` when missing).
"""

import json
import os
import shutil
import subprocess

import ollama
import pytest
import requests

from conftest import asr_job_holds_the_gpu

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
JS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js")

# The exact fields of an error the gateway makes on /api/* (SPEC 6).
OLLAMA_SHAPE = {"error", "code", "provider", "task_id"}


# ---------------------------------------------------------------- helpers


def ollama_client(url, **headers):
    # trust_env=False: a proxy variable on the test machine must not reroute
    # 127.0.0.1; the env's OLLAMA_API_KEY is cleared by the fixture below.
    return ollama.Client(host=url, headers=headers, timeout=10, trust_env=False)


@pytest.fixture(autouse=True)
def no_ollama_api_key(monkeypatch):
    """ollama-python sends $OLLAMA_API_KEY as a Bearer key when set; the
    stories below decide for themselves whether a key is sent."""
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)


def ollama_error_of(call):
    """The ResponseError an app would catch, checked to carry text."""
    with pytest.raises(ollama.ResponseError) as raised:
        call()
    error = raised.value
    assert isinstance(error.error, str), (
        "ResponseError.error should be the message text, got %r" % (error.error,))
    return error


def assert_ollama_error(answer, status, code, provider="gateway", task_id=None):
    """One error the gateway made on /api/*, in Ollama's shape; its message."""
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"] == "application/json"  # ollama-js parses JSON only then
    body = answer.json()
    assert isinstance(body.get("error"), str), "Ollama clients need a text error, got %s" % answer.text
    assert set(body) == OLLAMA_SHAPE, answer.text
    assert (body["code"], body["provider"]) == (code, provider), answer.text
    assert body["error"].strip()
    if task_id is not None:
        assert body["task_id"] == task_id
        assert answer.headers["X-Task-Id"] == task_id
    return body["error"]


def assert_openai_envelope(answer, status, code, provider="gateway"):
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert isinstance(error, dict), answer.text
    assert set(error) == {"message", "type", "code", "param", "provider", "task_id"}
    assert (error["code"], error["type"], error["provider"]) == (code, code, provider)
    return error


# ---------------------------------------------------------------- gateways


@pytest.fixture(scope="module")
def small_body_gateway(start_gateway):
    return start_gateway(MAX_BODY_BYTES="1000", WORKERS="1")


# ---------------------------------------------------------------- ollama-python


def test_ollama_python_shows_gpu_busy_message(gateway, stub):
    client = ollama_client(gateway.url, **{"X-Task-Id": "busy-py"})
    with asr_job_holds_the_gpu(gateway):
        error = ollama_error_of(lambda: client.chat(**CHAT))
        streamed = ollama_error_of(lambda: list(client.chat(stream=True, **CHAT)))
    for refused in (error, streamed):
        assert refused.status_code == 503
        assert "busy" in refused.error.lower() and "asr-42" in refused.error
        assert str(refused) == "%s (status code: 503)" % refused.error  # what an app prints
    assert stub.requests_to("/api/chat") == []


@pytest.mark.parametrize("call", ["pull", "delete"])
def test_ollama_python_shows_why_pull_and_delete_are_refused(gateway, stub, call):
    client = ollama_client(gateway.url)
    error = ollama_error_of(lambda: getattr(client, call)("llama3.2"))
    assert error.status_code == 403
    assert "allow_management" in error.error.lower()
    assert stub.received == []


def test_ollama_python_shows_that_an_api_key_is_needed(keyed_gateway, stub):
    error = ollama_error_of(lambda: ollama_client(keyed_gateway.url).list())
    assert error.status_code == 401
    assert "key" in error.error.lower()
    # the key the message asks for makes the same call pass
    assert ollama_client(keyed_gateway.url, Authorization="Bearer key-one").list().models


def test_ollama_python_shows_body_too_large(small_body_gateway, stub):
    client = ollama_client(small_body_gateway.url)
    long_prompt = [{"role": "user", "content": "x" * 2000}]
    error = ollama_error_of(lambda: client.chat(model="llama3.2", messages=long_prompt))
    assert error.status_code == 413
    assert "max_body_bytes" in error.error.lower()
    assert stub.received == []


def test_ollama_python_shows_that_ollama_cannot_be_reached(ollama_down_gateway):
    error = ollama_error_of(lambda: ollama_client(ollama_down_gateway.url).chat(**CHAT))
    assert error.status_code == 503
    assert "cannot connect to ollama at" in error.error.lower()


@pytest.mark.parametrize("knob", ["reset_after=2", "truncate_after=2"])
def test_ollama_python_shows_a_stream_cut_mid_way_as_text(gateway, stub, knob):
    # ollama-python raises ResponseError(line["error"]) for an error line; it
    # parses that with json.loads, which would raise TypeError (not caught)
    # if the line's "error" were an object.
    client = ollama_client(gateway.url, **{"X-Stub": "chunks=5,chunk_delay=0.1," + knob})
    parts = []

    def read_the_stream():
        for part in client.chat(stream=True, **CHAT):
            parts.append(part.message.content)

    error = ollama_error_of(read_the_stream)
    assert parts == ["Hello", " from"]
    assert "ollama at http://127.0.0.1" in error.error.lower()  # who failed, in words
    assert gateway.wait_slot_free(1)


# ---------------------------------------------------------------- the shape on the wire


def test_gpu_busy_on_api_is_ollamas_shape_with_retry_after(gateway, stub):
    with asr_job_holds_the_gpu(gateway):
        answer = gateway.post("/api/chat", json=CHAT, headers={"X-Task-Id": "busy-raw"})
        embed = gateway.post("/api/embed", json={"model": "nomic-embed-text", "input": "hi"})
    message = assert_ollama_error(answer, 503, "gpu_busy", task_id="busy-raw")
    assert "asr-42" in message
    assert answer.headers["Retry-After"] == "2"
    assert_ollama_error(embed, 503, "gpu_busy")
    assert embed.headers["Retry-After"] == "2"


def test_refusals_on_api_are_ollamas_shape(gateway, stub):
    answer = requests.delete(gateway.url + "/api/delete", json={"model": "llama3.2"},
                             headers={"X-Task-Id": "mgmt-raw"}, timeout=5)
    assert "ALLOW_MANAGEMENT" in assert_ollama_error(answer, 403, "management_disabled", task_id="mgmt-raw")
    answer = gateway.post("/api/chat", data=b'{"model": ', headers={"X-Task-Id": "json-raw"})
    assert_ollama_error(answer, 400, "invalid_json", task_id="json-raw")
    assert stub.received == []


def test_missing_key_on_api_is_ollamas_shape_with_www_authenticate(keyed_gateway, stub):
    answer = keyed_gateway.get("/api/tags")
    assert_ollama_error(answer, 401, "unauthorized")
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert stub.received == []


def test_root_answers_without_a_key_like_ollama(keyed_gateway, stub):
    """The `ollama` CLI checks GET/HEAD / first: it answers as Ollama does, no key needed."""
    assert keyed_gateway.get("/").text == "Ollama is running"
    assert requests.head(keyed_gateway.url + "/", timeout=5).status_code == 200


def test_body_too_large_on_api_is_ollamas_shape(small_body_gateway, stub):
    answer = small_body_gateway.post("/api/chat", data=b"{" + b" " * 2000 + b"}", headers={"X-Task-Id": "big-raw"})
    assert "MAX_BODY_BYTES" in assert_ollama_error(answer, 413, "body_too_large", task_id="big-raw")


def test_ollama_unreachable_on_api_is_ollamas_shape_with_retry_after(ollama_down_gateway):
    answer = ollama_down_gateway.post("/api/chat", json=CHAT, headers={"X-Task-Id": "down-raw"})
    assert_ollama_error(answer, 503, "upstream_unreachable", provider="ollama", task_id="down-raw")
    assert answer.headers["Retry-After"] == "2"


@pytest.mark.parametrize("knob", ["reset_after=2", "truncate_after=2"])
def test_ndjson_stream_cut_mid_way_ends_with_one_ollama_error_line(gateway, stub, knob):
    answer = gateway.post("/api/chat", json=CHAT, headers={"X-Stub": "chunks=5,chunk_delay=0.1," + knob,
                                                           "X-Task-Id": "cut-" + knob[:5]})
    assert answer.status_code == 200
    lines = [json.loads(line) for line in answer.content.splitlines()]
    assert len(lines) == 3
    assert all("error" not in line for line in lines[:2])
    last = lines[-1]
    assert isinstance(last.get("error"), str) and last["error"], last
    assert set(last) == OLLAMA_SHAPE, last
    assert (last["code"], last["provider"], last["task_id"]) == ("upstream_error", "ollama", "cut-" + knob[:5])
    assert gateway.wait_slot_free(1)


def test_v1_and_the_gateways_own_routes_keep_the_openai_envelope(gateway, keyed_gateway, ollama_down_gateway, stub):
    with asr_job_holds_the_gpu(gateway):
        busy = gateway.post("/v1/chat/completions", json=CHAT, headers={"X-Task-Id": "busy-v1"})
    error = assert_openai_envelope(busy, 503, "gpu_busy")
    assert error["task_id"] == "busy-v1" and busy.headers["X-Task-Id"] == "busy-v1"
    assert busy.headers["Retry-After"] == "2"
    assert_openai_envelope(gateway.get("/tasks/status/never-seen"), 404, "not_found")
    for path in ("/v1/models", "/slots", "/tasks/status", "/readyz"):
        answer = keyed_gateway.get(path)
        assert_openai_envelope(answer, 401, "unauthorized")
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert_openai_envelope(ollama_down_gateway.get("/readyz"), 503, "upstream_unreachable", provider="ollama")


# ---------------------------------------------------------------- ollama-js


@pytest.fixture(scope="module")
def ollama_js():
    """Run tests/js/ollama_error.mjs: one call through the ollama npm package,
    and what the app would show of its error."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the ollama-js cases need Node.js 18 or newer")
    if not os.path.isdir(os.path.join(JS_DIR, "node_modules", "ollama")):
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("node is here but npm is not: install npm, or run `npm ci --prefix tests/js` elsewhere")
        done = subprocess.run([npm, "ci", "--prefix", JS_DIR, "--no-audit", "--no-fund"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.fail("`npm ci --prefix tests/js` failed (exit %d):\n%s%s"
                        % (done.returncode, done.stdout, done.stderr), pytrace=False)

    def run(url, call, task_id=""):
        done = subprocess.run([node, os.path.join(JS_DIR, "ollama_error.mjs"), url, call, task_id],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run


@pytest.mark.parametrize("call", ["chat", "chat-stream"])
def test_ollama_js_shows_gpu_busy_message(gateway, stub, ollama_js, call):
    with asr_job_holds_the_gpu(gateway):
        shown = ollama_js(gateway.url, call, "busy-js")
    assert shown["name"] == "ResponseError" and shown["status_code"] == 503, shown
    assert shown["message"] != "[object Object]" and shown["error_type"] == "string", shown
    assert "busy" in shown["message"].lower() and "asr-42" in shown["message"], shown


@pytest.mark.parametrize("call", ["pull", "delete"])
def test_ollama_js_shows_why_pull_and_delete_are_refused(gateway, stub, ollama_js, call):
    shown = ollama_js(gateway.url, call)
    assert shown["name"] == "ResponseError" and shown["status_code"] == 403, shown
    assert shown["message"] != "[object Object]" and shown["error_type"] == "string", shown
    assert "ALLOW_MANAGEMENT" in shown["message"], shown
    assert stub.received == []
