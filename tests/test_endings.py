"""Every way a request can end goes through one ending (gateway.py,
``Exchange.close``). For each kind of ending, seen from outside: the GPU slot
is free, the task has its final state, the access log has exactly one line
for it, and the request was counted exactly once in /metrics."""

import json
import re
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import non_reading_client, wait_until
from test_slot_and_cancel import CHAT, hold_slot, raw_request


@pytest.fixture(scope="module")
def one_worker(start_gateway):
    """One worker, so that /metrics and the log are that worker's alone."""
    return start_gateway(WORKERS="1", CLIENT_SEND_TIMEOUT_S="1", UPSTREAM_READ_TIMEOUT_S="5", SLOT_WAIT_S="0")


@pytest.fixture
def gw(one_worker, stub):
    assert one_worker.wait_slot_free()
    return one_worker


def counted(gateway):
    """(inference requests counted, slot holds counted) in /metrics now."""
    text = gateway.get("/metrics").text
    inference = slot_holds = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "edgegate_requests_total" and sample.labels["route"] == "inference":
                inference += sample.value
            if sample.name == "edgegate_slot_hold_seconds_count":
                slot_holds += sample.value
    return inference, slot_holds


# Each ending: drive it, and say what the task's last state must be and
# whether the request held the slot.


def answered(gateway, stub, task_id):
    answer = gateway.post("/v1/chat/completions", json=dict(CHAT, stream=True), headers={"X-Task-Id": task_id})
    assert answer.status_code == 200 and answer.text.rstrip().endswith("data: [DONE]")
    return ("SUCCESS", "completed"), True


def upstream_failed_mid_stream(gateway, stub, task_id):
    answer = gateway.post("/api/chat", json=CHAT, headers={"X-Task-Id": task_id, "X-Stub": "reset_after=2"})
    assert "error" in json.loads(answer.content.splitlines()[-1])
    return ("FAILED", "upstream_error"), True


def upstream_unreachable_before_answering(gateway, stub, task_id):
    answer = gateway.post("/api/chat", json=CHAT, headers={"X-Task-Id": task_id, "X-Stub": "reset_after=0"})
    assert answer.status_code == 502
    return ("FAILED", "upstream_error"), True


def client_gone_while_streaming(gateway, stub, task_id):
    sock = raw_request(gateway, "/api/chat", CHAT, [("X-Task-Id", task_id), ("X-Stub", "chunks=50,chunk_delay=0.1")])
    assert sock.recv(200).startswith(b"HTTP/1.1 200")
    sock.close()
    return ("FAILED", "cancelled"), True


def client_gone_while_upstream_silent(gateway, stub, task_id):
    sock = raw_request(gateway, "/api/chat", CHAT, [("X-Task-Id", task_id), ("X-Stub", "delay=30")])
    assert wait_until(lambda: stub.requests_to("/api/chat"), 3)
    sock.close()
    return ("FAILED", "cancelled"), True


def cancelled_by_delete(gateway, stub, task_id):
    sock = raw_request(gateway, "/api/chat", CHAT, [("X-Task-Id", task_id), ("X-Stub", "stall=30")])
    gateway.wait_state(task_id, ["RUNNING"])
    assert requests.delete(gateway.url + "/tasks/" + task_id, timeout=5).status_code == 200
    sock.close()
    return ("FAILED", "cancelled"), True


def slow_reader_dropped(gateway, stub, task_id):
    sock = non_reading_client(gateway, "/api/chat", CHAT, [("X-Task-Id", task_id)])
    assert wait_until(lambda: gateway.slots()[0]["state"] == "free", 25), "the slow reader was never dropped"
    sock.close()
    return ("FAILED", "cancelled"), True


def refused_before_the_slot(gateway, stub, task_id):
    answer = gateway.post("/api/chat", data=b"{not json", headers={"X-Task-Id": task_id})
    assert answer.status_code == 400
    return ("FAILED", "bad_request"), False


def refused_at_the_slot(gateway, stub, task_id):
    holder = hold_slot(gateway, stub, task_id + "-holder")
    answer = gateway.post("/api/chat", json=CHAT, headers={"X-Task-Id": task_id})
    assert answer.status_code == 503
    holder.close()
    return ("FAILED", "gpu_busy"), False


ENDINGS = [answered, upstream_failed_mid_stream, upstream_unreachable_before_answering, client_gone_while_streaming,
           client_gone_while_upstream_silent, cancelled_by_delete, slow_reader_dropped, refused_before_the_slot,
           refused_at_the_slot]


@pytest.mark.parametrize("ending", ENDINGS, ids=[e.__name__ for e in ENDINGS])
def test_every_ending_frees_the_slot_finishes_the_task_logs_once_and_counts_once(gw, stub, ending):
    task_id = "ending-" + ending.__name__.replace("_", "-")
    before_requests, before_holds = counted(gw)
    (state, stage), held_slot = ending(gw, stub, task_id)
    assert gw.wait_slot_free(5), "slot still held after %s" % ending.__name__
    document = gw.wait_state(task_id, ["SUCCESS", "FAILED"])
    assert (document["state"], document["stage"]) == (state, stage), document
    assert wait_until(lambda: re.search(r"task=%s\b" % task_id, gw.read_log()), 3)
    time.sleep(0.3)  # a second line, if there were one, would be written by now
    lines = [line for line in gw.read_log().splitlines() if re.search(r" task=%s model=" % re.escape(task_id), line)]
    assert len(lines) == 1, lines
    holder_requests = 1 if ending is refused_at_the_slot else 0
    after_requests, after_holds = counted(gw)
    assert after_requests - before_requests == 1 + holder_requests
    assert after_holds - before_holds == int(held_slot) + holder_requests
