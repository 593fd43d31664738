"""edgegate's gunicorn worker: gthread, but a request is read before it takes a thread.

Named in gunicorn.conf.py (``worker_class = "edgegate_worker.BufferingWorker"``);
the command stays ``gunicorn -c gunicorn.conf.py gateway:app``.

Why it exists. gunicorn's gthread worker (gunicorn 27,
``gunicorn/workers/gthread.py``) hands every accepted connection to its
thread pool at once; the thread waits a few seconds for a first byte, then
reads the request head and the application reads the body, blocking, with
no deadline. Only kept-alive connections wait in the main thread's poller.
So THREADS clients that send their head or body one byte a second, or that
connect and say nothing, take every thread, and /healthz, /api/tags and
chats time out behind them. This worker does what nginx does in front of an
application: the main thread reads each request, head and body, from
non-blocking sockets into a buffer (a body past CLIENT_BODY_BUFFER_BYTES
into a temporary file, as nginx does; README, "Large request bodies"), and
a thread is taken only for a request that has fully arrived. The thread then runs gunicorn's own parser and the
application as before, reading the buffered bytes.

On the way it refuses, with the gateway's JSON error envelope and a closed
connection, what it can judge from the bytes alone:

    408 request_timeout       head not in within CLIENT_HEADER_TIMEOUT_S, or
                              body not in within CLIENT_BODY_TIMEOUT_S after it
    400 invalid_request       a head gunicorn's parser refuses (request line,
                              method, HTTP version, a header name or value,
                              Content-Length); HTTP/1.1 without Host; a
                              malformed chunked body; a body cut short by the
                              client's end of stream
    405 method_not_allowed    a method the APIs do not use (TRACE, CONNECT, ...)
    414 request_line_too_long a request line over gunicorn's limit_request_line
    417 expectation_failed    an Expect other than 100-continue
    429 too_many_connections  over MAX_CONNECTIONS_PER_CLIENT open connections
                              from one address (counted in each worker process)
    431 request_header_fields_too_large
                              over limit_request_fields header fields, or one
                              over limit_request_field_size
    501 unsupported_transfer_coding
                              a Transfer-Encoding gunicorn does not read
    503 body_not_stored       a body past CLIENT_BODY_BUFFER_BYTES that cannot
                              be written to STATE_DIR/bodies (a full disk)

For a head gunicorn's parser refuses, the status is gunicorn's own; only the
answer changes: gunicorn writes an HTML page and logs no access line.

Sections, in the order a connection meets them: settings -> the answers the
worker gives itself -> what the parser reads from -> following a chunked body
-> one arriving request -> the worker.
"""

import collections
import email.utils
import errno
import functools
import json
import re
import selectors
import socket
import time

from gunicorn.http.body import CHUNK_EXT_RE, ChunkedReader
from gunicorn.http.errors import (
    ChunkMissingTerminator, ConfigurationProblem, ExpectationFailed, ForbiddenProxyRequest, InvalidChunkExtension,
    InvalidChunkSize, InvalidHeader, InvalidHeaderName, InvalidHTTPVersion, InvalidProxyHeader, InvalidProxyLine,
    InvalidRequestLine, InvalidRequestMethod, InvalidResponseHeader, InvalidResponseHeaderName, InvalidSchemeHeaders,
    LimitRequestHeaders, LimitRequestLine, NoMoreData, ObsoleteFolding, ParseException, UnsupportedTransferCoding)
from gunicorn.http.message import DEFAULT_MAX_HEADERFIELD_SIZE, MAX_HEADERS, MAX_REQUEST_LINE, TOKEN_RE, Request
from gunicorn.http.parser import RequestParser
from gunicorn.http.unreader import IterUnreader
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

from edgegate_config import BATCH_FORM_BYTES
from edgegate_errors import GatewayError, access_line, access_log, error_document, printable, status_line
from edgegate_spool import BodyRoom, SpoolFailed, give_back_given_share, give_large_buffers_back, give_share, text_width

# ================================================================ settings

# What a compressed request body is guessed to decode to, times its size,
# before it is decoded (JSON prompts compress about 3 to 10 times).
COMPRESSED_GROWTH = 16

ClientLimits = collections.namedtuple(
    "ClientLimits", "header_timeout_s body_timeout_s max_connections_per_client max_body_bytes batch_max_file_bytes")


def client_limits(config):
    """What the worker enforces, from the gateway's one configuration.

    CLIENT_HEADER_TIMEOUT_S (10): the whole request head must arrive within
    this many seconds of the connection opening (of its first byte on a
    kept-alive connection). CLIENT_BODY_TIMEOUT_S (30): the whole body within
    this many seconds after the head; a 64 MiB upload then needs about
    2.2 MB/s, raise it for slow links. MAX_CONNECTIONS_PER_CLIENT (256, 0 = no
    cap): open connections one client address may hold in each worker
    process; behind a reverse proxy every client is the proxy, so set 0 there.
    """
    return ClientLimits(config.client_header_timeout_s, config.client_body_timeout_s,
                        config.max_connections_per_client, config.max_body_bytes, config.batch_max_file_bytes)


# The two routes that carry a whole batch (README, "Batches"): their body may
# be up to BATCH_MAX_FILE_BYTES; edgegate_batch_api.py checks it again.
BATCH_UPLOADS = frozenset({"/v1/files", "/v1/messages/batches"})


def body_limit(limits, request):
    """The most body bytes ``request`` may send: MAX_BODY_BYTES, or a batch's own limit."""
    if request.method == "POST" and request.path in BATCH_UPLOADS:
        return max(limits.max_body_bytes, limits.batch_max_file_bytes + BATCH_FORM_BYTES)
    return limits.max_body_bytes


HeadSizes = collections.namedtuple("HeadSizes", "line fields field_size header_section")


