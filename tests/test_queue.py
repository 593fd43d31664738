"""The fair line for the GPU slot (issue #12): shared by both workers and by
``python -m gateway hold``, bounded, with positions, that a client leaves by
hanging up or by DELETE, fair between keys, and that a waiter killed with
kill -9 never blocks."""

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import REPO, gateway_error, wait_until
from test_slot_and_cancel import raw_request

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


ADMIN = {"Authorization": "Bearer admin-key"}  # the admin key of the fair gateway; the others ignore it


def line(gateway):
    return gateway.get("/slots", headers=ADMIN).json()["queue"]


def position(gateway, task_id, headers=ADMIN):
    return gateway.get("/tasks/status/" + task_id, headers=headers).json()["extensions"].get("queue_position")


OPEN = []  # sockets of requests holding the slot; closed after each test whatever happens


def hold_slot(gateway, task_id, headers=()):
    """A request that holds the slot until its socket is closed."""
    sock = raw_request(gateway, "/api/chat", CHAT, [("X-Task-Id", task_id), ("X-Stub", "delay=30")] + list(headers))
    OPEN.append(sock)
    assert wait_until(lambda: any(s.get("task_id") == task_id
                                  for s in gateway.get("/slots", headers=ADMIN).json()["slots"]), 5)
    return sock


@pytest.fixture(autouse=True)
def close_holders():
    yield
    while OPEN:
        OPEN.pop().close()


class Waiter(threading.Thread):
    """A client that sends one request and waits for its answer."""

    def __init__(self, gateway, task_id, headers=None, path="/api/chat", body=CHAT):
        super().__init__(daemon=True)
        self.gateway, self.task_id, self.path, self.body = gateway, task_id, path, body
        self.headers = dict(headers or {}, **{"X-Task-Id": task_id})
        self.answer = None

    def run(self):
        self.answer = self.gateway.post(self.path, json=self.body, headers=self.headers, timeout=30)


def queue_up(gateway, task_ids, headers=None):
    """One waiter per id, each in the line before the next is sent."""
    waiters = []
    for task_id in task_ids:
        waiter = Waiter(gateway, task_id, headers)
        waiter.start()
        assert wait_until(lambda: task_id in [w["task_id"] for w in line(gateway)], 5), line(gateway)
        waiters.append(waiter)
    return waiters


def served_order(stub):
    return [r.headers.get("x-task-id") for r in stub.requests_to("/api/chat")]


@pytest.fixture(scope="module")
def queue_gateway(start_gateway):
    return start_gateway(SLOT_WAIT_S="20", QUEUE_MAX="3", RETRY_AFTER_S="2")


@pytest.fixture
def queued(queue_gateway, stub):
    assert queue_gateway.wait_slot_free() and wait_until(lambda: line(queue_gateway) == [], 5)
    return queue_gateway


def test_waiters_are_served_in_arrival_order_across_workers(queued, stub):
    holder = hold_slot(queued, "order-0")
    waiters = queue_up(queued, ["order-1", "order-2", "order-3"])
    shown = line(queued)
    assert [w["task_id"] for w in shown] == ["order-1", "order-2", "order-3"]
    assert [w["position"] for w in shown] == [1, 2, 3]
    assert {w["pid"] for w in shown} <= set(queued.worker_pids())
    assert all(w["path"] == "/api/chat" and w["model"] == "llama3.2" and w["key"] is None for w in shown)
    for n, task_id in enumerate(["order-1", "order-2", "order-3"], 1):
        assert wait_until(lambda: position(queued, task_id) == n, 0.5)
        assert queued.status(task_id).json()["state"] == "PENDING"
    holder.close()
    for waiter in waiters:
        waiter.join(10)
        assert waiter.answer.status_code == 200
    assert served_order(stub) == ["order-0", "order-1", "order-2", "order-3"]
    assert line(queued) == []


def test_a_turn_whose_fairness_record_cannot_be_written_still_gets_the_slot_and_frees_it(queued, stub):
    """served.json is written when a request gets its turn, at the door or
    in line; a disk that refuses the write (here: a directory where its
    temporary file goes) must not leave the slot taken and lost."""
    blocker = os.path.join(queued.state_dir, "locks", "queue", "served.json.new")
    with contextlib.suppress(FileNotFoundError):  # no record yet: each turn must write one
        os.unlink(os.path.join(queued.state_dir, "locks", "queue", "served.json"))
    os.makedirs(blocker)
    try:
        holder = hold_slot(queued, "disk-0")
        [waiter] = queue_up(queued, ["disk-1"])
        holder.close()
        waiter.join(10)
        assert waiter.answer.status_code == 200
        assert queued.wait_slot_free(5)
        assert queued.read_log().count("could not record a key's turn") == 2  # disk-0 at the door, disk-1 in line
        assert queued.post("/api/chat", json=CHAT).status_code == 200
    finally:
        os.rmdir(blocker)


