"""Nothing reaches the box owner's ollama.com account unless ALLOW_OLLAMA_CLOUD=1
(issue 21, items 2-8; README, "Ollama cloud models"): web search tools, show of
a cloud model, local names whose config points at a remote model, a
transcription form read as Ollama's Go reads it, a trailing slash, the
/api/experimental routes. Each refusal is in its route's shape, logged on one
line, and the stub (Ollama) receives nothing; with cloud allowed the slot goes
by Ollama's own rule of what runs in the cloud."""

import time
import uuid

import anthropic
import ollama
import openai
import pytest
import requests

from conftest import asr_job_holds_the_gpu, gateway_error, wait_until

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def one_worker(start_gateway):
    """The README's defaults, one worker (so that its model look-ups can be counted)."""
    return start_gateway(WORKERS="1")


@pytest.fixture(scope="module")
def cloud_allowed(start_gateway):
    return start_gateway(WORKERS="1", ALLOW_OLLAMA_CLOUD="1", SLOT_WAIT_S="0")  # busy: 503 at once


@pytest.fixture
def gw(one_worker, stub):
    assert one_worker.wait_slot_free()
    return one_worker


def tid(prefix="egress"):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:8])


def fresh(base="team-model"):
    return "%s-%s" % (base, uuid.uuid4().hex[:8])


def logged_once(gateway, task_id, status):
    """The refusal's access line: exactly one, with its status."""
    assert wait_until(lambda: "task=%s " % task_id in gateway.read_log(), 3)
    lines = [line for line in gateway.read_log().splitlines() if "task=%s " % task_id in line]
    assert len(lines) == 1 and '" %d task=' % status in lines[0], lines


def refused(answer, code, status=403):
    """The gateway's error in the route's shape, with ``code``."""
    assert answer.status_code == status, answer.text
    path = answer.request.path_url.split("?")[0]
    if path.rstrip("/") == "/v1/messages":
        document = answer.json()
        assert document["type"] == "error" and document["error"]["type"] == "permission_error", document
        assert document["error"]["code"] == code, document
        return document["error"]["message"]
    error = gateway_error(answer)
    assert (error["code"], error["provider"]) == (code, "gateway"), error
    return error["message"]


# ---------------------------------------------------------------- 2. web search tools


def test_anthropic_web_search_tool_is_refused_for_a_local_model_and_nothing_reaches_ollama(gw, stub):
    client = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as raised:
        client.messages.create(model="llama3.2", max_tokens=64, messages=HI,
                               tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}])
    assert "ALLOW_OLLAMA_CLOUD=1" in raised.value.body["error"]["message"]
    assert stub.received == []


@pytest.mark.parametrize("tools_key,type_key,kind", [("tools", "type", "web_search_20260209"),
                                                     ("Tools", "TYPE", "web_search"),
                                                     ("tools", "Type", " web_search_x ")])
def test_web_search_tool_is_found_as_go_reads_the_keys(gw, stub, tools_key, type_key, kind):
    task_id = tid()
    body = {"model": "llama3.2", "max_tokens": 64, "messages": HI, tools_key: [{type_key: kind, "name": "search"}]}
    answer = gw.post("/v1/messages", json=body, headers={"X-Task-Id": task_id})
    refused(answer, "cloud_tool_disabled")
    logged_once(gw, task_id, 403)
    assert stub.received == []


