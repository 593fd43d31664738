"""What the gateway survives: a misbehaving upstream, clients that go away at
every moment, a crowd, a killed worker, hostile input. Each case checks from
outside that the answer was right, that the next request is served, that no
slot, thread or file descriptor leaked, and that the task's status is true."""

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import string
import time

import pytest
import requests
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import free_port, gateway_error, non_reading_client, wait_until
from test_slot_and_cancel import CHAT, raw_request

SMALL = dict(CHAT, stream=False)


@pytest.fixture(scope="module")
def fault_gateway(start_gateway):
    """One worker, so that its descriptors and threads can be counted. Its
    thread pool is filled to THREADS first: gthread starts pool threads on
    demand and keeps them, so from then on any new thread is a leak."""
    gateway = start_gateway(WORKERS="1", THREADS="16", UPSTREAM_READ_TIMEOUT_S="1", CLIENT_SEND_TIMEOUT_S="2",
                            SLOT_WAIT_S="0")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: requests.get(gateway.url + "/api/tags", headers={"X-Stub": "delay=0.3"}, timeout=10),
                      range(16)))
    return gateway


@pytest.fixture
def gw(fault_gateway, stub):
    assert fault_gateway.wait_slot_free()
    return fault_gateway


def tcp_peers():
    """{socket inode: remote port} for this machine's TCP sockets."""
    peers = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    peers[fields[9]] = int(fields[2].rsplit(":", 1)[1], 16)
        except OSError:
            pass
    return peers


def worker_counts(gateway, upstream_port=None):
    """(descriptors other than pooled upstream connections, pooled upstream
    connections, threads) of the single worker. Each gthread thread keeps its
    own pool to the upstream (bounded by THREADS), so those are counted apart."""
    [pid] = gateway.worker_pids()
    peers = tcp_peers()
    upstream_port = upstream_port or int(gateway.env["UPSTREAM_BASE"].rsplit(":", 1)[1])
    other = pooled = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        inode = target[len("socket:["):-1] if target.startswith("socket:[") else None
        if inode and peers.get(inode) == upstream_port:
            pooled += 1
        else:
            other += 1
    with open("/proc/%d/status" % pid) as f:
        threads = int(next(line.split()[1] for line in f if line.startswith("Threads:")))
    return other, pooled, threads


@contextlib.contextmanager
def no_leaks(gateway, repeat_warm=None):
    """Nothing left behind: the slot is free, the next request is served,
    descriptors and threads come back to where they were, and pooled
    upstream connections stay within one per thread."""
    if repeat_warm:
        repeat_warm()  # the first run may grow the thread pool
        assert gateway.wait_slot_free(3)
    other, _, threads = worker_counts(gateway)
    yield
    assert gateway.wait_slot_free(3), "the slot leaked"
    assert gateway.post("/api/chat", json=SMALL).status_code == 200, "the next request was not served"
    assert wait_until(lambda: worker_counts(gateway)[0] <= other, 5), \
        "descriptors leaked: %d -> %d" % (other, worker_counts(gateway)[0])
    assert worker_counts(gateway)[1] <= int(gateway.env["THREADS"])
    assert wait_until(lambda: worker_counts(gateway)[2] <= threads, 5), \
        "threads leaked: %d -> %d" % (threads, worker_counts(gateway)[2])


def run_thrice(case):
    def warm():
        case()
    return warm


# ---------------------------------------------------------------- a misbehaving upstream


def test_upstream_refusing_connections(start_gateway):
    gateway = start_gateway(UPSTREAM_BASE="http://127.0.0.1:%d" % free_port(), WORKERS="1")

    def case():
        answer = gateway.post("/api/chat", json=CHAT, headers={"X-Task-Id": "refused-up"})
        assert answer.status_code == 503 and gateway_error(answer)["code"] == "upstream_unreachable"
        assert gateway.status("refused-up").json()["stage"] == "upstream_unreachable"

    case()
    other = worker_counts(gateway)[0]
    for _ in range(5):
        case()
    assert wait_until(lambda: worker_counts(gateway)[0] <= other, 3)
    assert gateway.wait_slot_free(1)


def test_upstream_accepting_and_never_answering(gw, stub):
    def case():
        started = time.monotonic()
        answer = gw.post("/api/chat", json=CHAT, headers={"X-Stub": "never=1", "X-Task-Id": "never-1"})
        took = time.monotonic() - started
        assert answer.status_code == 504 and gateway_error(answer)["code"] == "upstream_timeout", answer.text
        assert 0.9 < took < 3, took
        assert gw.status("never-1").json()["stage"] == "timeout"

    with no_leaks(gw, run_thrice(case)):
        case()
    assert stub.wait_for(lambda: all(r.hangup_at for r in stub.requests_to("/api/chat")[:2]), 3)