def test_a_full_line_refuses_at_once_with_retry_after(queued, stub):
    holder = hold_slot(queued, "full-0")
    waiters = queue_up(queued, ["full-1", "full-2", "full-3"])
    try:
        started = time.monotonic()
        refused = queued.post("/v1/chat/completions", json=CHAT, headers={"X-Task-Id": "full-4"})
        assert time.monotonic() - started < 0.5
        assert refused.status_code == 503
        error = gateway_error(refused)
        assert error["code"] == "gpu_busy" and "queue full" in error["message"] and "3 requests waiting" in error["message"]
        assert int(refused.headers["Retry-After"]) >= 2
        assert queued.status("full-4").json()["stage"] == "gpu_busy"
        metrics = queued.get("/metrics").text
        assert 'edgegate_gpu_refusals_total{reason="queue_full"} 1.0' in metrics
        assert "edgegate_queue_length 3.0" in metrics
    finally:
        holder.close()
    for waiter in waiters:
        waiter.join(10)
        assert waiter.answer.status_code == 200
    assert "full-4" not in served_order(stub)
    assert "edgegate_queue_wait_seconds_count" in queued.get("/metrics").text


def test_hangup_and_delete_leave_the_line_and_the_rest_move_up(queued, stub):
    holder = hold_slot(queued, "leave-0")
    first = raw_request(queued, "/api/chat", CHAT, [("X-Task-Id", "leave-1")])
    assert wait_until(lambda: [w["task_id"] for w in line(queued)] == ["leave-1"], 5)
    second, third = queue_up(queued, ["leave-2", "leave-3"])
    assert wait_until(lambda: position(queued, "leave-3") == 3, 0.5)

    first.close()  # the client hangs up while it waits
    gone = queued.wait_state("leave-1", ("FAILED",), timeout=1.0)
    assert gone["stage"] == "cancelled"
    assert wait_until(lambda: position(queued, "leave-3") == 2, 0.75)

    cancelled = requests.delete(queued.url + "/tasks/leave-2", timeout=5)
    assert cancelled.status_code in (200, 202)
    assert queued.wait_state("leave-2", ("FAILED",), timeout=1.0)["stage"] == "cancelled"
    second.join(5)
    assert second.answer.status_code == 503
    assert wait_until(lambda: position(queued, "leave-3") == 1, 0.75)
    assert [w["task_id"] for w in line(queued)] == ["leave-3"]

    holder.close()
    third.join(10)
    assert third.answer.status_code == 200
    assert served_order(stub) == ["leave-0", "leave-3"]  # those who left never reached Ollama


def test_a_waiting_sse_stream_hears_its_position(queued, stub):
    holder = hold_slot(queued, "sse-0")
    # sse-1 keeps the slot a second once it has it: else, on a loaded machine, it can be done
    # before sse-2 looks again, and sse-2 is served at once without ever being next in line.
    ahead = queue_up(queued, ["sse-1"], headers={"X-Stub": "delay=1"})[0]
    body = dict(CHAT, stream=True)
    sock = raw_request(queued, "/v1/chat/completions", body, [("X-Task-Id", "sse-2")])
    sock.settimeout(5)
    seen = b""
    while b": queued, position 2" not in seen:
        seen += sock.recv(4096)
    assert seen.startswith(b"HTTP/1.1 200") and b"text/event-stream" in seen
    holder.close()
    while b": queued, position 1" not in seen:
        seen += sock.recv(4096)
    while b"data: [DONE]" not in seen:
        seen += sock.recv(4096)
    assert seen.index(b": queued, position 1") < seen.index(b"data: {")
    sock.close()
    ahead.join(10)
    assert "queue_position" not in queued.wait_state("sse-2", ("SUCCESS",))["extensions"]


def test_ndjson_waiter_gets_no_queue_lines(queued, stub):
    holder = hold_slot(queued, "nd-0")
    waiter = Waiter(queued, "nd-1", body=dict(CHAT, stream=True))
    waiter.start()
    assert wait_until(lambda: len(line(queued)) == 1, 5)
    holder.close()
    waiter.join(10)
    assert waiter.answer.status_code == 200
    assert all(json.loads(row) for row in waiter.answer.text.splitlines())


