"""README, "Cloud route": ``openai/<model>`` goes to the cloud with the gateway's key, no
GPU slot and no keep_alive; /v1 verbatim, /api/chat translated both ways.
The cloud is a second stub server on 127.0.0.1."""

import json

import ollama
import openai
import pytest

from conftest import gateway_error, wait_until
from stub_upstream import StubServer
from test_slot_and_cancel import raw_request

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def cloud_server():
    server = StubServer().start()
    yield server
    server.stop()


@pytest.fixture
def cloud(cloud_server):
    cloud_server.reset()
    return cloud_server


@pytest.fixture(scope="module")
def cloud_gateway(start_gateway, cloud_server):
    return start_gateway(OPENAI_API_KEY="sk-gateway-key", OPENAI_BASE_URL=cloud_server.url, WORKERS="1")


def test_v1_goes_to_the_cloud_with_the_gateways_key_and_no_slot(cloud_gateway, cloud, stub):
    holder = raw_request(cloud_gateway, "/api/chat", {"model": "llama3.2", "messages": MESSAGES},
                         [("X-Stub", "stall=30")])
    assert wait_until(lambda: cloud_gateway.slots()[0]["state"] == "held", 5)  # the local GPU is busy
    client = openai.OpenAI(base_url=cloud_gateway.url + "/v1/", api_key="client-key", max_retries=0)
    answer = client.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES, temperature=0.2)
    assert answer.choices[0].message.content == "Hello from the"
    [seen] = cloud.received
    assert seen.path == "/v1/chat/completions"
    assert seen.json() == {"model": "gpt-4o-mini", "messages": MESSAGES, "temperature": 0.2}  # no keep_alive
    assert seen.headers["authorization"] == "Bearer sk-gateway-key"
    assert [r.path for r in stub.received] == ["/api/chat"]  # only the holder: no load call, nothing local
    holder.close()


def test_v1_streamed_through_the_cloud(cloud_gateway, cloud):
    client = openai.OpenAI(base_url=cloud_gateway.url + "/v1/", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello from the"


def test_api_chat_request_is_translated_field_by_field(cloud_gateway, cloud):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    history = MESSAGES + [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "rain", "tool_name": "get_weather"},
        {"role": "user", "content": "look", "images": ["aGVsbG8="]},
    ]
    cloud_gateway.post("/api/chat", json={
        "model": "openai/gpt-4o-mini", "messages": history, "stream": False, "format": "json", "tools": tools,
        "options": {"temperature": 0.3, "num_predict": 64, "top_p": 0.9, "stop": ["\n\n"], "seed": 7},
    })
    [seen] = cloud.received
    assert seen.path == "/v1/chat/completions"
    assert seen.json() == {
        "model": "gpt-4o-mini", "stream": False, "temperature": 0.3, "max_tokens": 64, "top_p": 0.9,
        "stop": ["\n\n"], "seed": 7, "response_format": {"type": "json_object"}, "tools": tools,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_2_0", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "content": "rain", "tool_call_id": "get_weather"},
            {"role": "user", "content": [{"type": "text", "text": "look"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]},
        ],
    }
    assert "keep_alive" not in seen.json()


def test_api_chat_answer_comes_back_in_ollamas_shape(cloud_gateway, cloud):
    answer = cloud_gateway.post("/api/chat", json={"model": "openai/gpt-4o-mini", "messages": MESSAGES,
                                                   "stream": False}, headers={"X-Task-Id": "cloud-1"})
    document = answer.json()
    assert answer.headers["Content-Type"] == "application/json"
    assert document["model"] == "openai/gpt-4o-mini"
    assert document["message"] == {"role": "assistant", "content": "Hello from the"}
    assert (document["done"], document["done_reason"]) == (True, "stop")
    assert (document["prompt_eval_count"], document["eval_count"]) == (7, 3)
    ext = cloud_gateway.status("cloud-1").json()["extensions"]
    assert (ext["model"], ext["prompt_tokens"], ext["completion_tokens"]) == ("openai/gpt-4o-mini", 7, 3)