def head_sizes(cfg):
    """The size limits gunicorn's parser puts on a request head, as it
    derives them from its settings (gunicorn/http/message.py,
    Message.__init__ and Request.__init__): the request line (None: no
    limit), the number of header fields, one field line with its CRLF, and
    the header section while it has no end yet."""
    line = MAX_REQUEST_LINE if cfg.limit_request_line < 0 else min(cfg.limit_request_line, MAX_REQUEST_LINE) or None
    fields = cfg.limit_request_fields if 0 < cfg.limit_request_fields <= MAX_HEADERS else MAX_HEADERS
    field_size = cfg.limit_request_field_size if cfg.limit_request_field_size > 0 else DEFAULT_MAX_HEADERFIELD_SIZE
    return HeadSizes(line, fields, field_size, fields * (field_size + 2) + 4)


# Methods the OpenAI, Anthropic and Ollama APIs and CORS use. TRACE would echo
# the request (cookies, keys) back; CONNECT would ask us to tunnel.
ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")

# What of a request line may reach the access log when the head was never complete.
PRINTABLE = re.compile(rb"[\x21-\x7e]{1,2000}")

# A chunked body over MAX_BODY_BYTES is handed on once this much more than
# the limit is in: the application reads limit + 1 bytes to see that it is
# over, and gunicorn's Body.read asks its reader for at least 1 KiB at a time
# (gunicorn/http/body.py, Body.read), so up to 1023 bytes past what is asked.
# (A body that stalls less than that over the limit gets 408, as any stalled body.)
OVER_LIMIT_MARGIN = 1024 + 1

# How much one recv() takes: a head fits in one; a body goes faster in big ones.
HEAD_READ = 64 * 1024
BODY_READ = 1024 * 1024

# gunicorn's own close (util.close_graceful) lingers up to 2 s for the client's
# FIN, blocking; here the same wait happens in the poller, without blocking it.
LINGER_S = 2.0
LINGER_DRAIN = 64 * 1024

# ================================================================ the answers the worker gives itself


class Refusal(Exception):
    """A request the worker answers itself (status, code, message), then closes."""

    def __init__(self, status, code, message, headers=()):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers)

    def response(self, path, with_body=True):
        """The whole HTTP answer: the gateway's error in the shape of the
        route's clients (edgegate_errors.error_document), and Connection: close."""
        error = GatewayError(self.status, self.code, self.message)
        body = json.dumps(error_document(path, error, None)).encode()
        head = ["HTTP/1.1 " + status_line(self.status),
                "Date: " + email.utils.formatdate(usegmt=True),
                "Content-Type: application/json",
                "Content-Length: %d" % len(body),
                "Connection: close"] + ["%s: %s" % h for h in self.headers]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body if with_body else b"")


def malformed_head(error, sizes, head=None):
    """The Refusal for one of gunicorn's parse errors (gunicorn/http/errors.py,
    raised by gunicorn/http/message.py), from ``HEAD_REFUSALS``: the status
    gunicorn's own answer has (gunicorn/workers/base.py, handle_error): 414
    for the request line, 431 for the header fields, 417, 501, else 400. Its
    message names what is wrong; of the request it repeats at most a method
    or a header name, cut short and escaped (``printable``), never a value or
    a line, which may hold a key. ``head`` is the head's bytes (None: not known).
    """
    for kind, status, code, message in HEAD_REFUSALS:
        if isinstance(error, kind):
            return Refusal(status, code, message if isinstance(message, str) else message(error, sizes, head))
    return Refusal(400, "invalid_request", "malformed request head")


def _quoted(header_name):
    return '"%s"' % printable(header_name.title()[:40])


def _line_too_long(error, sizes, head):
    limit = sizes.line or 1024 * 1024  # limit_request_line 0: gunicorn_h1c's 1 MiB (Request.__init__)
    return "the request line is longer than %d bytes" % limit


def _too_many_header_bytes(error, sizes, head):
    # gunicorn's messages (message.py, parse_headers and _parse_python)
    if str(error) == "limit request headers fields":
        return "the request has more than %d header fields" % sizes.fields
    if str(error) == "limit request headers fields size":
        return "a header field line is longer than %d bytes, its CRLF included" % sizes.field_size
    return "the header fields are over %d bytes in all" % sizes.header_section  # "max buffer headers"


def _bad_request_line(error, sizes, head):
    if "bare LF" in str(error):
        return "the request line ends with a bare LF, not CRLF"
    return 'invalid request line: it must be "METHOD /path HTTP/1.1", the path in printable ASCII ' \
           '(percent-encode the rest)'


def _bad_method(error, sizes, head):
    return 'invalid method "%s": a method is an upper-case token such as GET or POST' % printable(
        str(error.method)[:20])


def _bad_header_name(error, sizes, head):
    if "_" in error.hdr and TOKEN_RE.fullmatch(error.hdr):  # header_map = "refuse"
        return "header name %s has an underscore, which is refused (a WSGI application reads it as a hyphen)" \
            % _quoted(error.hdr)
    return "invalid header name %s: a name is letters, digits and !#$%%&'*+-.^_`|~, without spaces" \
        % _quoted(error.hdr)


def _bad_header(error, sizes, head):
    """gunicorn raises InvalidHeader with a header's name, with the request
    for a framing or repeat error (message.py, set_body_reader and
    _apply_header_policy), or with the whole line when it has no colon."""
    hdr = str(error.hdr)
    if hdr == "bare LF as line terminator":
        return "a header line ends with a bare LF, not CRLF"
    if hdr == "CONTENT-LENGTH" and error.req is not None:
        return "invalid Content-Length: it must be one decimal number of bytes, given once and without " \
               "Transfer-Encoding"
    if hdr == "TRANSFER-ENCODING" and error.req is not None:
        return "invalid Transfer-Encoding: it must end with chunked, name it once, and not be on HTTP/1.0"
    if error.req is not None:
        return "header %s is given more than once" % _quoted(hdr)
    if head is None:  # in a thread, where the head is read: which of the two below is not known
        return 'a header line is not "Name: value", or a value holds a control character'
    if TOKEN_RE.fullmatch(hdr) and (hdr + ":").encode("latin-1") in head.upper():
        return "the value of header %s holds a control character" % _quoted(hdr)
    return 'a header line is not "Name: value"'


