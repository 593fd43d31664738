"""Request heads gunicorn's parser refuses (a broken request line, a line
or header fields over its limits, an invalid header name or value, an HTTP
version it does not speak): the gateway answers them as it answers every
other refusal, in the error shape of the route's clients, with gunicorn's
status and a message that says what was wrong; one access line; the
connection closed; nothing reaches the upstream. Before, gunicorn answered
them with its own HTML page and logged no access line."""

import itertools
import http
import json
import os
import re
import socket
import tempfile
import types

import pytest

from conftest import wait_until
from test_slow_clients import Answer, connect, read_until_closed

# Each exchange comes from an address of its own, so that its access line
# is told apart from any other (a refused request line logs no path).
SOURCES = ("127.0.9.%d" % n for n in itertools.count(1))


def send_head(gateway, raw, timeout=5):
    """Send ``raw`` from a fresh address; the Answer, the bytes received and the address."""
    source = next(SOURCES)
    sock = connect(gateway, source)
    sock.sendall(raw)
    received = read_until_closed(sock, timeout)
    sock.close()
    assert received is not None, "the gateway did not close the connection within %s s" % timeout
    return Answer(received), received, source


def access_lines(gateway, source):
    return [line for line in gateway.read_log().splitlines() if line.startswith(source + " ")]


def one_access_line(gateway, source, request, status, received):
    """The one access line of the exchange from ``source``: the request as
    logged ("- -" when its line is refused), the status, the bytes sent."""
    assert wait_until(lambda: access_lines(gateway, source), 3), "no access line from %s" % source
    lines = access_lines(gateway, source)
    assert len(lines) == 1, lines
    assert re.fullmatch(r'%s "%s" %d task=- model=- slot_wait_ms=- ttfb_ms=- duration_ms=\d+ bytes=%d key=-'
                        % (re.escape(source), re.escape(request), status, len(received)), lines[0]), lines[0]


def envelope(answer, path):
    """The error in the shape the clients of ``path`` read (README, "Errors"),
    checked, as one dict: message, code, type (Anthropic's on /v1/messages)."""
    assert answer.headers["content-type"] == "application/json"
    assert int(answer.headers["content-length"]) == len(answer.body)
    assert answer.headers["connection"] == "close"
    document = json.loads(answer.body)
    if path == "/" or path.startswith("/api/"):  # Ollama's {"error": text}, the gateway's fields beside it
        assert set(document) == {"error", "code", "provider", "task_id"}, document
        error = {"message": document["error"], "code": document["code"], "type": document["code"],
                 "provider": document["provider"], "task_id": document["task_id"]}
    elif path == "/v1/messages":  # Anthropic's
        assert set(document) == {"type", "error"} and document["type"] == "error", document
        error = document["error"]
        assert set(error) == {"type", "message", "code", "provider", "task_id"}, document
    else:  # OpenAI's, the default
        error = document["error"]
        assert set(error) == {"message", "type", "code", "param", "provider", "task_id"}, document
        assert error["param"] is None and error["type"] == error["code"]
    assert error["provider"] == "gateway" and error["task_id"] is None
    assert isinstance(error["message"], str) and error["message"]
    assert re.fullmatch(r"[\x20-\x7e]+", error["message"]), error["message"]  # printable, escaped
    return error


def get(path, *header_lines, method=b"GET", version=b"HTTP/1.1"):
    head = [method + b" " + path + b" " + version, b"Host: x"] + list(header_lines)
    return b"\r\n".join(head) + b"\r\n\r\n"