def test_upstream_sending_headers_then_stalling(gw, stub):
    def case():
        answer = gw.post("/api/chat", json=CHAT, headers={"X-Stub": "stall=5", "X-Task-Id": "stall-1"})
        assert answer.status_code == 200
        assert "did not answer in time" in json.loads(answer.content.splitlines()[-1])["error"]
        document = gw.status("stall-1").json()
        assert (document["state"], document["stage"]) == ("FAILED", "timeout")

    with no_leaks(gw, run_thrice(case)):
        case()


def test_upstream_resetting_mid_stream(gw, stub):
    def case():
        answer = gw.post("/v1/chat/completions", json=dict(CHAT, stream=True), headers={
            "X-Stub": "chunks=6,chunk_delay=0.05,reset_after=3", "X-Task-Id": "rst-1"})
        assert b'"code": "upstream_error"' in answer.content.split(b"\n\n")[-2]
        assert gw.status("rst-1").json()["stage"] == "upstream_error"

    with no_leaks(gw, run_thrice(case)):
        case()


def test_upstream_truncating_a_chunked_body(gw, stub):
    def case():
        answer = gw.post("/api/chat", json=CHAT, headers={"X-Stub": "chunks=4,truncate_after=2",
                                                           "X-Task-Id": "trunc-1"})
        assert "error" in json.loads(answer.content.splitlines()[-1])
        assert gw.status("trunc-1").json()["stage"] == "upstream_error"

    with no_leaks(gw, run_thrice(case)):
        case()


def test_upstream_answering_something_that_is_not_http(gw, stub):
    def case():
        answer = gw.post("/api/chat", json=CHAT, headers={"X-Stub": "garbage=1", "X-Task-Id": "garbage-1"})
        assert answer.status_code == 502 and gateway_error(answer)["code"] == "upstream_error"
        assert gw.status("garbage-1").json()["stage"] == "upstream_error"

    with no_leaks(gw, run_thrice(case)):
        case()


def test_upstream_malformed_json_and_html_500(gw, stub):
    def case():
        broken = gw.post("/api/chat", json=SMALL, headers={"X-Stub": "malformed=1"})
        assert broken.status_code == 200 and broken.content.startswith(b'{"model"')  # passed on, not parsed
        html = gw.post("/v1/chat/completions", json=CHAT, headers={"X-Stub": "html500=1", "X-Task-Id": "html-1"})
        assert html.status_code == 500
        error = gateway_error(html)
        assert (error["provider"], error["code"]) == ("ollama", "upstream_error")
        assert "500 Internal Server Error" in error["message"]
        assert gw.status("html-1").json()["extensions"]["upstream_status"] == 500

    with no_leaks(gw, run_thrice(case)):
        case()


# ---------------------------------------------------------------- clients that go away


def test_client_hanging_up_before_sending_the_whole_body(gw, stub):
    def case():
        sock = socket.create_connection(("127.0.0.1", gw.port))
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{\"model\": ")
        time.sleep(0.1)
        sock.close()

    with no_leaks(gw, run_thrice(case)):
        case()
        time.sleep(0.2)
    assert stub.requests_to("/api/chat")[:-1] == []  # nothing went upstream but the leak check's own


def test_client_hanging_up_while_waiting_for_the_slot(start_gateway, stub):
    gateway = start_gateway(WORKERS="1", SLOT_WAIT_S="10")
    holder = raw_request(gateway, "/api/chat", CHAT, [("X-Stub", "stall=30")])
    assert wait_until(lambda: gateway.slots()[0]["state"] == "held", 5)
    waiter = raw_request(gateway, "/api/chat", CHAT, [("X-Task-Id", "waiter-1")])
    gateway.wait_state("waiter-1", {"PENDING"})
    waiter.close()
    document = gateway.wait_state("waiter-1", {"FAILED"}, timeout=1.5)
    assert document["stage"] == "cancelled"
    assert len(stub.requests_to("/api/chat")) == 1  # the waiter never went upstream
    holder.close()
    assert gateway.wait_slot_free(2)