def _folded(error, sizes, head):
    return "header %s is folded onto a line that starts with a space or tab (obsolete line folding)" % _quoted(
        str(error.hdr))


# gunicorn's parse error -> (status, code, message: text, or a function of (error, sizes, head)).
# The first row whose kind matches counts.
HEAD_REFUSALS = (
    (LimitRequestLine, 414, "request_line_too_long", _line_too_long),
    (LimitRequestHeaders, 431, "request_header_fields_too_large", _too_many_header_bytes),
    (InvalidRequestLine, 400, "invalid_request", _bad_request_line),
    (InvalidRequestMethod, 400, "invalid_request", _bad_method),
    (InvalidHTTPVersion, 400, "invalid_request", "invalid HTTP version: the gateway speaks HTTP/1.0 and HTTP/1.1"),
    (InvalidHeaderName, 400, "invalid_request", _bad_header_name),
    (InvalidHeader, 400, "invalid_request", _bad_header),
    (ObsoleteFolding, 400, "invalid_request", _folded),
    (ExpectationFailed, 417, "expectation_failed", 'the only Expect understood is "100-continue"'),
    (UnsupportedTransferCoding, 501, "unsupported_transfer_coding",
     "unsupported Transfer-Encoding: send the body with Content-Length, or chunked"),
    (InvalidSchemeHeaders, 400, "invalid_request", "the request's scheme headers (X-Forwarded-Proto, ...) disagree"),
    (ForbiddenProxyRequest, 403, "proxy_not_allowed", "a PROXY protocol header from an address not in proxy_allow_ips"),
    ((InvalidProxyLine, InvalidProxyHeader), 400, "invalid_request", "malformed PROXY protocol header"),
    ((InvalidChunkSize, ChunkMissingTerminator, InvalidChunkExtension), 400, "invalid_request",
     "malformed chunked request body"),
)


# ================================================================ what the parser reads from


class BufferedSource:
    """The socket as gunicorn's parser sees it: the bytes the poller
    buffered for one request (and any pipelined behind it), nothing more.

    gunicorn's parser reads through ``SocketUnreader(source).chunk``, which
    only calls ``source.recv(n)`` (``gunicorn/http/unreader.py``), and its
    keep-alive drain only ``gettimeout``/``settimeout`` on it
    (``gunicorn/http/parser.py``, ``Parser.finish_body``). Everything else
    (the response, ``environ["gunicorn.socket"]``, which the gateway's
    watcher puts in its epoll set and shuts down) still uses the real socket.
    A request handed on is complete (or over MAX_BODY_BYTES, and not to be
    read), so the parser never needs the socket for it: past the buffer,
    ``recv`` fails as a reset would, rather than block a thread on a client
    that may never send (gthread closes the connection quietly on ECONNRESET).
    """

    def __init__(self, sock):
        self.sock = sock
        self.data = b""
        self.pos = 0
        self.spool = None  # the body's bytes past CLIENT_BODY_BUFFER_BYTES, in a file: read after ``data``
        self.tail = b""  # what came after the spooled bytes: read after the spool

    def load(self, data, spool=None, split=0):
        """The bytes of a request: ``data``, or, when part of its body was
        spooled, ``data[:split]`` (the head), the spool, then ``data[split:]``."""
        if self.spool is not None:
            self.spool.close()  # its temporary file is gone with it
        if spool is None:
            self.data, self.pos, self.spool, self.tail = data, 0, None, b""
        else:
            self.data, self.pos, self.spool, self.tail = bytes(data[:split]), 0, spool.written(), bytes(data[split:])

    def recv(self, size):
        while self.pos >= len(self.data):
            if self.spool is None:
                raise ConnectionResetError(errno.ECONNRESET, "read past the request the worker buffered")
            piece = self.spool.read(size)  # a read from the page cache, in the request's thread
            if piece:
                return piece
            self.spool.close()
            self.spool, self.data, self.pos, self.tail = None, self.tail, 0, b""
        with memoryview(self.data) as view:
            piece = bytes(view[self.pos:self.pos + size])
        self.pos += len(piece)
        if self.pos >= len(self.data) and self.spool is None:
            self.load(b"")  # let a large body go as soon as it is read
        return piece

    def take_rest(self):
        """The buffered bytes not read yet (a pipelined next request)."""
        with memoryview(self.data) as view:
            rest = [bytes(view[self.pos:])]
        if self.spool is not None:
            rest += [self.spool.read(), self.tail]
        self.load(b"")
        return b"".join(rest)

    def gettimeout(self):
        return self.sock.gettimeout()

    def settimeout(self, value):
        self.sock.settimeout(value)


class BufferingConnection(TConn):
    """gunicorn's connection, plus what the worker knows of its current request."""

    def __init__(self, cfg, sock, client, server):
        super().__init__(cfg, sock, client, server)
        self.source = BufferedSource(sock)
        self.address = client[0] if isinstance(client, tuple) else None  # None: a unix socket
        self.requests = 0
        self.continue_sent = False  # the poller answered this request's Expect: 100-continue
        self.over_limit = False  # handed on with a body over MAX_BODY_BYTES, unread
        self.body_share = None  # the body budget taken for its request before a thread (edgegate_spool.Share)
        self.linger_until = None  # closing: our FIN is sent, the client's awaited until then
        self.drained = 0  # bytes read and dropped while lingering

    def close(self):
        self.source.load(b"")  # a spooled body not read to its end: its file goes now
        share, self.body_share = self.body_share, None
        if share is not None:  # its request never reached the application (a thread pool shut down)
            share.release()
        super().close()


