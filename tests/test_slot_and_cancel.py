"""One GPU slot across all workers, and a client that goes away frees it."""

import json
import os
import signal
import socket
import subprocess
import time

import requests

from conftest import gateway_error, wait_until

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


def raw_request(gateway, path, body, headers=()):
    """A client on a bare socket, so the test decides when it hangs up."""
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    data = json.dumps(body).encode()
    head = ["POST %s HTTP/1.1" % path, "Host: x", "Content-Type: application/json",
            "Content-Length: %d" % len(data)] + ["%s: %s" % h for h in headers]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    return sock


def hold_slot(gateway, stub, task_id, stub_knobs="stall=30"):
    """Start a long streamed request that holds the slot; returns its socket."""
    sock = raw_request(gateway, "/api/chat", CHAT, [("X-Task-Id", task_id), ("X-Stub", stub_knobs)])
    assert wait_until(lambda: any(s["state"] == "held" for s in gateway.slots()), 5)
    return sock


def hangup_delay(stub, path, closed_at):
    """Seconds from the client's close to the stub seeing its connection close."""
    assert stub.wait_for(lambda: any(r.hangup_at for r in stub.requests_to(path)), 3), \
        "the upstream connection was never closed"
    record = next(r for r in stub.requests_to(path) if r.hangup_at)
    return record.hangup_at - closed_at


def test_second_request_gets_503_while_slot_held(gateway, stub):
    sock = hold_slot(gateway, stub, "holder-1")
    try:
        started = time.monotonic()
        refused = gateway.post("/api/chat", json=CHAT, headers={"X-Task-Id": "second-1"})
        took = time.monotonic() - started
        assert refused.status_code == 503
        assert took < 0.5, took  # at once, not after a wait
        assert refused.headers["Retry-After"] == "2"
        assert refused.headers["X-Task-Id"] == "second-1"
        error = gateway_error(refused)
        assert (error["code"], error["type"], error["provider"], error["task_id"]) == \
            ("gpu_busy", "gpu_busy", "gateway", "second-1")
        assert "holder-1" in error["message"]
        # both workers are asked (2 workers, new connections spread), none has a free slot
        codes = {gateway.post("/v1/chat/completions", json=CHAT).status_code for _ in range(6)}
        assert codes == {503}
        # non-inference routes take no slot
        assert gateway.get("/v1/models").status_code == 200
        assert gateway.get("/api/tags").status_code == 200
        assert stub.requests_to("/v1/chat/completions") == []
    finally:
        sock.close()
    assert gateway.wait_slot_free()


def test_slots_route_shows_the_holder(gateway, stub):
    sock = hold_slot(gateway, stub, "shown-1")
    try:
        [slot] = gateway.slots()
        assert slot["state"] == "held"
        assert slot["task_id"] == "shown-1"
        assert slot["path"] == "/api/chat"
        assert slot["pid"] in gateway.worker_pids()
        assert abs(slot["since"] - time.time()) < 5
    finally:
        sock.close()
    assert gateway.wait_slot_free()
    [slot] = gateway.slots()
    assert slot == {"slot": 0, "lock_file": os.path.join(gateway.state_dir, "locks", "slot-0.lock"),
                    "state": "free"}


def test_slot_wait_lets_a_request_wait_for_the_slot(start_gateway, stub):
    gateway = start_gateway(SLOT_WAIT_S="3")
    sock = hold_slot(gateway, stub, "first-w", "stall=1")
    try:
        started = time.monotonic()
        waited = gateway.post("/api/chat", json=dict(CHAT, stream=False))
        assert waited.status_code == 200
        assert 0.5 < time.monotonic() - started < 3
    finally:
        sock.close()


def test_slot_wait_refuses_after_waiting(start_gateway, stub):
    gateway = start_gateway(SLOT_WAIT_S="0.6")
    sock = hold_slot(gateway, stub, "first-r", "stall=10")
    try:
        started = time.monotonic()
        refused = gateway.post("/api/chat", json=CHAT)
        took = time.monotonic() - started
        assert refused.status_code == 503 and gateway_error(refused)["code"] == "gpu_busy"
        assert 0.55 < took < 1.5, took
    finally:
        sock.close()