def test_responses_web_search_tool_is_refused_in_openais_shape(gw, stub):
    client = openai.OpenAI(base_url=gw.url + "/v1/", api_key="x", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.responses.create(model="llama3.2", input="what is new?", tools=[{"type": "web_search"}])
    assert raised.value.body["code"] == "cloud_tool_disabled"
    assert stub.received == []


@pytest.mark.parametrize("path,tools", [
    ("/v1/responses", [{"type": "web_search_preview"}]),  # Ollama runs no search for it (openai/responses.go)
    ("/v1/responses", [{"type": "function", "name": "web_search", "parameters": {"type": "object"}}]),
    ("/v1/messages", [{"name": "web_search", "input_schema": {"type": "object"}}]),  # a client tool of that name
])
def test_tools_that_make_ollama_search_nothing_pass(gw, stub, path, tools):
    body = {"model": "llama3.2", "max_tokens": 64, "input": "hi", "messages": HI, "tools": tools}
    assert gw.post(path, json=body).status_code == 200
    assert [r.path for r in stub.received if r.path == path] == [path]


def test_web_search_passes_when_cloud_is_allowed(cloud_allowed, stub):
    body = {"model": "llama3.2", "max_tokens": 64, "messages": HI, "tools": [{"type": "web_search_20250305"}]}
    assert cloud_allowed.post("/v1/messages", json=body).status_code == 200
    [record] = stub.requests_to("/v1/messages")
    assert record.json()["tools"] == body["tools"]


# ---------------------------------------------------------------- 3. show of a cloud model


def test_ollama_client_show_of_a_cloud_model_is_refused(gw, stub):
    client = ollama.Client(host=gw.url, timeout=10, trust_env=False)
    with pytest.raises(ollama.ResponseError) as raised:
        client.show("gpt-oss:120b-cloud")
    assert raised.value.status_code == 403 and "ALLOW_OLLAMA_CLOUD=1" in raised.value.error
    assert stub.received == []


@pytest.mark.parametrize("body", [{"name": "kimi-k2:cloud"}, {"NAME": "kimi-k2:Cloud"},
                                  {"model": "", "name": "kimi-k2:cloud"}])
def test_show_reads_model_then_name_as_ollama_does(gw, stub, body):
    task_id = tid()
    refused(gw.post("/api/show", json=body, headers={"X-Task-Id": task_id}), "cloud_model_disabled")
    logged_once(gw, task_id, 403)
    assert stub.received == []


def test_show_body_that_go_would_read_differently_is_refused(gw, stub):
    answer = gw.post("/api/show", data=b'{"model": "kimi-k2:cloud"} trailing',
                     headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and gateway_error(answer)["code"] == "invalid_json"
    assert stub.received == []


def test_openai_client_retrieve_of_a_cloud_model_is_refused(gw, stub):
    client = openai.OpenAI(base_url=gw.url + "/v1/", api_key="x", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.models.retrieve("kimi-k2:cloud")
    assert raised.value.body["code"] == "cloud_model_disabled"
    assert stub.received == []
    assert client.models.retrieve("llama3.2:latest").id == "llama3.2:latest"  # a local one is forwarded


def test_show_of_a_local_model_is_forwarded(gw, stub):
    assert ollama.Client(host=gw.url, timeout=10, trust_env=False).show("llama3.2").modelfile == "FROM llama3.2"
    assert [r.json() for r in stub.requests_to("/api/show")] == [{"model": "llama3.2"}]


# ---------------------------------------------------------------- 4. a local name for a remote model


def test_local_name_of_a_remote_model_is_refused_on_every_route_and_never_forwarded(gw, stub):
    name = fresh()
    stub.remote[name + ":latest"] = ("https://ollama.com:443", "gpt-oss:120b")
    with pytest.raises(ollama.ResponseError) as raised:
        ollama.Client(host=gw.url, timeout=10, trust_env=False).chat(model=name, messages=HI)
    assert raised.value.status_code == 403 and "remote" in raised.value.error
    client = openai.OpenAI(base_url=gw.url + "/v1/", api_key="x", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model=name, messages=HI)
    task_id = tid()
    refused(gw.post("/v1/messages", json={"model": name, "max_tokens": 8, "messages": HI},
                    headers={"X-Task-Id": task_id}), "cloud_model_disabled")
    logged_once(gw, task_id, 403)
    assert stub.received == []  # no chat, no load call: nothing but the gateway's own look
    assert [r.json() for r in stub.model_checks] == [{"model": name}]  # asked once, then known
    assert gw.wait_slot_free()


def test_a_local_model_is_asked_about_once_then_never_again(gw, stub):
    name = fresh("mine")
    for _ in range(3):
        assert gw.post("/api/chat", json={"model": name, "messages": HI, "stream": False}).status_code == 200
    assert [r.json() for r in stub.model_checks] == [{"model": name}]
    assert len(stub.requests_to("/api/chat")) == 3


def test_remote_models_pass_when_cloud_is_allowed(cloud_allowed, stub):
    name = fresh()
    stub.remote[name + ":latest"] = ("https://ollama.com:443", "gpt-oss:120b")
    assert cloud_allowed.post("/api/chat", json={"model": name, "messages": HI, "stream": False}).status_code == 200
    assert stub.model_checks == []


# ---------------------------------------------------------------- 5. the transcription form


def form(model_part_headers, model_value, boundary="b0undary"):
    """A transcription form: a model part with these headers and raw value, and a file."""
    return (("--%s\r\nContent-Disposition: form-data; name=\"model\"\r\n%s\r\n" % (boundary, model_part_headers))
            .encode() + model_value + ("\r\n--%s\r\nContent-Disposition: form-data; name=\"file\"; "
                                       "filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF0000WAVE\r\n--%s--\r\n"
                                       % (boundary, boundary)).encode())


@pytest.mark.parametrize("headers,value", [
    ("Content-Type: text/plain; charset=utf-16\r\n", b"kimi-k2:cloud"),  # Go ignores the charset
    ("Content-Type: text/plain; charset=cp500\r\n", b"kimi-k2:cloud"),  # EBCDIC to Python, bytes to Go
    ("Content-Transfer-Encoding: base64\r\n", b"kimi-k2:cloud"),  # Go decodes quoted-printable only
    ("Content-Transfer-Encoding: quoted-printable\r\n", b"kimi-k2=3Acloud"),  # which it does decode
])
def test_transcription_model_is_read_as_ollama_reads_it(gw, stub, headers, value):
    task_id = tid()
    answer = gw.post("/v1/audio/transcriptions", data=form(headers, value), headers={
        "Content-Type": "multipart/form-data; boundary=b0undary", "X-Task-Id": task_id})
    refused(answer, "cloud_model_disabled")
    logged_once(gw, task_id, 403)
    assert stub.received == []


@pytest.mark.parametrize("nested", [
    "Content-Type: multipart/mixed; boundary=inner\r\n\r\n--inner\r\nContent-Type: text/plain\r\n\r\nx\r\n--inner--",
    "Content-Type: message/rfc822\r\n\r\nSubject: hi\r\n\r\nbody",
])
def test_a_nested_part_is_a_400_not_a_500(gw, stub, nested):
    body = ("--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nllama3.2\r\n"
            "--b\r\nContent-Disposition: form-data; name=\"extra\"\r\n%s\r\n--b--\r\n" % nested).encode()
    task_id = tid()
    answer = gw.post("/v1/audio/transcriptions", data=body, headers={
        "Content-Type": "multipart/form-data; boundary=b", "X-Task-Id": task_id})
    assert answer.status_code == 400, answer.text
    assert gateway_error(answer)["code"] == "invalid_request"
    logged_once(gw, task_id, 400)
    assert stub.received == []


def test_a_plain_transcription_still_reaches_ollama_byte_for_byte(gw, stub):
    body = form("Content-Type: text/plain; charset=utf-8\r\n", b"whisper")
    answer = gw.post("/v1/audio/transcriptions", data=body,
                     headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert answer.status_code == 200, answer.text
    [record] = stub.requests_to("/v1/audio/transcriptions")
    assert record.body == body and record.form["model"] == "whisper"


# ---------------------------------------------------------------- 6. a trailing slash


@pytest.mark.parametrize("path", ["/api/chat/", "/v1/chat/completions/", "/v1/messages/"])
def test_a_trailing_slash_is_the_same_route_and_checked_as_it(gw, stub, path):
    body = {"model": "kimi-k2:cloud", "messages": HI, "max_tokens": 8, "stream": False}
    task_id = tid()
    refused(gw.post(path, json=body, headers={"X-Task-Id": task_id}), "cloud_model_disabled")
    logged_once(gw, task_id, 403)
    assert stub.received == []
    answer = gw.post(path, json=dict(body, model="llama3.2"), allow_redirects=False)
    assert answer.status_code == 200, answer.text  # served, not Ollama's 307
    assert [r.path for r in stub.received if r.path.startswith(path.rstrip("/"))] == [path.rstrip("/")]


# ---------------------------------------------------------------- 7. the slot follows Ollama's rule


@pytest.mark.parametrize("model,needs_slot", [("mymodel-cloud", True), ("mymodel:8b-CLOUD", False),
                                              ("mymodel:cloud", False), ("registry.local:5000/ns/m-cloud", True)])
def test_with_cloud_allowed_only_what_ollama_runs_in_the_cloud_skips_the_slot(cloud_allowed, stub, model, needs_slot):
    with asr_job_holds_the_gpu(cloud_allowed):
        answer = cloud_allowed.post("/api/chat", json={"model": model, "messages": HI, "stream": False})
    if needs_slot:
        assert answer.status_code == 503 and gateway_error(answer)["code"] == "gpu_busy", answer.text
        assert stub.requests_to("/api/chat") == []
    else:
        assert answer.status_code == 200, answer.text


# ---------------------------------------------------------------- 8. /api/experimental/*


@pytest.mark.parametrize("method,path", [("GET", "/api/experimental/model-recommendations"),
                                         ("POST", "/api/experimental/anything-new"), ("GET", "/api/experimental/"),
                                         ("POST", "/api/experimental/web_search/")])
def test_every_experimental_route_is_refused_like_the_account_routes(gw, stub, method, path):
    task_id = tid()
    answer = requests.request(method, gw.url + path, json={"query": "x"}, headers={"X-Task-Id": task_id}, timeout=5)
    assert "ALLOW_MANAGEMENT" in refused(answer, "management_disabled")
    logged_once(gw, task_id, 403)
    assert stub.received == []


@pytest.mark.parametrize("path", ["/api/blobs/", "/api/pull/", "/api/user/keys/"])
def test_management_routes_with_a_trailing_slash_are_still_refused(gw, stub, path):
    answer = gw.post(path, json={"model": "llama3.2"})
    assert "ALLOW_MANAGEMENT" in refused(answer, "management_disabled")
    assert stub.received == []


def test_a_file_part_named_model_is_not_taken_for_the_model_ollama_runs(gw, stub):
    """Go's FormValue skips a part with a filename: the value part after it
    is the model Ollama runs, and that is the one asked about."""
    name = fresh()
    stub.remote[name + ":latest"] = ("https://ollama.com:443", "gpt-oss:120b")
    body = ("--b\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.txt\"\r\n\r\nllama3.2\r\n"
            "--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n%s\r\n"
            "--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--b--\r\n"
            % name).encode()
    answer = gw.post("/v1/audio/transcriptions", data=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert "remote" in refused(answer, "cloud_model_disabled")
    assert stub.received == []


def test_a_known_local_model_is_looked_at_again_in_the_background_never_on_the_way(stub, monkeypatch):
    """Once its answer is older than FRESH_S a local model is still let
    through at once, and asked about again beside the request; if it now
    stands for a remote model, the next request is refused."""
    from edgegate_remote import RemoteModels
    from edgegate_upstream import Upstream
    monkeypatch.setattr(RemoteModels, "FRESH_S", 0.2)
    upstream, remote_models, name = Upstream(stub.url, 2.0, 5.0, 0), RemoteModels(), fresh()
    assert remote_models.is_remote(upstream, name) is False and len(stub.model_checks) == 1
    assert remote_models.is_remote(upstream, name) is False and len(stub.model_checks) == 1  # fresh: not asked
    stub.remote[name + ":latest"] = ("https://ollama.com:443", "gpt-oss:120b")  # ollama cp over it
    time.sleep(0.3)  # the answer goes stale
    stub.defaults = {"delay": "1"}  # a slow Ollama: the look must not be on the request's way
    started = time.monotonic()
    assert remote_models.is_remote(upstream, name) is False  # answered from what is known
    assert time.monotonic() - started < 0.5
    assert wait_until(lambda: len(stub.model_checks) == 2, 3)
    assert wait_until(lambda: remote_models.is_remote(upstream, name), 3)