# name: (what the client sends, status, code, the path whose shape the answer has
#        (None: the default, OpenAI's), a piece of the message, the request as logged)
MALFORMED_HEADS = {
    # -- the request line: refused before any path is known
    "a request line of one word": (
        b"GARBAGE\r\nHost: x\r\n\r\n", 400, "invalid_request", None, "invalid request line", "- -"),
    "a request line without a version": (
        b"GET /api/tags\r\nHost: x\r\n\r\n", 400, "invalid_request", None, "invalid request line", "- -"),
    "a control character in the path": (
        get(b"/api/t\x01ags"), 400, "invalid_request", None, "invalid request line", "- -"),
    "NUL bytes for a request line": (
        b"\x00\x00\x00\r\n\r\n", 400, "invalid_request", None, "invalid request line", "- -"),
    "a request line ended by a bare LF": (
        b"GET /api/tags HTTP/1.1\nHost: x\n\n", 400, "invalid_request", None, "bare LF", "- -"),
    "a request line over 4094 bytes": (
        get(b"/api/" + b"a" * 5000), 414, "request_line_too_long", None,
        "the request line is longer than 4094 bytes", "- -"),
    "a request line over 4094 bytes, its end not sent": (
        b"GET /api/" + b"a" * 5000, 414, "request_line_too_long", None,
        "the request line is longer than 4094 bytes", "- -"),
    # -- a request line whose path reads, but whose method or version does not
    "a lower-case method": (
        get(b"/api/tags", method=b"get"), 400, "invalid_request", "/api/tags", 'invalid method "get"',
        "get /api/tags"),
    "HTTP/2.0": (
        get(b"/v1/models", version=b"HTTP/2.0"), 400, "invalid_request", "/v1/models", "invalid HTTP version",
        "GET /v1/models"),
    "a version that is not HTTP/d.d": (
        get(b"/v1/messages", version=b"HTTP/1.x"), 400, "invalid_request", "/v1/messages",
        "invalid HTTP version", "GET /v1/messages"),
    # -- the header fields: the request line read, so the answer has the path's shape
    "101 header fields": (
        get(b"/api/tags", *(b"X-%d: 1" % n for n in range(101))), 431, "request_header_fields_too_large",
        "/api/tags", "more than 100 header fields", "GET /api/tags"),
    "a header field over 8190 bytes": (
        get(b"/v1/chat/completions", b"X-Big: " + b"a" * 9000), 431, "request_header_fields_too_large",
        "/v1/chat/completions", "longer than 8190 bytes", "GET /v1/chat/completions"),
    "a header name with a space": (
        get(b"/api/chat", b"Bad Name: 1", method=b"POST"), 400, "invalid_request", "/api/chat",
        'invalid header name "Bad Name"', "POST /api/chat"),
    "a header name with a control character": (
        get(b"/v1/messages", b"X\x01Y: 1", method=b"POST"), 400, "invalid_request", "/v1/messages",
        'invalid header name "X\\x01Y"', "POST /v1/messages"),
    "a NUL in a header value": (
        get(b"/api/tags", b"X-Note: a\x00b"), 400, "invalid_request", "/api/tags",
        'the value of header "X-Note" holds a control character', "GET /api/tags"),
    "a bare LF in a header value": (
        get(b"/", b"X-Note: a\nb"), 400, "invalid_request", "/",
        'the value of header "X-Note" holds a control character', "GET /"),
    "header lines ended by bare LFs": (
        b"GET /api/tags HTTP/1.1\r\nHost: x\nX-Note: 1\n\n", 400, "invalid_request", "/api/tags", "bare LF",
        "GET /api/tags"),
    "a header line without a colon": (
        get(b"/api/tags", b"Authorization Bearer sk-not-to-be-echoed"), 400, "invalid_request", "/api/tags",
        'a header line is not "Name: value"', "GET /api/tags"),
    "a folded header line": (
        get(b"/api/tags", b"X-Note: a", b" b"), 400, "invalid_request", "/api/tags",
        "obsolete line folding", "GET /api/tags"),
    "Host twice": (
        get(b"/api/tags", b"Host: y"), 400, "invalid_request", "/api/tags",
        'header "Host" is given more than once', "GET /api/tags"),
    "Content-Length twice": (
        get(b"/v1/chat/completions", b"Content-Length: 2", b"Content-Length: 2", method=b"POST") + b"{}",
        400, "invalid_request", "/v1/chat/completions", "invalid Content-Length", "POST /v1/chat/completions"),
    "Content-Length with chunked": (
        get(b"/api/chat", b"Content-Length: 5", b"Transfer-Encoding: chunked", method=b"POST") + b"0\r\n\r\n",
        400, "invalid_request", "/api/chat", "invalid Content-Length", "POST /api/chat"),
    "a Transfer-Encoding gunicorn does not read": (
        get(b"/api/chat", b"Transfer-Encoding: br", method=b"POST"), 501, "unsupported_transfer_coding",
        "/api/chat", "unsupported Transfer-Encoding", "POST /api/chat"),
    "an Expect other than 100-continue": (
        get(b"/api/chat", b"Expect: 200-ok", b"Content-Length: 2", method=b"POST") + b"{}", 417,
        "expectation_failed", "/api/chat", '"100-continue"', "POST /api/chat"),
}


@pytest.mark.parametrize("case", list(MALFORMED_HEADS))
def test_a_malformed_head_gets_the_gateway_error_in_its_route_shape(gateway, stub, case):
    raw, status, code, path, message, logged = MALFORMED_HEADS[case]
    answer, received, source = send_head(gateway, raw)
    assert answer.status == status
    error = envelope(answer, path or "-")
    assert error["code"] == code
    assert message in error["message"]
    assert b"<html" not in received and b"sk-not-to-be-echoed" not in received
    one_access_line(gateway, source, logged, status, received)
    assert stub.received == []


def test_anthropic_clients_read_a_malformed_head_as_an_invalid_request(gateway, stub):
    answer, _, _ = send_head(gateway, get(b"/v1/messages", b"X-Note: a\x00b", method=b"POST"))
    assert json.loads(answer.body)["error"]["type"] == "invalid_request_error"


def test_an_over_long_request_line_is_answered_before_it_ends(gateway, stub):
    """gunicorn refuses a request line over its limit as soon as it has read
    that much; the worker must not wait for its end (10 s, then 408)."""
    sock = connect(gateway)
    sock.sendall(b"GET /api/" + b"a" * 4200)  # and nothing more, the connection left open
    sock.settimeout(2)
    assert sock.recv(65536).startswith(b"HTTP/1.1 414 %s\r\n" % http.HTTPStatus(414).phrase.encode())
    sock.close()


