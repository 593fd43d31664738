"""Clients that send slowly, say nothing, or send what is not HTTP: the
worker (edgegate_worker.BufferingWorker) reads every request in before a
thread runs it, so they cannot take the gateway's threads; it answers them
itself (408, 400, 405, 429, with the gateway's envelope) and closes their
connection; and what it refuses never reaches the upstream."""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import requests

from conftest import REPO, GatewayProcess, wait_until

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
BODY = json.dumps(CHAT).encode()


# ---------------------------------------------------------------- a client on a bare socket


def connect(gateway, source="127.0.0.1"):
    """A connection from ``source`` (any 127.x.y.z is this machine on Linux)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", gateway.port))
    return sock


def read_until_closed(sock, timeout):
    """Everything the gateway sends until it closes, or None if it does not close in time."""
    sock.settimeout(timeout)
    received = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                return received
            received += data
    except socket.timeout:
        return None
    except ConnectionResetError:
        return received
    return None


def read_one_answer(sock, timeout=3):
    """One answer with a Content-Length, leaving the connection open."""
    sock.settimeout(timeout)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    answer = Answer(received)
    while len(answer.body) < int(answer.headers["content-length"]):
        answer.body += sock.recv(65536)
    return answer


class Answer:
    """One HTTP answer as read off the wire."""

    def __init__(self, raw):
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}

    def error(self):
        """The gateway's error (README, "Errors"), checked for its shape:
        Ollama's on /api/*, else OpenAI's envelope; as one dict."""
        assert self.headers["content-type"] == "application/json"
        assert int(self.headers["content-length"]) == len(self.body)
        document = json.loads(self.body)
        if isinstance(document["error"], str):
            assert set(document) == {"error", "code", "provider", "task_id"}
            error = {"message": document["error"], "type": document["code"], "code": document["code"],
                     "param": None, "provider": document["provider"], "task_id": document["task_id"]}
        else:
            error = document["error"]
        assert set(error) == {"message", "type", "code", "param", "provider", "task_id"}
        assert error["type"] == error["code"] and error["provider"] == "gateway"
        assert error["param"] is None and error["task_id"] is None and error["message"]
        return error


def exchange(gateway, raw, timeout=5, half_close=False):
    """Send ``raw``, read until the gateway closes; the Answer and the seconds it took."""
    sock = connect(gateway)
    started = time.monotonic()
    sock.sendall(raw)
    if half_close:
        sock.shutdown(socket.SHUT_WR)
    received = read_until_closed(sock, timeout)
    sock.close()
    assert received is not None, "the gateway did not close the connection within %s s" % timeout
    return Answer(received), time.monotonic() - started


def chunked_post(path, chunked_body):
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked_body)


@pytest.fixture(scope="module")
def strict_gateway(start_gateway):
    """Short deadlines, so that a test sees them pass."""
    return start_gateway(CLIENT_HEADER_TIMEOUT_S="1", CLIENT_BODY_TIMEOUT_S="1.5")


@pytest.fixture
def strict(strict_gateway, stub):
    return strict_gateway


# ---------------------------------------------------------------- slow and silent clients take no thread


class Trickle:
    """Connections that send one byte at a time, and connections that say nothing."""

    def __init__(self, gateway, slow_heads, slow_bodies, silent, every=0.5, sources=8):
        self.sockets = []
        self.trickling = []
        for n in range(slow_heads + slow_bodies + silent):
            sock = connect(gateway, "127.0.0.%d" % (2 + n % sources))
            self.sockets.append(sock)
            if n < slow_heads:
                sock.sendall(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Pad: ")
                self.trickling.append(sock)
            elif n < slow_heads + slow_bodies:
                sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
                self.trickling.append(sock)
        self.every = every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(self.every):
            for sock in self.trickling:
                try:
                    sock.send(b"a")
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for sock in self.sockets:
            sock.close()


def timed(call):
    started = time.monotonic()
    answer = call()
    return answer.status_code, time.monotonic() - started


@pytest.mark.slow
def test_normal_requests_answer_within_a_second_while_slow_and_silent_clients_hang_on(start_gateway, stub):
    """On the defaults (2 workers x 16 threads here; two GPU slots, one for
    the stream): 48 heads and 32 bodies sent a byte every half second and 100
    silent connections, far more than the 32 threads; /healthz, /api/tags
    and a chat still answer at once, and a stream that was already running
    keeps its pace."""
    gateway = start_gateway(GPU_SLOTS="2")
    stream = requests.post(gateway.url + "/api/chat", json=dict(CHAT, stream=True), stream=True, timeout=10,
                           headers={"X-Stub": "chunks=30,chunk_delay=0.1"})
    lines = stream.iter_lines()
    next(lines)
    crowd = Trickle(gateway, slow_heads=48, slow_bodies=32, silent=100)
    try:
        time.sleep(1)  # every connection accepted, and trickling
        timings = []
        for _ in range(3):
            timings.append(timed(lambda: gateway.get("/healthz", timeout=5)))
            timings.append(timed(lambda: gateway.get("/api/tags", timeout=5)))
            timings.append(timed(lambda: gateway.post("/api/chat", json=CHAT, timeout=5)))
        gaps, last = [], time.monotonic()
        for _ in lines:
            gaps.append(time.monotonic() - last)
            last = time.monotonic()
    finally:
        crowd.close()
    assert {status for status, _ in timings} == {200}
    assert max(seconds for _, seconds in timings) < 1.0, timings
    assert len(gaps) >= 20 and max(gaps) < 0.5, gaps  # pieces every 0.1 s, not held up


def test_more_trickling_clients_than_threads_do_not_stall_a_worker(start_gateway, stub):
    """One worker with 2 threads: 20 heads trickling in do not take them."""
    gateway = start_gateway(WORKERS="1", THREADS="2")
    crowd = Trickle(gateway, slow_heads=10, slow_bodies=5, silent=5, every=0.2)
    try:
        time.sleep(0.5)
        for _ in range(5):
            status, seconds = timed(lambda: gateway.get("/api/tags", timeout=5))
            assert status == 200 and seconds < 1.0
    finally:
        crowd.close()


def test_a_body_trickled_in_pieces_reaches_the_upstream_whole(strict, stub):
    sock = connect(strict)
    sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY))
    for n in range(0, len(BODY), 10):
        sock.sendall(BODY[n:n + 10])
        time.sleep(0.05)
    answer = Answer(read_until_closed(sock, 5))
    sock.close()
    assert answer.status == 200
    assert stub.received[0].json() == dict(CHAT, keep_alive="30s")


# ---------------------------------------------------------------- deadlines


def test_a_head_that_never_ends_gets_408_and_a_closed_connection(strict, stub):
    answer, seconds = exchange(strict, b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Pad: aaa", timeout=4)
    assert answer.status == 408
    assert answer.error()["code"] == "request_timeout"
    assert answer.headers["connection"] == "close"
    assert 0.9 < seconds < 3.0
    assert stub.received == []


def test_a_body_that_never_ends_gets_408_and_never_goes_upstream(strict, stub):
    head = b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(BODY)
    answer, seconds = exchange(strict, head + BODY[:-5], timeout=5)
    assert answer.status == 408
    assert answer.error()["code"] == "request_timeout"
    assert 1.4 < seconds < 3.5
    assert stub.received == []


def test_a_silent_connection_is_closed_after_the_head_deadline(strict):
    sock = connect(strict)
    started = time.monotonic()
    assert read_until_closed(sock, 4) == b""  # closed, with no answer to a request never made
    assert time.monotonic() - started < 3.0
    sock.close()


def test_the_next_request_on_a_kept_alive_connection_has_the_same_deadline(strict, stub):
    sock = connect(strict)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_one_answer(sock).status == 200
    time.sleep(1.5)  # idle between requests: kept alive (gunicorn's keepalive, 75 s), not a slow head
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_one_answer(sock).status == 200
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
    answer = Answer(read_until_closed(sock, 4))
    assert answer.status == 408
    sock.close()


# ---------------------------------------------------------------- malformed chunked bodies, cut-short bodies


MALFORMED_CHUNKED = {
    "negative size": b"-5\r\nhello\r\n0\r\n\r\n",
    "0x-prefixed size": b"0x5\r\nhello\r\n0\r\n\r\n",
    "non-hex size": b"5g\r\nhello\r\n0\r\n\r\n",
    "empty size": b"\r\nhello\r\n0\r\n\r\n",
    "size with a space": b"5 5\r\nhello\r\n0\r\n\r\n",
    "short chunk": b"9\r\nhello\r\n0\r\n\r\n",
    "long chunk": b"3\r\nhello\r\n0\r\n\r\n",
    "missing CRLF after data": b"5\r\nhello0\r\n\r\n",
    "bare LF after size": b"5\nhello\r\n0\r\n\r\n",
    "bare LF after data": b"5\r\nhello\n0\r\n\r\n",
    "bare LF in trailers": b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n",
    "forbidden trailer": b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n",
    "bad chunk extension": b"5;=x\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(MALFORMED_CHUNKED))
def test_a_malformed_chunked_body_gets_400_and_the_connection_closes(gateway, stub, case):
    raw = chunked_post(b"/api/chat", MALFORMED_CHUNKED[case])
    answer, seconds = exchange(gateway, raw + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 400
    assert answer.error()["code"] == "invalid_request"
    assert answer.headers["connection"] == "close"
    assert b"HTTP/1.1 200" not in answer.body  # the request behind it was not served
    assert seconds < 2
    assert stub.received == []


def test_a_well_formed_chunked_body_with_extension_and_trailer_is_forwarded(gateway, stub):
    body = b"%x;name=value\r\n%s\r\n0\r\nX-Checksum: 1\r\n\r\n" % (len(BODY), BODY)
    sock = connect(gateway)
    sock.sendall(chunked_post(b"/api/chat", body))
    assert read_one_answer(sock).status == 200
    sock.close()
    assert stub.received[0].json() == dict(CHAT, keep_alive="30s")


def test_a_body_cut_short_by_a_half_close_never_reaches_the_upstream(gateway, stub):
    """Content-Length 200, 19 bytes, then shutdown(SHUT_WR): refused, never forwarded."""
    head = b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    answer, _ = exchange(gateway, head + b'{"model": "llama3.2', half_close=True)
    assert answer.status == 400
    assert "19 of 200" in answer.error()["message"]
    time.sleep(0.2)
    assert stub.received == []


def test_a_chunked_body_cut_short_never_reaches_the_upstream(gateway, stub):
    answer, _ = exchange(gateway, chunked_post(b"/api/chat", b"%x\r\n%s" % (len(BODY), BODY[:20])),
                         half_close=True)
    assert answer.status == 400
    time.sleep(0.2)
    assert stub.received == []


# ---------------------------------------------------------------- what the head alone shows


def test_an_http11_request_without_host_gets_400(gateway, stub):
    answer, _ = exchange(gateway, b"GET /api/tags HTTP/1.1\r\n\r\n")
    assert answer.status == 400
    assert "Host" in answer.error()["message"]
    assert stub.received == []


def test_an_http10_request_without_host_is_served(gateway):
    answer, _ = exchange(gateway, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert answer.status == 200


@pytest.mark.parametrize("method", [b"TRACE", b"CONNECT", b"PROPFIND", b"LINK"])
def test_methods_the_apis_do_not_use_get_405(gateway, stub, method):
    target = b"127.0.0.1:1" if method == b"CONNECT" else b"/api/tags"
    answer, _ = exchange(gateway, method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 405
    assert answer.error()["code"] == "method_not_allowed"
    assert answer.headers["allow"] == "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"
    assert stub.received == []


@pytest.mark.parametrize("raw, status", [
    (b"PROPFIND /v1/messages HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo\r\n\r\n", 501),
    (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % n for n in range(120)) + b"\r\n", 431),
])
def test_the_worker_refuses_anthropic_clients_with_an_invalid_request_error(gateway, stub, raw, status):
    """The anthropic SDK reads error.type: a refusal caused by the client is
    its invalid_request_error, not api_error (which it treats as Anthropic's fault)."""
    answer, _ = exchange(gateway, raw)
    assert answer.status == status
    document = json.loads(answer.body)
    assert document["type"] == "error" and document["error"]["type"] == "invalid_request_error", document
    assert stub.received == []


def test_a_refusal_by_the_worker_is_logged_in_the_same_one_line_as_every_request(gateway, stub):
    answer, _ = exchange(gateway, b"PROPFIND /api/refused-here HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 405
    assert wait_until(lambda: "/api/refused-here" in gateway.read_log(), 3)
    [line] = [line for line in gateway.read_log().splitlines() if "/api/refused-here" in line]
    assert re.fullmatch(r'127\.0\.0\.1 "PROPFIND /api/refused-here" 405 task=- model=- slot_wait_ms=- ttfb_ms=- '
                        r'duration_ms=\d+ bytes=\d+ key=-', line), line


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_methods_the_apis_use_pass(gateway, method):
    assert requests.request(method, gateway.url + "/healthz", timeout=5).status_code == 200


# ---------------------------------------------------------------- Expect: 100-continue and large bodies


def test_expect_100_continue_is_answered_before_the_body(gateway, stub):
    sock = connect(gateway)
    sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(BODY))
    sock.settimeout(2)
    assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
    sock.sendall(BODY)
    rest = read_until_closed(sock, 5)
    sock.close()
    assert rest.startswith(b"HTTP/1.1 200 ")  # and no second 100 Continue
    assert len(stub.received) == 1


def test_a_body_over_the_limit_is_refused_without_asking_for_it(start_gateway, stub):
    gateway = start_gateway(MAX_BODY_BYTES="1000", WORKERS="1")
    answer, seconds = exchange(gateway, b"POST /api/chat HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                        b"Content-Length: 5000\r\n\r\n")
    assert answer.status == 413  # no 100 Continue first, and the connection closes
    assert seconds < 1
    sock = connect(gateway)  # a chunked body that goes over, in pieces, and never ends
    sock.sendall(chunked_post(b"/api/chat", b""))
    for _ in range(10):
        sock.sendall(b"100\r\n" + b" " * 256 + b"\r\n")
        time.sleep(0.05)
    answer = Answer(read_until_closed(sock, 3))
    sock.close()
    assert answer.status == 413
    assert stub.received == []


# ---------------------------------------------------------------- connections per client address


def test_connections_over_the_per_address_cap_get_429(start_gateway, stub):
    gateway = start_gateway(WORKERS="1", MAX_CONNECTIONS_PER_CLIENT="4")
    held = [connect(gateway, "127.0.0.2") for _ in range(4)]
    try:
        time.sleep(0.2)
        answer = exchange_from(gateway, "127.0.0.2")
        assert answer.status == 429
        assert answer.error()["code"] == "too_many_connections"
        assert answer.headers["retry-after"] == "1"
        assert requests.get(gateway.url + "/healthz", timeout=5).status_code == 200  # another address
        held.pop().close()
        assert wait_until(lambda: exchange_from(gateway, "127.0.0.2").status == 200, 3)
    finally:
        for sock in held:
            sock.close()


def exchange_from(gateway, source):
    with contextlib.closing(connect(gateway, source)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return Answer(read_until_closed(sock, 5))


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("name, value", [("CLIENT_HEADER_TIMEOUT_S", "soon"), ("CLIENT_BODY_TIMEOUT_S", "0"),
                                         ("MAX_CONNECTIONS_PER_CLIENT", "-1")])
def test_a_bad_client_limit_stops_the_start_with_one_line(name, value):
    process = GatewayProcess({name: value})
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "gateway:app"],
                            cwd=REPO, env=process.env, capture_output=True, text=True, timeout=20)
    assert result.returncode != 0
    assert ("edgegate: configuration error: %s=" % name) in result.stderr + result.stdout


# ---------------------------------------------------------------- following a chunked body, without sockets


def chunked_body_follower():
    """A ChunkedBody for a chunked POST head, as the worker makes one."""
    os.environ.setdefault("STATE_DIR", tempfile.mkdtemp(prefix="edgegate-units-"))
    from gunicorn.config import Config as GunicornConfig
    from gunicorn.http.message import Request
    from gunicorn.http.unreader import IterUnreader

    import edgegate_worker
    head = b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    request = Request(GunicornConfig(), IterUnreader([head]), ("127.0.0.1", 1))
    return edgegate_worker.ChunkedBody(request), edgegate_worker.Refusal


def follow_in_pieces(body, size):
    """Feed ``body`` ``size`` bytes at a time, as reads would bring it: the
    position where the body ended (None if it did not) and the content length."""
    follower, _ = chunked_body_follower()
    data, pos = bytearray(), 0
    for start in range(0, len(body), size):
        data += body[start:start + size]
        pos = follower.follow(data, pos)
        if follower.done:
            return pos, follower.decoded
    return None, follower.decoded


WELL_FORMED_CHUNKED = [
    b"0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"5;a=b\r\nhello\r\nA\r\n0123456789\r\n0\r\n\r\n",
    b"5 ;ext\r\nhello\r\n0\r\nX-One: 1\r\nX-Two: 2\r\n\r\n",
    b"00005\r\nhello\r\n000\r\n\r\n",
]


@pytest.mark.parametrize("body", WELL_FORMED_CHUNKED)
def test_a_chunked_body_ends_where_gunicorn_says_however_it_is_split(body):
    from gunicorn.config import Config as GunicornConfig
    from gunicorn.http.message import Request
    from gunicorn.http.unreader import IterUnreader
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    after = b"GET /next HTTP/1.1\r\n\r\n"
    request = Request(GunicornConfig(), IterUnreader([head + body + after]), ("127.0.0.1", 1))
    content = request.body.read()
    assert request.unreader.read() == after  # gunicorn's own reading of where the body ends
    for size in (1, 2, 3, 7, len(body)):
        assert follow_in_pieces(body + after, size) == (len(body), len(content))


@pytest.mark.parametrize("case", sorted(MALFORMED_CHUNKED))
def test_a_malformed_chunked_body_is_refused_however_it_is_split(case):
    _, Refusal = chunked_body_follower()
    for size in (1, 2, 5, 64):
        with pytest.raises(Refusal):
            assert follow_in_pieces(MALFORMED_CHUNKED[case], size)[0] is None