# ================================================================ following a chunked body


class ChunkedBody:
    """Follows a chunked request body as it arrives (RFC 9112 section 7.1),
    only to know where it ends and whether it is well formed.

    The rules are gunicorn's own (``gunicorn/http/body.py``, ChunkedReader:
    ``parse_chunk_size``, ``parse_chunked``, ``parse_trailers``), so that
    what passes here also passes there: a chunk size is hex digits only (no
    sign, no 0x, no spaces but before a ``;`` extension), every line ends
    with CRLF (a bare LF is refused), chunk data is followed by CRLF, and the
    last chunk by a trailer section that gunicorn's header rules accept.
    Refused as they arrive, these never reach the application (today they
    make it fail with 500 on a kept-alive connection).
    """

    def __init__(self, request):
        self.request = request  # the head, parsed by gunicorn; checks trailers
        self.size_line_limit = request.limit_request_field_size
        self.trailer_limit = request.max_buffer_headers
        self.state = "size"
        self.left = 0  # bytes of the current chunk still to come
        self.decoded = 0  # bytes of content so far
        self.done = False

    def follow(self, data, pos):
        """Read ``data`` from ``pos`` as far as it goes; returns the new
        position. Raises Refusal (400) on a framing error."""
        while not self.done:
            if self.state == "size":
                end = data.find(b"\r\n", pos)
                line = bytes(data[pos:end if end >= 0 else len(data)])
                if b"\n" in line:
                    raise bad_chunk("a chunk size line ends with a bare LF")
                if end < 0:
                    if len(line) > self.size_line_limit:
                        raise bad_chunk("a chunk size line is over %d bytes" % self.size_line_limit)
                    return pos
                pos = end + 2
                self.start_chunk(line)
            elif self.state == "data":
                take = min(self.left, len(data) - pos)
                pos += take
                self.left -= take
                self.decoded += take
                if self.left:
                    return pos
                self.state = "crlf"
            elif self.state == "crlf":
                if len(data) - pos < 2:
                    if data[pos:pos + 1] not in (b"", b"\r"):
                        raise bad_chunk("chunk data is not followed by CRLF")
                    return pos
                if data[pos:pos + 2] != b"\r\n":
                    raise bad_chunk("chunk data is not followed by CRLF")
                pos += 2
                self.state = "size"
            else:  # "trailers"
                return self.trailers(data, pos)
        return pos

    def trailers(self, data, pos):
        """After the last chunk: an empty line, or trailer fields then one."""
        if len(data) - pos < 2:
            return pos
        if data[pos:pos + 2] == b"\r\n":
            self.done = True
            return pos + 2
        end = data.find(b"\r\n\r\n", pos)
        section = bytes(data[pos:end if end >= 0 else len(data)])
        if section.count(b"\n") != section.count(b"\r\n"):
            raise bad_chunk("a trailer line ends with a bare LF")
        if end < 0:
            if len(section) > self.trailer_limit:
                raise bad_chunk("the trailer section is over %d bytes" % self.trailer_limit)
            return pos
        try:
            self.request.parse_headers(section, from_trailer=True)
        except Exception as error:  # gunicorn's InvalidHeader, LimitRequestHeaders, ...
            raise bad_chunk("a trailer field is refused (%s)" % error)
        self.done = True
        return end + 4

    def start_chunk(self, line):
        size, *extension = line.split(b";", 1)
        if extension:
            if b"\r" in extension[0]:
                raise bad_chunk("a chunk extension holds a bare CR")
            size = size.rstrip(b" \t")  # RFC 9112 7.1.1: whitespace only before an extension
        if not size or any(c not in b"0123456789abcdefABCDEF" for c in size):
            raise bad_chunk("invalid chunk size %r" % size.decode("latin-1")[:40])
        if extension and not CHUNK_EXT_RE.fullmatch(b";" + extension[0]):
            raise bad_chunk("invalid chunk extension")
        self.left = int(size, 16)
        self.state = "data" if self.left else "trailers"


def has_bare_lf(data, start):
    """Whether ``data[start:]`` holds an LF not preceded by a CR."""
    at = data.find(b"\n", start)
    while at >= 0:
        if at == 0 or data[at - 1] != 0x0D:
            return True
        at = data.find(b"\n", at + 1)
    return False


def bad_chunk(message):
    return Refusal(400, "invalid_request", "malformed chunked request body: " + message)


# ================================================================ one arriving request


class ArrivingRequest:
    """The bytes of one request read so far, and how far they go.

    Phases: ``waiting`` (a kept-alive connection, nothing sent yet: it may
    stay silent for gunicorn's ``keepalive`` seconds), ``head`` (until the
    blank line; deadline CLIENT_HEADER_TIMEOUT_S), ``body`` (until
    Content-Length bytes or the chunked body's end; deadline
    CLIENT_BODY_TIMEOUT_S from the end of the head), ``room`` (all in, a
    large body waiting for the worker's body budget, out of the poller;
    deadline BODY_WAIT_S).
    """

    def __init__(self, conn, data, phase, deadline):
        self.conn = conn
        self.data = bytearray(data)
        self.phase = phase
        self.deadline = deadline
        self.started = time.monotonic()  # for the access log: from the accept or the first byte
        self.scanned = 0  # how far the head was searched for its end and for a bare LF
        self.request = None  # gunicorn's Request for the head, once it is in
        self.body_start = 0
        self.length = 0  # Content-Length, when not chunked
        self.chunked = None  # a ChunkedBody, when chunked
        self.chunked_pos = 0
        self.spool = None  # body bytes past CLIENT_BODY_BUFFER_BYTES (edgegate_spool.Spool), in a file
        self.spooled = 0  # how many: in ``data`` the body goes on from ``body_start`` after them
        self.cost = None  # in phase ``room``: the budget it waits for

    def body_received(self):
        return self.spooled + len(self.data) - self.body_start

    def description(self):
        """(method, uri, version) for the access log, as far as known."""
        if self.request is not None:
            return self.request.method, self.request.uri, "HTTP/%d.%d" % self.request.version
        start = 2 if self.data[:2] == b"\r\n" else 0  # one empty line may come first (RFC 9112 section 2.2)
        end = self.data.find(b"\r\n", start)
        line = bytes(self.data[start:end]).split(b" ") if end > start else []
        if len(line) == 3 and all(PRINTABLE.fullmatch(part) for part in line):
            return tuple(part.decode("ascii") for part in line)
        return "-", "-", "-"  # nothing from a malformed line reaches the log