def test_what_follows_a_malformed_head_is_not_served(gateway, stub):
    answer, received, _ = send_head(gateway, get(b"/api/tags", b"Bad Name: 1") + get(b"/healthz"))
    assert answer.status == 400
    assert received.count(b"HTTP/1.1 ") == 1


def test_a_malformed_head_after_a_good_request_on_a_kept_alive_connection(gateway, stub):
    source = next(SOURCES)
    sock = connect(gateway, source)
    sock.sendall(get(b"/api/tags") + get(b"/api/tags", b"Bad Name: 1"))  # pipelined
    received = read_until_closed(sock, 5)
    sock.close()
    good = Answer(received)
    assert good.status == 200
    answer = Answer(good.body[int(good.headers["content-length"]):])  # the answer behind it
    assert answer.status == 400
    assert envelope(answer, "/api/tags")["code"] == "invalid_request"
    assert wait_until(lambda: len(access_lines(gateway, source)) == 2, 3)
    served_line, refused_line = access_lines(gateway, source)
    assert '"GET /api/tags" 200 ' in served_line and '"GET /api/tags" 400 ' in refused_line
    assert len(stub.received) == 1  # the good one


# ---------------------------------------------------------------- without buffering: gunicorn's own thread


@pytest.fixture(scope="module")
def unbuffered_gateway(start_gateway):
    """A gateway whose worker leaves connections to gthread as they are
    (the PROXY protocol is on), so that gunicorn's parser meets a malformed
    head in a thread, and its handle_error answers it."""
    return start_gateway(GUNICORN_CMD_ARGS="--proxy-protocol auto", WORKERS="1")


@pytest.mark.parametrize("raw, status, code, path, logged", [
    (b"GARBAGE\r\nHost: x\r\n\r\n", 400, "invalid_request", None, "- -"),
    (get(b"/api/tags", b"Bad Name: 1"), 400, "invalid_request", None, "- -"),  # gunicorn gives no request
    (get(b"/api/" + b"a" * 5000), 414, "request_line_too_long", None, "- -"),
    (get(b"/api/tags", *(b"X-%d: 1" % n for n in range(101))), 431, "request_header_fields_too_large", None,
     "- -"),
    (get(b"/api/chat", b"Content-Length: 2", b"Content-Length: 2", method=b"POST"), 400, "invalid_request",
     "/api/chat", "POST /api/chat"),  # gunicorn passes the request: the path's shape
])
def test_without_buffering_a_malformed_head_still_gets_the_envelope(unbuffered_gateway, stub, raw, status, code,
                                                                    path, logged):
    answer, received, source = send_head(unbuffered_gateway, raw)
    assert answer.status == status
    assert envelope(answer, path or "-")["code"] == code
    one_access_line(unbuffered_gateway, source, logged, status, received)
    assert stub.received == []


# ---------------------------------------------------------------- the statuses are gunicorn's, without sockets


def gunicorn_status(error):
    """The status gunicorn's own handle_error (gunicorn/workers/base.py) gives ``error``."""
    from gunicorn.workers.base import Worker
    ours, theirs = socket.socketpair()
    with ours, theirs:
        log = types.SimpleNamespace(warning=lambda *a: None, exception=lambda *a: None, debug=lambda *a: None)
        Worker.handle_error(types.SimpleNamespace(log=log, cfg=None), None, ours, ("127.0.0.1", 1), error)
        return int(theirs.recv(65536).split(b" ")[1])


def parse_errors():
    from gunicorn.http import errors
    return [errors.InvalidRequestLine("x"), errors.InvalidRequestMethod("get"), errors.InvalidHTTPVersion("x"),
            errors.InvalidHeader("X"), errors.InvalidHeaderName("X Y"), errors.ObsoleteFolding("X"),
            errors.LimitRequestLine(5000, 4094), errors.LimitRequestHeaders("limit request headers fields"),
            errors.ExpectationFailed("x"), errors.UnsupportedTransferCoding("br"), errors.InvalidSchemeHeaders(),
            errors.InvalidProxyLine("x"), errors.ForbiddenProxyRequest("10.0.0.1"),
            errors.InvalidChunkSize(b"x"), errors.ChunkMissingTerminator(b"x"), errors.InvalidChunkExtension("x")]


@pytest.mark.parametrize("error", parse_errors(), ids=lambda error: type(error).__name__)
def test_each_parse_error_keeps_the_status_gunicorn_gives_it(error):
    os.environ.setdefault("STATE_DIR", tempfile.mkdtemp(prefix="edgegate-units-"))
    import edgegate_worker
    sizes = edgegate_worker.HeadSizes(4094, 100, 8190, 819204)
    refusal = edgegate_worker.malformed_head(error, sizes)
    assert refusal.status == gunicorn_status(error)
    assert http.HTTPStatus(refusal.status).phrase  # a status the standard library names