def test_the_slot_goes_to_the_key_served_least_recently(start_gateway, stub, tmp_path):
    """Key A holds the GPU and fills the line (QUEUE_MAX 4) with its backlog:
    A's next request is refused, but key B, with nothing waiting, still gets
    a place; and since A's request that took the slot straight away counts
    as A's turn, B goes before all of A's backlog."""
    (tmp_path / "keys").write_text("key-a\nkey-b\nadmin-key ops admin\n")  # two bare keys, and an admin to watch
    gateway = start_gateway(SLOT_WAIT_S="20", QUEUE_MAX="4", GATEWAY_API_KEYS="@%s" % (tmp_path / "keys"))
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    holder = hold_slot(gateway, "fair-a0", [("Authorization", "Bearer key-a")])
    backlog = queue_up(gateway, ["fair-a%d" % n for n in range(1, 5)], a)
    refused = gateway.post("/api/chat", json=CHAT, headers=dict(a, **{"X-Task-Id": "fair-a5"}))
    assert refused.status_code == 503 and "queue full" in gateway_error(refused)["message"]
    single = queue_up(gateway, ["fair-b1"], b)[0]  # the line is full, but not of B's requests
    fingerprint = "key-" + hashlib.sha256(b"key-b").hexdigest()[:8]  # a bare key is named by its fingerprint
    shown = {w["task_id"]: w for w in gateway.get("/slots", headers=b).json()["queue"] if "task_id" in w}
    assert list(shown) == ["fair-b1"]  # key B sees its own waiter, not key A's
    assert shown["fair-b1"]["key"] == fingerprint and shown["fair-b1"]["position"] == 1
    assert wait_until(lambda: position(gateway, "fair-b1", b) == 1, 0.5)
    assert gateway.get("/tasks/status/fair-b1", headers=b).json()["extensions"]["key"] == fingerprint
    assert "key-b" not in json.dumps(gateway.get("/slots", headers=b).json())
    second = gateway.post("/api/chat", json=CHAT, headers=dict(b, **{"X-Task-Id": "fair-b2"}))
    assert second.status_code == 503  # B has its place; beyond it, QUEUE_MAX holds for B too
    holder.close()
    for waiter in backlog + [single]:
        waiter.join(15)
        assert waiter.answer.status_code == 200
    order = served_order(stub)
    assert order == ["fair-a0", "fair-b1"] + ["fair-a%d" % n for n in range(1, 5)], order


def hold_process(gateway, *args, **popen):
    env = dict(gateway.env)
    return subprocess.Popen([sys.executable, "-m", "gateway", "hold"] + list(args), cwd=REPO, env=env, **popen)


def test_a_waiter_killed_with_kill_9_never_blocks_the_line(queued, stub):
    holder = hold_slot(queued, "kill-0")
    hold = hold_process(queued, "--wait", "30", "--", "sleep", "30")
    try:
        assert wait_until(lambda: [w["path"] for w in line(queued)] == ["hold"], 5)
        behind = queue_up(queued, ["kill-1"])[0]
        os.kill(hold.pid, signal.SIGKILL)
        hold.wait(5)
        # nobody tells the line: the next look (SlotLine.FALLBACK_S) finds the ticket dead
        assert wait_until(lambda: position(queued, "kill-1") == 1, 1.5)
        assert [w["task_id"] for w in line(queued)] == ["kill-1"]
        holder.close()
        behind.join(10)
        assert behind.answer.status_code == 200
    finally:
        if hold.poll() is None:
            hold.kill()
    queue_dir = os.path.join(queued.state_dir, "locks", "queue")
    assert [n for n in os.listdir(queue_dir) if n.endswith((".ticket", ".sock"))] == []


CHECK_SLOT = """
import fcntl, json, os, sys, time, urllib.request
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("slot free")
except BlockingIOError:
    print("slot held")
print(json.load(urllib.request.urlopen(sys.argv[2] + "/api/ps"))["models"])
time.sleep(1.0)
sys.exit(3)
"""


def test_hold_unloads_the_models_runs_the_command_with_the_slot_and_exits_with_its_code(queued, stub):
    stub.load("llama3.2", 300)
    stub.load("nomic-embed-text", 300)
    lock = os.path.join(queued.state_dir, "locks", "slot-0.lock")
    hold = hold_process(queued, "--", sys.executable, "-c", CHECK_SLOT, lock, stub.url,
                        stdout=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: queued.slots()[0].get("path") == "hold", 5)
        task_id = queued.slots()[0]["task_id"]
        running = queued.wait_state(task_id, ("RUNNING",))
        assert running["extensions"]["path"] == "hold" and os.path.basename(sys.executable) in running["extensions"]["model"]
        meanwhile = queue_up(queued, ["during-hold"])[0]  # requests wait their turn meanwhile
        out, _ = hold.communicate(timeout=10)
    finally:
        if hold.poll() is None:
            hold.kill()
    assert hold.returncode == 3
    assert out.splitlines() == ["slot held", "[]"]
    unloads = [r.json() for r in stub.requests_to("/api/generate")]
    assert sorted(u["model"] for u in unloads) == ["llama3.2:latest", "nomic-embed-text:latest"]
    assert all(u["keep_alive"] == 0 for u in unloads)
    meanwhile.join(10)
    assert meanwhile.answer.status_code == 200
    done = queued.wait_state(task_id, ("FAILED",))
    assert (done["stage"], done["message"]) == ("command_failed", "the command exited with status 3")


def test_hold_gives_up_after_wait(queued, stub):
    holder = hold_slot(queued, "giveup-0")
    try:
        hold = hold_process(queued, "--wait", "0.3", "--", "true", stderr=subprocess.PIPE, text=True)
        _, err = hold.communicate(timeout=10)
        assert hold.returncode == 75 and "no GPU slot" in err
    finally:
        holder.close()