# ================================================================ the worker


class HeadJudging:
    """What the worker judges from the bytes of a request as they arrive
    (part of ``BufferingWorker``): where the head ends, whether gunicorn's
    parser or this worker refuses it, and whether the whole body is in."""

    def read_head(self, arriving):
        """True once the head is in and ``arriving.request`` set. Raises
        Refusal for a head that gunicorn's parser or this worker refuses."""
        data = arriving.data
        end = data.find(b"\r\n\r\n", max(0, arriving.scanned - 3))
        if end < 0:
            # No blank line yet. gunicorn's parser does not wait for it when
            # it sees a bare LF, a request line over limit_request_line or a
            # head over its size limits (Request._parse_python, read_line):
            # such a head is judged now, for gunicorn's 400, 414 or 431.
            bare_lf = has_bare_lf(data, arriving.scanned)
            arriving.scanned = len(data)
            if not (bare_lf or self.request_line_too_long(data) or len(data) > self.head_limit):
                return False
            head = bytes(data)
        else:
            head = bytes(data[:end + 4])
            arriving.body_start = end + 4
        request = self.parse_head(arriving, head)
        self.check_head(request)
        arriving.request = request
        arriving.phase = "body"
        arriving.deadline = time.monotonic() + self.limits.body_timeout_s
        reader = request.body.reader
        if isinstance(reader, ChunkedReader):
            arriving.chunked = ChunkedBody(request)
            arriving.chunked_pos = arriving.body_start
        else:  # LengthReader: a declared length, or 0 (gunicorn/http/message.py, set_body_reader)
            arriving.length = reader.length
        return True

    def request_line_too_long(self, data):
        """Whether the request line, not ended yet, is already over gunicorn's limit."""
        limit = self.head_sizes.line
        return limit is not None and len(data) > limit + 4 and data.find(b"\r\n", 0, limit + 4) < 0

    def spool_body(self, arriving, end):
        """Keep at most CLIENT_BODY_BUFFER_BYTES of a body in memory: past
        that, its bytes up to ``end`` (those of this request, and for a
        chunked body those already followed) go to a temporary file in
        STATE_DIR, as nginx does past client_body_buffer_size (README,
        "Large request bodies"). The write lands in the page cache: it does
        not stall the poller as a slow client would."""
        start = arriving.body_start
        if end - start <= self.bodies.in_memory:
            return
        try:
            if arriving.spool is None:
                arriving.spool = self.bodies.spool(in_memory=1)
            with memoryview(arriving.data) as view:
                arriving.spool.write(view[start:end])
        except SpoolFailed as error:  # a full disk: this request is answered, the worker goes on
            self.log.error("%s", error)
            raise Refusal(503, "body_not_stored", "the gateway could not store the request body; retry later",
                          headers=[("Retry-After", "5")])
        del arriving.data[start:end]
        arriving.spooled += end - start
        if arriving.chunked is not None:
            arriving.chunked_pos -= end - start

    def parse_head(self, arriving, head):
        """gunicorn's own Request for the head, so that where this worker
        thinks the body ends is where gunicorn will: no two readings of
        Content-Length or Transfer-Encoding (request smuggling). It is fed
        in the 8 KiB pieces a thread reads from a socket
        (gunicorn/http/unreader.py, SocketUnreader), since the parser checks
        its size limits as pieces come. What it refuses is answered here
        (malformed_head) instead of by gunicorn's handle_error in a thread."""
        pieces = [head[at:at + 8192] for at in range(0, len(head), 8192)]
        try:
            return Request(self.cfg, IterUnreader(pieces), arriving.conn.client, arriving.conn.requests + 1)
        except ParseException as error:
            raise malformed_head(error, self.head_sizes, head)
        except (NoMoreData, StopIteration):
            # Not seen with the heads read_head passes (a blank line, or a
            # fault the parser names before it); limit_request_line = 0
            # (no limit) and a line past head_limit would come here.
            pass
        except Exception:  # a fault of the parser's, not the client's: keep the worker's loop alive
            self.log.exception("gunicorn's parser failed on a request head")
        raise Refusal(400, "invalid_request", "the request head could not be read")

    def check_head(self, request):
        """What the worker refuses from the head alone."""
        if request.method not in ALLOWED_METHODS:
            raise Refusal(405, "method_not_allowed", "method %s is not allowed here" % request.method[:20],
                          headers=[("Allow", ", ".join(ALLOWED_METHODS))])
        if request.version >= (1, 1) and not any(name == "HOST" for name, _ in request.headers):
            # RFC 9112 section 3.2: "A server MUST respond with a 400 (Bad
            # Request) status code to any HTTP/1.1 request message that lacks
            # a Host header field".
            raise Refusal(400, "invalid_request", "an HTTP/1.1 request needs a Host header")

    def body_is_in(self, arriving):
        limit = body_limit(self.limits, arriving.request)
        conn = arriving.conn
        if arriving.chunked is None:
            if arriving.length > limit:
                conn.over_limit = True  # the application refuses it by its Content-Length alone
                return True
            self.spool_body(arriving, min(len(arriving.data),
                                          arriving.body_start + arriving.length - arriving.spooled))
            complete = arriving.body_received() >= arriving.length
        else:
            arriving.chunked_pos = arriving.chunked.follow(arriving.data, arriving.chunked_pos)
            self.spool_body(arriving, arriving.chunked_pos)
            if arriving.chunked.decoded >= limit + OVER_LIMIT_MARGIN:
                conn.over_limit = True  # the application reads limit + 1 bytes, all here, and refuses
                return True
            complete = arriving.chunked.done
        if not complete and arriving.request._expected_100_continue and not conn.continue_sent:
            # The client waits for this before it sends the body
            # (RFC 9110 section 10.1.1); gunicorn would send it only in the
            # thread (gunicorn/http/wsgi.py, create), too late here.
            self.send_quietly(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
            conn.continue_sent = True
        return complete


class Answering:
    """How the worker answers a request itself, times one out, and ends a
    connection (part of ``BufferingWorker``)."""

    def refuse(self, conn, arriving, refusal):
        """Answer a refusal, log it as gunicorn logs a request, and close."""
        if arriving is not None:
            self.forget(arriving)
            method, uri, _ = arriving.description()
        else:
            method, uri = "-", "-"
        path = uri.partition("?")[0]
        answer = refusal.response(path, with_body=method != "HEAD")
        sent = self.send_quietly(conn.sock, answer)
        started = arriving.started if arriving is not None else time.monotonic()
        access_log.write(access_line(conn.address, method, path, refusal.status, started,
                                                     bytes_out=max(sent, 0)))
        self.close(conn, graceful=True)

    def handle_error(self, req, client, addr, exc):
        """A parse error in a thread: gunicorn answers it with an HTML page
        and no access line (gunicorn/workers/base.py, handle_error). With
        buffering the poller has answered every malformed head before a
        thread sees it; without (TLS, PROXY protocol, h2c: init_process)
        the thread's parser still meets them, and they get the same envelope
        here. The path is known only when gunicorn passes the request (else
        the default shape); the time is from now, as in gunicorn's own."""
        if (not isinstance(exc, ParseException)
                or isinstance(exc, (InvalidResponseHeader, InvalidResponseHeaderName, ConfigurationProblem))):
            return super().handle_error(req, client, addr, exc)  # not the request's fault, or TLS: gunicorn's
        started = time.monotonic()
        refusal = malformed_head(exc, self.head_sizes)
        if req is None and isinstance(exc, InvalidHeader):
            req = exc.req  # a framing or repeat error carries the request (as in gunicorn's handle_error)
        method = getattr(req, "method", None) or "-"
        path = getattr(req, "path", None) or "-"
        answer = refusal.response(path, with_body=method != "HEAD")
        try:
            client.sendall(answer)  # a blocking socket, in the thread
            sent = len(answer)
        except OSError:
            sent = 0
        address = addr[0] if isinstance(addr, tuple) else None
        access_log.write(access_line(address, method, path, refusal.status, started, bytes_out=sent))

    def send_quietly(self, sock, data):
        """A small write on a non-blocking socket: it fits the empty send
        buffer, and a client that is gone is no error. Returns bytes sent."""
        try:
            return sock.send(data)
        except OSError:
            return 0

    def close(self, conn, graceful=False):
        """The one way a connection ends. Graceful: send our FIN, then read
        until the client's (at most LINGER_S, in the poller), so that bytes
        it still sends do not turn into a reset that loses our answer
        (RFC 9112 section 9.6; gunicorn's util.close_graceful does the same
        blocking, which would stall this poller)."""
        sock = conn.sock
        if graceful:
            try:
                sock.setblocking(False)
                sock.shutdown(socket.SHUT_WR)
                conn.linger_until = time.monotonic() + LINGER_S
                self.lingering[sock] = conn
                self.poller.register(sock, selectors.EVENT_READ, self.on_lingering_readable)
                return
            except (OSError, ValueError, KeyError):
                self.lingering.pop(sock, None)
        self.release(conn)

    def on_lingering_readable(self, sock):
        conn = self.lingering[sock]
        try:
            data = sock.recv(LINGER_DRAIN)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.drained += len(data)
        if not data or conn.drained >= LINGER_DRAIN:
            self.release(conn)

    def release(self, conn):
        """Close the socket and forget it in every count."""
        sock = conn.sock
        if self.lingering.pop(sock, None) is not None:
            try:
                self.poller.unregister(sock)
            except (KeyError, ValueError, OSError):
                pass
        self.nr_conns -= 1
        if conn.address is not None:
            self.per_address[conn.address] -= 1
            if self.per_address[conn.address] <= 0:
                del self.per_address[conn.address]
        conn.close()

    def ended(self, arriving, can_answer):
        """The client ended its stream. Mid-body, the body was cut short:
        it must not go upstream as if complete, so it is refused (the
        client may have only half-closed, and can read the answer)."""
        if arriving.phase == "body" and can_answer:
            received = arriving.body_received()
            expected = "of %d " % arriving.length if arriving.chunked is None else ""
            self.refuse(arriving.conn, arriving, Refusal(
                400, "invalid_request", "the request body ended after %d %sbytes" % (received, expected)))
        else:
            self.forget(arriving)
            self.close(arriving.conn)

    def forget(self, arriving):
        spool, arriving.spool = arriving.spool, None
        if spool is not None:
            spool.close()  # a refused or abandoned body: its file goes now
        if arriving.phase == "room" and arriving in self.parked:
            self.parked.remove(arriving)
        self.arriving.pop(arriving.conn.sock, None)
        try:
            self.poller.unregister(arriving.conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def murder_keepalived(self, force=False):
        """Every pass of ThreadWorker.run's loop (about once a second, and
        with ``force`` at the end): time out the requests still arriving and
        the lingering closes. A stopping worker gives them STOP_KEEPALIVE_LINGER
        at most, as gthread gives its kept-alive connections."""
        super().murder_keepalived(force)
        if not self.buffering:
            return
        if not force:
            self.hand_on_parked()  # a wake may have been lost (a full pipe): look once a second anyway
        now = time.monotonic()
        for arriving in list(self.arriving.values()):
            if not self.alive:
                arriving.deadline = min(arriving.deadline, now + STOP_KEEPALIVE_LINGER)
            if force:
                self.forget(arriving)
                self.release(arriving.conn)
            elif now < arriving.deadline:
                continue
            elif arriving.phase == "room":
                self.refuse(arriving.conn, arriving, Refusal(
                    503, "body_memory_busy", "this worker is reading as many large request bodies as "
                    "BODY_MEMORY_BYTES allows; retry shortly", headers=[("Retry-After", "1")]))
            elif arriving.phase == "waiting" or (arriving.phase == "head" and not arriving.data):
                # A kept-alive or new connection that never sent a byte: closed
                # without an answer, as gthread closes an idle one.
                self.forget(arriving)
                self.release(arriving.conn)
            else:
                part = "head" if arriving.phase == "head" else "body"
                limit = self.limits.header_timeout_s if part == "head" else self.limits.body_timeout_s
                self.refuse(arriving.conn, arriving, Refusal(
                    408, "request_timeout", "the request %s did not arrive within %g s" % (part, limit)))
        for conn in list(self.lingering.values()):
            if force or now >= conn.linger_until:
                self.release(conn)


def header_of(request, name):
    """The value of the first ``name`` header of gunicorn's ``request`` (names
    upper case, as its parser keeps them), stripped; "" when there is none."""
    return next((value.strip() for field, value in request.headers if field == name), "")


class BodyTurns:
    """How a large body waits for its share of the body budget
    (BODY_MEMORY_BYTES) in the poller, without a thread (part of
    ``BufferingWorker``; README, "Large request bodies")."""

    def hand_on_when_room(self, arriving):
        """Hand the request on, with its share of the body budget
        (BODY_MEMORY_BYTES) when its body is large; if the share is not
        there, wait for it here, out of the poller, in arrival order: a
        crowd of large bodies holds no thread while it waits (README,
        "Large request bodies")."""
        cost = self.body_cost(arriving)
        if cost is not None:
            share = None if self.parked else self.bodies.budget.try_take(cost)
            if share is None:
                self.park(arriving, cost)
                return
            arriving.conn.body_share = share
        self.hand_on(arriving)

    def body_cost(self, arriving):
        """What reading the body whole would take (as the application counts
        it, edgegate_body.take_share), or None for a body kept in memory (at
        most CLIENT_BODY_BUFFER_BYTES), empty or refused unread. A compressed one's
        decoded size is not known yet, however small it came: it asks for
        COMPRESSED_GROWTH times its size (at most the whole budget); once
        decoded, the application gives back what it does not need, or
        waits in its thread for the rest (a body that decodes to more:
        a bomb, mostly)."""
        if arriving.conn.over_limit or arriving.body_received() == 0:
            return None
        if header_of(arriving.request, "CONTENT-ENCODING").lower() not in ("", "identity"):
            return min(self.bodies.budget.size, COMPRESSED_GROWTH * arriving.body_received())
        if arriving.spool is None:  # small: most requests end here, having read one header
            return None
        if header_of(arriving.request, "CONTENT-TYPE").lower().startswith("multipart/"):
            return 4 * arriving.body_received()
        return arriving.body_received() * text_width(arriving.data, arriving.spool.width)

    def park(self, arriving, cost):
        try:
            self.poller.unregister(arriving.conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        arriving.phase, arriving.cost = "room", cost
        arriving.deadline = time.monotonic() + self.bodies.wait_s
        self.parked.append(arriving)

    def hand_on_parked(self):
        """On the main thread, when part of the budget came back: the
        waiting bodies, first come first served, as far as it goes."""
        while self.parked:
            arriving = self.parked[0]
            share = self.bodies.budget.try_take(arriving.cost)
            if share is None:
                return
            self.parked.popleft()
            arriving.conn.body_share = share
            self.hand_on(arriving)

    def budget_freed(self):
        """BodyBudget.on_free, from any thread: wake the poller to hand parked bodies on."""
        try:
            self.method_queue.defer(self.hand_on_parked)
        except AttributeError:  # not running yet (no queue): the next tick looks
            pass


class BufferingWorker(HeadJudging, Answering, BodyTurns, ThreadWorker):
    """gunicorn's gthread worker, reading each request in before a thread runs it.

    What it does to a request: the main thread reads what has arrived on
    each connection into a buffer (never blocking) until the head and the
    whole body are in; gunicorn's own Request class parses the head, and a
    chunked body is checked as it arrives. Then the connection goes to the
    thread pool with a ``BufferedSource`` in front of its socket, and
    gunicorn's handler and the application run as with gthread. A request
    that takes too long, is malformed or is refused by the rules above is
    answered here, and its connection closed. A body declared over
    MAX_BODY_BYTES is handed on at once (a chunked one as soon as it goes
    over), unread, so that the application answers 413; its connection is
    then closed instead of drained. Kept-alive connections come back to the
    poller and their next request is read the same way.

    Set in gunicorn.conf.py:  ``worker_class = "edgegate_worker.BufferingWorker"``
    """

    def init_process(self):
        self.limits = client_limits(self.edgegate)  # set by gunicorn.conf.py's post_fork
        # TLS, HTTP/2, uwsgi and the PROXY protocol put bytes before or
        # around the HTTP/1 request that this worker does not read; with
        # them it leaves every connection to gthread as it is.
        self.buffering = (not self.cfg.is_ssl and getattr(self.cfg, "protocol", "http") == "http"
                          and getattr(self.cfg, "http2_cleartext", "off") == "off"
                          and getattr(self.cfg, "proxy_protocol", "off") in ("off", False, None))
        self.arriving = {}  # socket -> ArrivingRequest
        self.lingering = {}  # socket -> BufferingConnection, closing
        self.per_address = collections.Counter()  # open connections by client address
        # The largest head gunicorn's parser reads without its blank line
        # (gunicorn/http/message.py, Request._parse_python); past it, it answers 431 or 414.
        self.head_sizes = head_sizes(self.cfg)
        self.head_limit = self.head_sizes.header_section + (self.head_sizes.line or MAX_REQUEST_LINE) + 4
        # Where a body past CLIENT_BODY_BUFFER_BYTES is spooled, and the body budget: the application's
        # own (gunicorn.conf.py, post_fork), so that the poller and the threads count in one budget.
        self.bodies = getattr(self, "body_room", None) or BodyRoom(self.edgegate)
        self.bodies.budget.on_free = self.budget_freed
        self.parked = collections.deque()  # ArrivingRequests in phase "room", first come first
        give_large_buffers_back()  # a large body's buffers are freed to the system, not kept per thread
        super().init_process()

    # -- a new connection

    def accept(self, listener):
        if not self.buffering:
            return super().accept(listener)
        try:
            sock, address = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = BufferingConnection(self.cfg, sock, address, listener.getsockname())  # non-blocking
        if conn.address is not None:
            self.per_address[conn.address] += 1
        cap = self.limits.max_connections_per_client
        if cap and conn.address is not None and self.per_address[conn.address] > cap:
            # Answered before its request is read, so that the refusal costs
            # nothing but this write; lingering then reads what it sent.
            self.refuse(conn, None, Refusal(
                429, "too_many_connections",
                "this client address has %d connections open; at most %d are served at once"
                % (self.per_address[conn.address] - 1, cap), headers=[("Retry-After", "1")]))
            return
        self.arrive(ArrivingRequest(conn, b"", "head", time.monotonic() + self.limits.header_timeout_s))

    # -- reading a request in the poller

    def arrive(self, arriving):
        """Watch a connection for its next request (already begun in ``arriving.data``)."""
        self.arriving[arriving.conn.sock] = arriving
        if arriving.data and not self.advance(arriving):
            return
        self.poller.register(arriving.conn.sock, selectors.EVENT_READ, functools.partial(self.on_readable, arriving))

    def on_readable(self, arriving, sock):
        try:
            data = sock.recv(BODY_READ if arriving.phase == "body" else HEAD_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = None  # reset by the client: like an end of stream, with nobody to answer
        if not data:
            self.ended(arriving, data is not None)
            return
        if arriving.phase == "waiting":
            arriving.phase = "head"
            arriving.started = time.monotonic()
            arriving.deadline = arriving.started + self.limits.header_timeout_s
        arriving.data += data
        self.advance(arriving)

    def advance(self, arriving):
        """Judge what has arrived: hand the request on once it is all in,
        answer it here if it is refused. Returns False once the connection
        has left the poller's care (handed on or closed)."""
        try:
            if arriving.phase == "head" and not self.read_head(arriving):
                return True
            if not self.body_is_in(arriving):
                return True
        except Refusal as refusal:
            self.refuse(arriving.conn, arriving, refusal)
            return False
        self.hand_on_when_room(arriving)
        return False

    # -- from the poller to a thread, and back

    def hand_on(self, arriving):
        """The request is in: give the connection to a thread, its bytes first."""
        conn = arriving.conn
        spool, arriving.spool = arriving.spool, None  # the source owns it now, and closes it
        self.forget(arriving)
        if conn.parser is None:
            conn.parser = RequestParser(self.cfg, conn.source, conn.client)
        conn.source.load(arriving.data, spool, arriving.body_start)
        conn.data_ready = True  # skip gthread's own wait for a first byte (ThreadWorker.handle)
        self.enqueue_req(conn)

    def handle_request(self, req, conn):
        """In the thread, with the request parsed again by gunicorn."""
        if not self.buffering:
            return super().handle_request(req, conn)
        conn.requests += 1
        # The body is in already, or is not wanted: no 100 Continue from
        # gunicorn now (gunicorn/http/wsgi.py, create, sends one when this is set).
        req._expected_100_continue = False
        if conn.over_limit:
            req.force_close()  # its body is not read, so the connection cannot serve another request
        conn.continue_sent = conn.over_limit = False
        give_share(conn.body_share)  # the application takes it (edgegate_spool.take_given_share)
        conn.body_share = None
        try:
            return super().handle_request(req, conn)
        finally:
            give_back_given_share()  # not taken (a refusal, a route that reads no body): back now

    def finish_request(self, conn, fs):
        """Back on the main thread after a request (ThreadWorker.enqueue_req's
        callback). A kept-alive connection returns to the poller, with the
        bytes the thread read past its request (a pipelined next request)."""
        if not self.buffering:
            return super().finish_request(conn, fs)
        try:
            keep = not fs.cancelled() and fs.result() is True
        except Exception:
            keep = False
        if not keep:
            self.close(conn, graceful=True)
            return
        rest = conn.parser.unreader.take_buffered() + conn.source.take_rest()
        conn.sock.setblocking(False)
        now = time.monotonic()
        if rest:
            arriving = ArrivingRequest(conn, rest, "head", now + self.limits.header_timeout_s)
        else:
            arriving = ArrivingRequest(conn, b"", "waiting", now + self.cfg.keepalive)
        self.arrive(arriving)