def test_client_hanging_up_while_silent_and_mid_stream_leaks_nothing(gw, stub):
    def case():
        for knobs in ("stall=30", "delay=30", "chunks=1000,chunk_delay=0.01"):
            sock = raw_request(gw, "/api/chat", CHAT, [("X-Stub", knobs)])
            assert wait_until(lambda: gw.slots()[0]["state"] == "held", 5)
            time.sleep(0.1)
            sock.close()
            assert gw.wait_slot_free(1)

    with no_leaks(gw, run_thrice(case)):
        case()


@pytest.mark.slow
def test_slow_reader_is_dropped_without_buffering_for_it(gw, stub):
    """A client that reads one byte a second: the gateway does not grow a
    buffer for it; after CLIENT_SEND_TIMEOUT_S (2 s here) of a full socket it
    drops the client, closes the upstream and frees the slot."""
    [pid] = gw.worker_pids()

    def rss_mb():
        with open("/proc/%d/status" % pid) as f:
            return int(next(line.split()[1] for line in f if line.startswith("VmRSS:"))) / 1024

    before = rss_mb()
    sock = non_reading_client(gw, "/api/chat", CHAT, [("X-Task-Id", "slow-reader")])
    # The kernel buffers (megabytes on loopback) fill first, then 2 s of a
    # blocked send drop the client; on a loaded machine filling takes longer.
    assert wait_until(lambda: gw.slots()[0]["state"] == "held", 5)
    started = time.monotonic()
    deadline = started + 25
    while time.monotonic() < deadline and gw.slots()[0]["state"] == "held":
        sock.recv(1)
        time.sleep(0.5)
    assert gw.slots()[0]["state"] == "free", "still held after %.1f s" % (time.monotonic() - started)
    [record] = stub.requests_to("/api/chat")
    assert stub.wait_for(lambda: record.hangup_at is not None, 3)
    assert record.pieces_sent < 400  # the upstream was stopped, not read to the end into memory
    assert rss_mb() - before < 40
    assert gw.status("slow-reader").json()["state"] == "FAILED"
    assert "Traceback" not in gw.read_log()  # dropped as a client gone, not as an error
    sock.close()


@pytest.mark.slow
def test_a_crowd_of_200_connections(gw, stub):
    # The holder keeps talking (this gateway's read timeout is 1 s, and the
    # crowd can take about that long on a loaded 2-core machine).
    holder = raw_request(gw, "/api/chat", CHAT, [("X-Stub", "chunks=100,chunk_delay=0.3")])
    assert wait_until(lambda: gw.slots()[0]["state"] == "held", 5)
    other, _, threads = worker_counts(gw)

    def one(n):
        started = time.monotonic()
        if n % 2:
            answer = requests.post(gw.url + "/api/chat", json=CHAT, timeout=30)
        else:
            answer = requests.get(gw.url + "/v1/models", timeout=30)
        return n % 2, answer.status_code, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, range(200)))
    inference = [r for r in results if r[0]]
    listing = [r for r in results if not r[0]]
    assert {r[1] for r in inference} == {503}
    assert {r[1] for r in listing} == {200}
    assert max(r[2] for r in results) < 10
    holder.close()
    assert gw.wait_slot_free(2)
    assert wait_until(lambda: worker_counts(gw)[0] <= other, 10)
    assert worker_counts(gw)[1] <= 16
    assert wait_until(lambda: worker_counts(gw)[2] <= max(threads, 17) + 1, 10)  # 16 pool threads + main


@pytest.mark.slow
def test_worker_killed_mid_stream(start_gateway, stub):
    gateway = start_gateway(WORKERS="1", HEARTBEAT_SEC="0.5")
    answer = requests.post(gateway.url + "/api/chat", json=CHAT, stream=True, timeout=10,
                           headers={"X-Task-Id": "orphan-1", "X-Stub": "chunks=1000,chunk_delay=0.02"})
    lines = answer.iter_lines()
    next(lines)
    gateway.wait_state("orphan-1", {"RUNNING"})
    [pid] = gateway.worker_pids()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in lines:
            pass
    # the kernel freed the slot; gunicorn started a new worker
    assert wait_until(lambda: len(gateway.worker_pids()) == 1 and gateway.worker_pids() != [pid], 10)
    assert gateway.wait_slot_free(5)
    assert gateway.post("/api/chat", json=SMALL).status_code == 200
    # the dead worker's task does not stay RUNNING: its heartbeat goes stale
    # (max(3 x HEARTBEAT_SEC, 5 s)) and readers see it FAILED, stage timeout
    document = gateway.wait_state("orphan-1", {"FAILED"}, timeout=8)
    assert document["stage"] == "timeout" and "heartbeat" in document["message"]
    assert gateway.get("/api/tags", headers={"X-Task-Id": "orphan-1"}).status_code == 200  # id reusable


