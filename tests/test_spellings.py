"""What a hostile client might try after reading Ollama's source: the same
request spelled so that Python and Go read it differently. Each is refused
before anything reaches Ollama."""

import json
import socket
import time

import pytest
import requests

from conftest import gateway_error, non_reading_client, wait_until
from test_slot_and_cancel import CHAT


@pytest.mark.parametrize("body", [
    b'{"model": "llama3.2", "MODEL": "gpt-oss:120b-cloud", "messages": []}',  # Go matches keys in any case
    b'{"Model": "gpt-oss:120b-cloud", "messages": []}',
    b'{"model": "llama3.2", "model": "gpt-oss:120b-cloud", "messages": []}',  # Go keeps the last of two
])
def test_a_model_key_spelled_for_gos_decoder_is_refused(gateway, stub, body):
    answer = gateway.post("/api/chat", data=body)
    assert answer.status_code == 400 and gateway_error(answer)["code"] == "invalid_json"
    assert stub.received == []


@pytest.mark.parametrize("model", ["gpt-oss:120b: cloud", "gpt-oss:120b:CLOUD ", "x: y-cloud"])
def test_cloud_model_names_spelled_with_spaces_are_refused(gateway, stub, model):
    answer = gateway.post("/api/chat", json={"model": model, "messages": []})
    assert answer.status_code == 403 and gateway_error(answer)["code"] == "cloud_model_disabled"
    assert stub.received == []


def transcription(gateway, query="", disposition=b'name="model"', model=b"whisper",
                  content_type="multipart/form-data; boundary=b"):
    body = (b"--b\r\nContent-Disposition: form-data; " + disposition + b"\r\n\r\n" + model + b"\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\nRIFF....\r\n--b--\r\n")
    return gateway.post("/v1/audio/transcriptions" + query, data=body,
                        headers={"Content-Type": content_type})


def test_a_transcriptions_model_is_read_as_ollama_reads_it(gateway, stub):
    assert transcription(gateway, "?model=gpt-oss:120b-cloud").status_code == 403  # the query string comes first
    assert transcription(gateway, disposition=b"name=model", model=b"kimi-k2:cloud").status_code == 403
    assert transcription(gateway, model=b"kimi-k2:cloud",
                         content_type="multipart/form-data; xboundary=fake; boundary=b").status_code == 403
    assert stub.received == []
    assert transcription(gateway).status_code == 200


def test_root_answers_anyone_but_writes_nothing_to_the_store(gateway, stub):
    assert gateway.get("/", headers={"X-Task-Id": "anon-1"}).text == "Ollama is running"
    assert gateway.status("anon-1").status_code == 404


def test_a_limit_that_is_a_digit_but_not_ascii_is_a_400(gateway):
    assert gateway.get("/tasks/status?limit=%C2%B2").status_code == 400


def test_a_non_ascii_path_reaches_ollama_as_it_came(gateway, stub):
    gateway.get("/api/show%C3%A9")
    assert [r.path for r in stub.received] == ["/api/show%C3%A9"]  # the UTF-8 bytes, not re-encoded


def test_a_stream_cut_mid_way_is_explained_without_a_library_repr(gateway, stub):
    answer = gateway.post("/api/chat", json=CHAT, headers={"X-Stub": "chunks=5,truncate_after=2"})
    last = json.loads(answer.content.splitlines()[-1])
    assert "in the middle of its answer" in last["error"] and "IncompleteRead" not in last["error"]


def test_delete_frees_the_slot_of_a_client_that_does_not_read(gateway, stub):
    sock = non_reading_client(gateway, "/api/chat", CHAT, [("X-Task-Id", "not-reading")])
    gateway.wait_state("not-reading", ["RUNNING"])
    time.sleep(1)  # the kernel's buffers fill; gunicorn blocks writing
    cancelled = requests.delete(gateway.url + "/tasks/not-reading", timeout=5)
    assert cancelled.status_code == 200 and cancelled.json()["stage"] == "cancelled"
    assert gateway.wait_slot_free(2)
    sock.close()


def test_another_keys_task_id_is_not_told_by_slots_or_busy_answers(start_gateway, stub, tmp_path):
    (tmp_path / "keys").write_text("sk-a alice\nsk-b bob\n")
    gateway = start_gateway(GATEWAY_API_KEYS="@%s" % (tmp_path / "keys"), WORKERS="1", SLOT_WAIT_S="0")
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    body = json.dumps(CHAT).encode()
    sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-a\r\nX-Task-Id: alice-secret\r\n"
                 b"X-Stub: stall=30\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    bob = {"Authorization": "Bearer sk-b"}
    assert wait_until(lambda: gateway.get("/slots", headers=bob).json()["slots"][0]["state"] == "held", 5)
    assert "alice-secret" not in gateway.get("/slots", headers=bob).text
    assert "alice-secret" in gateway.get("/slots", headers={"Authorization": "Bearer sk-a"}).text
    busy = gateway.post("/api/chat", json=CHAT, headers=bob)
    assert busy.status_code == 503 and "alice-secret" not in busy.text
    sock.close()