def test_more_slots_admit_more_requests(start_gateway, stub):
    gateway = start_gateway(GPU_SLOTS="2", SLOT_WAIT_S="0")
    socks = [hold_slot(gateway, stub, "two-0"),
             raw_request(gateway, "/api/chat", CHAT, [("X-Stub", "stall=30"), ("X-Task-Id", "two-1")])]
    try:
        assert wait_until(lambda: [s["state"] for s in gateway.slots()] == ["held", "held"], 5)
        assert gateway.post("/api/chat", json=CHAT).status_code == 503
    finally:
        for sock in socks:
            sock.close()
    assert gateway.wait_slot_free()


def test_killing_the_holding_worker_frees_the_slot(gateway, stub):
    sock = hold_slot(gateway, stub, "killed-1")
    try:
        [slot] = gateway.slots()
        os.kill(slot["pid"], signal.SIGKILL)
        # the kernel dropped the flock with the process: the next request succeeds
        assert wait_until(lambda: gateway.post("/api/chat", json=dict(CHAT, stream=False)).status_code == 200, 5)
        # and gunicorn respawned the worker
        assert wait_until(lambda: len(gateway.worker_pids()) == 2 and slot["pid"] not in gateway.worker_pids(), 10)
    finally:
        sock.close()


def test_a_record_left_by_an_earlier_holder_is_not_shown_for_flock1(gateway, stub):
    """The gateway leaves its holder record in the lock file when it lets go
    (one write less per request); /slots must not show that old task as the
    holder when flock(1), which writes nothing, takes the lock next."""
    answer = gateway.post("/api/chat", json=dict(CHAT, stream=False), headers={"X-Task-Id": "earlier-1"})
    assert answer.status_code == 200
    lock_file = os.path.join(gateway.state_dir, "locks", "slot-0.lock")
    with open(lock_file) as f:
        assert "earlier-1" in f.read()  # the old record is still there
    assert gateway.slots()[0]["state"] == "free"
    other = subprocess.Popen(["flock", "-n", lock_file, "sleep", "30"], start_new_session=True)
    try:
        assert wait_until(lambda: gateway.slots()[0]["state"] == "held", 5)
        [slot] = gateway.slots()
        assert slot["pid"] == other.pid and "task_id" not in slot and "path" not in slot
        refused = gateway.post("/api/chat", json=CHAT)
        assert refused.status_code == 503
        assert "earlier-1" not in gateway_error(refused)["message"]
        assert "pid %d" % other.pid in gateway_error(refused)["message"]
    finally:
        os.killpg(other.pid, signal.SIGKILL)
        other.wait()
    assert gateway.wait_slot_free()


def test_a_shorter_record_replaces_a_longer_one_whole(start_gateway, stub):
    gateway = start_gateway(SLOT_WAIT_S="0")
    long_id = "long-" + "x" * 120
    assert gateway.post("/api/chat", json=dict(CHAT, stream=False), headers={"X-Task-Id": long_id}).status_code == 200
    sock = hold_slot(gateway, stub, "short-1")
    try:
        [slot] = gateway.slots()
        assert slot["task_id"] == "short-1" and slot["path"] == "/api/chat"
    finally:
        sock.close()
    assert gateway.wait_slot_free()


def test_another_program_holding_the_lock_with_flock1_makes_requests_wait(gateway, stub):
    lock_file = os.path.join(gateway.state_dir, "locks", "slot-0.lock")
    other = subprocess.Popen(["flock", "-n", lock_file, "sleep", "30"], start_new_session=True)
    try:
        assert wait_until(lambda: gateway.slots()[0]["state"] == "held", 5)
        assert gateway.slots()[0]["pid"] == other.pid  # flock(1) wrote nothing: the kernel's pid
        assert "task_id" not in gateway.slots()[0]
        refused = gateway.post("/api/chat", json=CHAT)
        assert refused.status_code == 503 and gateway_error(refused)["code"] == "gpu_busy"
        assert "pid %d" % other.pid in gateway_error(refused)["message"]
    finally:
        os.killpg(other.pid, signal.SIGKILL)  # flock and its child, which shares the lock
        other.wait()
    assert gateway.wait_slot_free()
    assert gateway.post("/api/chat", json=dict(CHAT, stream=False)).status_code == 200