def test_api_chat_streams_as_ndjson_one_line_per_delta(cloud_gateway, cloud):
    answer = cloud_gateway.post("/api/chat", json={"model": "openai/gpt-4o-mini", "messages": MESSAGES},
                                headers={"X-Stub": "chunks=4", "X-Task-Id": "cloud-2"})
    assert answer.headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in answer.content.splitlines()]
    assert [line["message"]["content"] for line in lines] == ["Hello", " from", " the", " stub", ""]
    assert [line["done"] for line in lines] == [False] * 4 + [True]
    assert (lines[-1]["prompt_eval_count"], lines[-1]["eval_count"]) == (7, 4)
    assert cloud.received[0].json()["stream_options"] == {"include_usage": True}
    assert cloud_gateway.status("cloud-2").json()["extensions"]["completion_tokens"] == 4


def test_ollama_client_uses_the_cloud_route(cloud_gateway, cloud):
    client = ollama.Client(host=cloud_gateway.url)
    parts = [p["message"]["content"] for p in client.chat(model="openai/gpt-4o-mini", messages=MESSAGES, stream=True)]
    assert "".join(parts) == "Hello from the"
    assert client.chat(model="openai/gpt-4o-mini", messages=MESSAGES)["message"]["content"] == "Hello from the"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_come_back_in_ollamas_shape(cloud_gateway, cloud, stream):
    answer = cloud_gateway.post("/api/chat", headers={"X-Stub": "tool_call=get_weather"},
                                json={"model": "openai/gpt-4o-mini", "messages": MESSAGES, "stream": stream})
    lines = [json.loads(line) for line in answer.content.splitlines()]
    calls = [line["message"]["tool_calls"] for line in lines if line["message"].get("tool_calls")]
    assert calls == [[{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]]
    assert lines[-1]["done"] is True


def test_a_streamed_cloud_error_ends_the_ndjson_with_an_error_line(cloud_gateway, cloud):
    answer = cloud_gateway.post("/api/chat", headers={"X-Stub": "sse_error_after=2", "X-Task-Id": "cloud-err"},
                                json={"model": "openai/gpt-4o-mini", "messages": MESSAGES})
    lines = [json.loads(line) for line in answer.content.splitlines()]
    assert [line["message"]["content"] for line in lines[:2]] == ["Hello", " from"]
    assert "cloud overloaded" in lines[-1]["error"]
    document = cloud_gateway.status("cloud-err").json()
    assert (document["state"], document["stage"]) == ("FAILED", "upstream_error")


def test_cloud_error_status_keeps_its_status_in_each_shape(cloud_gateway, cloud):
    native = cloud_gateway.post("/api/chat", headers={"X-Stub": "status=401"},
                                json={"model": "openai/gpt-4o-mini", "messages": MESSAGES})
    assert native.status_code == 401 and gateway_error(native)["message"] == "stub error 401"  # Ollama's shape
    assert gateway_error(native)["provider"] == "openai"
    v1 = cloud_gateway.post("/v1/chat/completions", headers={"X-Stub": "status=429"},
                            json={"model": "openai/gpt-4o-mini", "messages": MESSAGES})
    error = gateway_error(v1)
    assert v1.status_code == 429 and (error["provider"], error["message"]) == ("openai", "stub error 429")


def test_cloud_route_only_serves_v1_and_api_chat(cloud_gateway, cloud):
    answer = cloud_gateway.post("/api/generate", json={"model": "openai/gpt-4o-mini", "prompt": "x"})
    assert answer.status_code == 400 and gateway_error(answer)["code"] == "invalid_request"
    assert cloud.received == []


def test_without_a_key_the_cloud_route_is_not_configured(gateway, stub):
    answer = gateway.post("/v1/chat/completions", json={"model": "openai/gpt-4o-mini", "messages": MESSAGES})
    assert answer.status_code == 503
    error = gateway_error(answer)
    assert (error["code"], error["provider"]) == ("provider_not_configured", "openai")
    assert "OPENAI_API_KEY" in error["message"]
    assert stub.received == []


@pytest.mark.parametrize("knob", ["malformed=1", "short_body=1"])
def test_a_broken_non_streamed_cloud_answer_is_a_502_never_an_empty_200(cloud_gateway, cloud, knob):
    answer = cloud_gateway.post("/api/chat", headers={"X-Stub": knob, "X-Task-Id": "cloud-broken"},
                                json={"model": "openai/gpt-4o-mini", "messages": MESSAGES, "stream": False})
    assert answer.status_code == 502 and gateway_error(answer)["code"] == "upstream_error"
    document = cloud_gateway.status("cloud-broken").json()
    assert (document["state"], document["stage"]) == ("FAILED", "upstream_error")