# ---------------------------------------------------------------- hostile input


def raw_exchange(gateway, data, wait=0.5):
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.sendall(data)
    sock.settimeout(wait)
    received = b""
    try:
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            received += piece
    except socket.timeout:
        pass
    sock.close()
    return received


def test_header_injection_in_task_id_is_refused(gw, stub):
    with no_leaks(gw):
        for value in (b"abc%0d%0aX-Evil: 1", b"abc\tdef", b"../../etc/passwd", b"a" * 200):
            reply = raw_exchange(gw, b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Task-Id: " + value + b"\r\n\r\n")
            head = reply.split(b"\r\n\r\n")[0]
            assert head.startswith(b"HTTP/1.1 400 ")
            assert b"X-Evil" not in head and b"X-Task-Id" not in head


def test_path_traversal_in_task_routes(gw, stub):
    with no_leaks(gw):
        for path in (b"/tasks/status/../../etc/passwd", b"/tasks/status/..%2F..%2Fetc%2Fpasswd",
                     b"/tasks/status/%2e%2e", b"/tasks/..%2Fslots"):
            reply = raw_exchange(gw, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert reply.split(b" ")[1] in (b"400", b"404"), reply[:100]
            assert b"root:" not in reply


def test_http10_client_gets_an_unchunked_stream(gw, stub):
    with no_leaks(gw):
        body = json.dumps(CHAT).encode()
        reply = raw_exchange(gw, b"POST /api/chat HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), 2)
        head, _, rest = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
        assert b"chunked" not in head.lower()
        assert [json.loads(line)["done"] for line in rest.splitlines()] == [False, False, False, True]


def test_pipelined_requests_are_answered_in_order(gw, stub):
    with no_leaks(gw):
        reply = raw_exchange(gw, b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"
                                 b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Task-Id: piped-2\r\n\r\n", 1)
        assert reply.count(b"HTTP/1.1 200 OK") == 2
        assert reply.index(b'"version"') < reply.index(b'"models"')
        assert b"X-Task-Id: piped-2" in reply


TASK_ID_CHARS = string.ascii_letters + string.digits + "._:-"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task_id=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=140))
def test_any_task_id_is_either_echoed_or_refused(gw, task_id):
    answer = requests.get(gw.url + "/api/version", headers={"X-Task-Id": task_id}, timeout=5)
    valid = task_id[0].isalnum() and len(task_id) <= 128 and all(c in TASK_ID_CHARS for c in task_id)
    if valid:
        assert answer.status_code == 200 and answer.headers["X-Task-Id"] == task_id
    else:
        assert answer.status_code == 400 and gateway_error(answer)["code"] == "invalid_task_id"


# JSON has no NaN or Infinity: Python writes them, Ollama and the gateway refuse them.
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
                           lambda children: st.lists(children) | st.dictionaries(st.text(), children),
                           max_leaves=20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.text(), json_values, max_size=6))
def test_any_json_object_body_reaches_the_upstream_intact(gw, stub, body):
    body = dict(body, model="llama3.2", keep_alive="1m", stream=False)  # needs no change: byte for byte
    raw = json.dumps(body).encode()
    before = len(stub.received)
    answer = requests.post(gw.url + "/api/chat", data=raw, timeout=5)
    assert answer.status_code == 200
    assert stub.received[before].body == raw


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_any_bytes_body_is_refused_or_forwarded_never_crashes(gw, stub, raw):
    answer = requests.post(gw.url + "/api/generate", data=raw, timeout=5)
    try:
        valid = isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        valid = False
    if valid:
        assert answer.status_code in (200, 404)  # the stub's own answer to whatever it got
    else:
        assert answer.status_code == 400 and gateway_error(answer)["code"] == "invalid_json"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(alphabet=string.ascii_letters + "-", min_size=1, max_size=20).filter(lambda n: n[0] != "-"),
       value=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=50))
def test_any_end_to_end_header_is_forwarded(gw, stub, name, value):
    value = value.strip()
    before = len(stub.received)
    answer = requests.get(gw.url + "/api/tags", headers={"X-Fuzz-" + name: value}, timeout=5)
    assert answer.status_code == 200
    seen = stub.received[before].headers
    assert seen.get(("x-fuzz-" + name).lower()) == value