# ---------------------------------------------------------------- cancellation


def test_client_gone_mid_stream_closes_upstream_and_frees_slot(gateway, stub):
    sock = raw_request(gateway, "/api/chat", CHAT, [("X-Stub", "chunks=1000,chunk_delay=0.05")])
    assert stub.wait_for(lambda: any(r.pieces_sent >= 3 for r in stub.requests_to("/api/chat")), 5)
    sock.recv(4096)  # tokens are flowing
    closed_at = time.monotonic()
    sock.close()
    assert hangup_delay(stub, "/api/chat", closed_at) < 1.0
    assert gateway.wait_slot_free(1.0)
    assert stub.requests_to("/api/chat")[0].pieces_sent < 1000


def test_client_gone_while_upstream_silent_after_headers(gateway, stub):
    """NDJSON gets no keep-alive lines, so no write can reveal the hang-up:
    only the gateway's watch on the client socket can."""
    sock = raw_request(gateway, "/api/chat", CHAT, [("X-Stub", "stall=30")])
    assert wait_until(lambda: gateway.slots()[0]["state"] == "held", 5)
    assert b"200 OK" in sock.recv(4096)  # headers came; now the upstream is silent
    time.sleep(0.3)
    closed_at = time.monotonic()
    sock.close()
    assert hangup_delay(stub, "/api/chat", closed_at) < 1.0
    assert gateway.wait_slot_free(1.0)


def test_client_gone_before_upstream_sends_headers(gateway, stub):
    """Model loading: the upstream has not answered at all yet."""
    sock = raw_request(gateway, "/api/generate", {"model": "llama3.2", "prompt": "x"}, [("X-Stub", "delay=30")])
    assert stub.wait_for(lambda: stub.requests_to("/api/generate"), 5)
    time.sleep(0.3)
    closed_at = time.monotonic()
    sock.close()
    assert hangup_delay(stub, "/api/generate", closed_at) < 1.0
    assert gateway.wait_slot_free(1.0)


def test_client_gone_during_non_streamed_request(gateway, stub):
    sock = raw_request(gateway, "/api/chat", dict(CHAT, stream=False), [("X-Stub", "delay=30")])
    assert stub.wait_for(lambda: stub.requests_to("/api/chat"), 5)
    time.sleep(0.2)
    closed_at = time.monotonic()
    sock.close()
    assert hangup_delay(stub, "/api/chat", closed_at) < 1.0
    assert gateway.wait_slot_free(1.0)
    assert gateway.post("/api/chat", json=dict(CHAT, stream=False)).status_code == 200


def test_client_gone_with_half_a_response_read_by_requests(gateway, stub):
    """The same with an ordinary HTTP client that stops reading and closes."""
    answer = requests.post(gateway.url + "/v1/chat/completions", stream=True, timeout=5,
                           headers={"X-Stub": "chunks=1000,chunk_delay=0.02"}, json=dict(CHAT, stream=True))
    next(answer.iter_lines())
    closed_at = time.monotonic()
    answer.close()
    assert hangup_delay(stub, "/v1/chat/completions", closed_at) < 1.0
    assert gateway.wait_slot_free(1.0)


def test_concurrent_streams_do_not_block_short_calls(start_gateway, stub):
    gateway = start_gateway(GPU_SLOTS="8", WORKERS="1", THREADS="16")
    socks = [raw_request(gateway, "/api/chat", CHAT, [("X-Stub", "stall=20")]) for _ in range(8)]
    try:
        assert wait_until(lambda: all(s["state"] == "held" for s in gateway.slots()), 5)
        started = time.monotonic()
        for _ in range(5):
            assert gateway.get("/v1/models").status_code == 200
        assert time.monotonic() - started < 2
    finally:
        for sock in socks:
            sock.close()
    assert gateway.wait_slot_free(3)
