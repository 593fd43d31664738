"""A stand-in for Ollama: a real HTTP server on 127.0.0.1 that speaks Ollama's
native API, its OpenAI-compatible API and its Anthropic Messages API, and can
be told how to misbehave.

Routes, in the shapes Ollama's own source gives them (server/routes.go
GenerateRoutes, anthropic/anthropic.go, middleware/anthropic.go,
middleware/openai.go):

    GET|HEAD /                      200 "Ollama is running" (text/plain)
    GET|HEAD /api/version, /api/tags; GET /api/ps, /api/status; POST /api/show
    POST /api/generate, /api/chat, /api/embed, /api/embeddings   (NDJSON / JSON)
    GET /v1/models; POST /v1/chat/completions, /v1/completions,
         /v1/embeddings, /v1/responses                            (SSE / JSON)
    POST /v1/messages               Anthropic Messages: JSON, or with
                                    "stream": true Ollama's SSE sequence
                                    message_start (usage.input_tokens: Ollama's
                                    len/4 estimate), content_block_start,
                                    content_block_delta..., content_block_stop,
                                    message_delta (usage: the real input_tokens
                                    and output_tokens), message_stop; errors as
                                    {"type": "error", "error": {"type", "message"},
                                    "request_id"}
    POST /v1/audio/transcriptions   multipart form (model, file, response_format,
                                    language, prompt) -> {"text": ..., "received":
                                    {"model", "filename", "content_type", "bytes",
                                    "sha256", "fields"}}: what arrived, so a test
                                    can check the file came byte for byte
    POST /api/me, /api/signout, /api/experimental/web_search,
         /api/experimental/web_fetch; DELETE /api/user/keys/<key>;
    GET /api/experimental/model-recommendations    account and web routes (200)
    POST /api/pull, /api/push, /api/create, /api/copy, /api/blobs/<digest>;
    HEAD /api/blobs/<digest>; DELETE /api/delete   management routes (200/201)

Loaded models (``server.loaded``: name -> {"keep_alive": seconds, "expires_at":
unix time}; math.inf = forever) follow Ollama's scheduler (server/sched.go): an
inference request loads its model; a native ``keep_alive`` sets its lifetime
(seconds, or a Go duration string; negative = forever); a request without one
(and every /v1 request: Ollama drops the field there) keeps a loaded model's
lifetime, or gets the default 5m when it loads it. ``keep_alive`` 0 with no
prompt (generate) or no messages (chat) unloads at once and answers
``"done_reason": "unload"``; with a prompt the model is unloaded after the
answer. /api/generate without a prompt and /api/chat without messages answer
``"done_reason": "load"``. ``GET /api/ps`` lists the unexpired ones, longest
left first. Names ending ``:cloud`` or ``-cloud`` (Ollama's cloud models) are
never loaded. ``server.load(model, keep_alive)`` and ``server.loaded_models()``
set and read it; ``reset()`` empties it.

Behaviour comes from the server's ``defaults`` (tests set them directly) and
from an ``X-Stub`` request header (``X-Stub: delay=2,chunks=5``), which wins:

    delay=S           silent S seconds before the response headers
    stall=S           silent S seconds after the headers, before the first chunk
    chunks=N          N content pieces in a streamed answer (default 3)
    chunk_delay=S     pause between pieces
    chunk_bytes=N     each piece carries N bytes of text (default: one word)
    word=W            each piece is the text W
    tool_call=NAME    /v1 chat answers with a call of tool NAME (streamed in fragments)
    sse_error_after=N an SSE stream sends an error event after N events
                      (/v1/messages: "event: error" in Anthropic's shape)
    linger=S          wait S seconds after the last piece before ending the chunked body
                      (as llama.cpp's server does after data: [DONE])
    status=C          answer with status C and an error body in the route's shape
                      (/api: {"error"}; /v1: OpenAI's; /v1/messages: Anthropic's)
    reset_after=N     reset the connection (RST) after N pieces; 0 = before headers
    truncate_after=N  close after N pieces without ending the chunked body
    malformed=1       a 200 whose JSON body is broken
    short_body=1      a 200 whose Content-Length promises more bytes than it sends, then closes
    html500=1         a 500 with an HTML page
    garbage=1         an answer that is not HTTP
    never=1           accept and never answer
    gzip=1            a gzip-encoded JSON body

Models whose config points at another server (``ollama cp x:cloud name``,
a Modelfile ``FROM x-cloud``): ``server.remote[name] = (remote_host,
remote_model)``; /api/show then answers ``remote_host`` and ``remote_model``
at the top of its document, as Ollama's GetModelInfo does. A path with a
trailing slash that is a route without it answers as gin does
(RedirectTrailingSlash): 307 to the path without it (301 for GET), no body.
GET /v1/models/<model> answers OpenAI's model object.

Every request is recorded (``received``; the gateway's own looks at the model
list, ``User-Agent: edgegate-models``, in ``polls``, and its /api/show looks at
whether a model is remote, ``User-Agent: edgegate-remote-check``, in
``model_checks``): method, path, query, headers (a dict
with lower-case names, and ``raw_headers``: the (name, value) pairs as they
came, in order, duplicates kept), body (the bytes as they came: a chunked body
is de-chunked, a Content-Encoding is left as it is; ``decoded()`` undoes gzip,
deflate and, if the ``zstandard`` module is there, zstd), ``form`` for a
multipart body (name -> str, or bytes for a file), when it arrived, and when the
client hung up (``hangup_at``), which is how the tests measure that the gateway
closes the upstream connection. The gateway's own look at a model
(POST /api/show with ``User-Agent: edgegate-remote-check``) is recorded in
``model_checks`` instead, so that what clients sent stays in ``received``.

Run alone for the benchmark: ``python tests/stub_upstream.py --port 8000``.
"""

import argparse
import datetime
import gzip
import hashlib
import json
import math
import os
import re
import select
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:  # optional: only to decode a zstd request body as Ollama's /v1 routes do
    import zstandard
except ImportError:
    zstandard = None

MODELS = ["llama3.2:latest", "nomic-embed-text:latest"]
WORDS = ["Hello", " from", " the", " stub", " upstream", "."]
CREATED_AT = "2026-01-01T00:00:00Z"
DEFAULT_KEEP_ALIVE = 300.0  # envconfig.KeepAlive(): OLLAMA_KEEP_ALIVE, default 5m
FOREVER = math.inf  # a negative keep_alive: Ollama keeps the model loaded for MaxInt64 ns
# Where a model gets loaded; the value says whether the body's keep_alive counts
# (/v1 and /v1/messages drop it: their converted requests carry no KeepAlive).
INFERENCE = {"/api/generate": True, "/api/chat": True, "/api/embed": True, "/api/embeddings": True,
             "/v1/chat/completions": False, "/v1/completions": False, "/v1/embeddings": False,
             "/v1/responses": False, "/v1/messages": False, "/v1/audio/transcriptions": False}
# Routes behind Ollama's cloudPassthroughMiddleware, which decodes a zstd body (server/cloud_proxy.go).
ZSTD_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"}


class Record:
    """One request as the stub received it."""

    def __init__(self, method, path, query, headers, body, raw_headers=(), chunked=False):
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.raw_headers = list(raw_headers)  # [(name, value)] as they came
        self.body = body
        self.chunked = chunked  # the body came with Transfer-Encoding: chunked
        self.form = None  # a multipart body: name -> str, or bytes for a file part
        self.arrived_at = time.monotonic()
        self.hangup_at = None
        self.finished_at = None
        self.pieces_sent = 0
        self.sent_at = []  # time.monotonic() after each streamed piece was written

    def json(self):
        return json.loads(self.body)

    def decoded(self):
        """The body with its Content-Encoding undone."""
        return _decode_body(self.body, self.headers.get("content-encoding", ""))


def _decode_body(body, encoding):
    for coding in reversed([c.strip().lower() for c in encoding.split(",") if c.strip()]):
        if coding in ("gzip", "x-gzip"):
            body = gzip.decompress(body)
        elif coding == "deflate":
            body = zlib.decompress(body)
        elif coding == "zstd" and zstandard is not None:
            body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
        elif coding != "identity":
            raise ValueError("cannot decode %r" % coding)
    return body


class StubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, port=0):
        super().__init__(("127.0.0.1", port), Handler)
        self.defaults = {}
        self.received = []
        self.polls = []  # the gateway's GET /api/tags looks (User-Agent: edgegate-models)
        self.keep_records = 100000
        self.loaded = {}  # model name -> {"keep_alive": seconds, "expires_at": unix time}
        self.remote = {}  # model name -> (remote_host, remote_model): a local name for a remote model
        self.model_checks = []  # the gateway's own /api/show looks (edgegate_remote.py)
        self.lock = threading.Lock()
        self.thread = None

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server_address[1]

    def start(self):
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()

    def reset(self):
        with self.lock:
            self.defaults = {}
            self.received = []
            self.loaded = {}
            self.remote = {}
            self.model_checks = []

    # -- loaded models, as Ollama's scheduler keeps them (server/sched.go)

    def load(self, model, keep_alive=None):
        """Load ``model`` as an inference request would: ``keep_alive`` in
        seconds (math.inf = forever, 0 = unload), or None to keep a loaded
        model's lifetime (the default 5m for one not loaded)."""
        name = model_name(model)
        if name is None:
            return
        with self.lock:
            entry = self.loaded.get(name)
            if keep_alive is None:
                keep_alive = entry["keep_alive"] if entry else DEFAULT_KEEP_ALIVE
            self.loaded[name] = {"keep_alive": keep_alive, "expires_at": time.time() + keep_alive}

    def unload(self, model):
        with self.lock:
            self.loaded.pop(model_name(model), None)

    def loaded_models(self):
        """Names of the loaded, unexpired models, longest left first (as /api/ps lists them)."""
        now = time.time()
        with self.lock:
            for name in [n for n, e in self.loaded.items() if e["expires_at"] <= now]:
                del self.loaded[name]
            alive = list(self.loaded.items())
        alive.sort(key=lambda item: -item[1]["expires_at"])  # stable: ties keep load order
        return [name for name, _ in alive]

    def requests_to(self, path):
        with self.lock:
            return [r for r in self.received if r.path == path]

    def wait_for(self, predicate, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.005)
        return predicate()


def model_name(model):
    """The name /api/ps shows for ``model`` (Ollama's DisplayShortest: the tag
    is kept, ``:latest`` added), or None for a model that never loads locally:
    none at all, or one of Ollama's cloud models (internal/modelref/modelref.go:
    the text after the last ':' is ``cloud`` or ends ``-cloud``)."""
    if not isinstance(model, str) or not model.strip():
        return None
    model = model.strip()
    _, colon, tag = model.rpartition(":")
    if colon and (tag.lower() == "cloud" or ("/" not in tag and tag.lower().endswith("-cloud"))):
        return None
    if ":" not in model.rpartition("/")[2]:
        model += ":latest"
    return model


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0,
                   "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"([0-9]*\.?[0-9]*)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def keep_alive_seconds(value):
    """Ollama's api.Duration.UnmarshalJSON: a number is seconds, a string is a
    Go duration ("5m", "1h30m", "0"); negative means forever. Raises
    ValueError with Go's message for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("Unsupported type: '%s'" % type(value).__name__)
    if not isinstance(value, str):
        return FOREVER if value < 0 else float(value)
    text = value
    sign = -1.0 if text[:1] == "-" else 1.0
    text = text[1:] if text[:1] in "+-" else text
    if text == "0":
        return 0.0
    if not text:
        raise ValueError('time: invalid duration "%s"' % value)
    total, at = 0.0, 0
    while at < len(text):
        match = _DURATION.match(text, at)
        if not match or match.group(1) in ("", "."):
            if re.fullmatch(r"[0-9.]+", text[at:]):
                raise ValueError('time: missing unit in duration "%s"' % value)
            raise ValueError('time: invalid duration "%s"' % value)
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        at = match.end()
    return FOREVER if sign < 0 and total > 0 else total


def _go_time(unix):
    """A time as Go's encoding/json writes it (RFC 3339, local offset)."""
    if unix == FOREVER:  # time.Now().Add(math.MaxInt64)
        unix = time.time() + (2 ** 63 - 1) / 1e9
    return datetime.datetime.fromtimestamp(unix).astimezone().isoformat()


def parse_multipart(content_type, body):
    """The parts of a multipart/form-data body: [(name, filename, content_type, bytes)].
    By hand, on bytes, so that a file part comes back exactly as it was sent."""
    match = re.search(r'boundary="?([^";]+)"?', content_type or "")
    if not (content_type or "").lower().startswith("multipart/form-data") or not match:
        raise ValueError("request Content-Type isn't multipart/form-data")
    delimiter = b"--" + match.group(1).encode("latin-1")
    sections = body.split(b"\r\n" + delimiter)
    if not sections[0].startswith(delimiter):
        raise ValueError("multipart: NextPart: EOF")
    sections[0] = sections[0][len(delimiter):]
    parts = []
    for section in sections:
        if section.startswith(b"--"):
            return parts
        head, sep, data = section.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("multipart: malformed part")
        headers = {}
        for line in head.split(b"\r\n"):
            name, colon, value = line.decode("latin-1").partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        parts.append((name.group(1) if name else "", filename.group(1) if filename else None,
                      headers.get("content-type"), data))
    raise ValueError("multipart: NextPart: EOF")


def anthropic_error(status, message):
    """anthropic.NewError: Anthropic's error body with the type Ollama picks for the status."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error",
            529: "overloaded_error"}.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": new_id("req")}


def new_id(prefix):
    """anthropic.generateID: prefix, '_', 24 hex digits."""
    return "%s_%s" % (prefix, os.urandom(12).hex())


def messages_problem(request):
    """What AnthropicMessagesMiddleware refuses with a 400, in its words, or None."""
    if not isinstance(request.get("model"), str) or not request["model"]:
        return "model is required"
    max_tokens = request.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        return "max_tokens is required and must be positive"
    if not isinstance(request.get("messages"), list) or not request["messages"]:
        return "messages is required"
    return None


def estimated_input_tokens(request):
    """anthropic.EstimateInputTokens: characters of system, roles, texts and
    tools over 4, at least 1; what Ollama puts in message_start."""
    def text_length(content):
        if isinstance(content, str):
            return len(content)
        total = 0
        for block in content if isinstance(content, list) else []:
            if isinstance(block, dict):
                total += len(block.get("text") or "") + len(block.get("thinking") or "")
                if block.get("type") in ("tool_use", "tool_result"):
                    total += len(json.dumps(block, separators=(",", ":")))
        return total
    total = text_length(request.get("system"))
    for message in request.get("messages") or []:
        if isinstance(message, dict):
            total += len(str(message.get("role", ""))) + text_length(message.get("content"))
    for tool in request.get("tools") or []:
        if isinstance(tool, dict):
            total += len(tool.get("name") or "") + len(tool.get("description") or "")
            total += len(json.dumps(tool["input_schema"], separators=(",", ":"))) if "input_schema" in tool else 0
    tokens = total // 4
    return 1 if tokens == 0 and (request.get("messages") or request.get("system") is not None) else tokens


def _knobs(defaults, header):
    knobs = dict(defaults)
    for part in (header or "").split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            knobs[key.strip()] = value.strip()
    return knobs


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stub-ollama/1.0"
    # Headers and body go out in separate writes: without TCP_NODELAY the
    # second waits for the client's delayed ACK (40 ms) and the stub, not the
    # gateway, would be what the benchmark measures.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    # -- plumbing

    def _read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunked(self):
        body = []
        while True:
            size = int(self.rfile.readline(65537).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            body.append(self.rfile.read(size))
            self.rfile.readline(3)
        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields
        return b"".join(body)

    def _client_gone(self):
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            if not ready:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _sleep_watching(self, seconds):
        """Stay silent for ``seconds``; False (and the hang-up time recorded)
        if the client closed the connection meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._client_gone():
                self._hung_up()
                return False
            time.sleep(min(0.005, max(0, deadline - time.monotonic())))
        return True

    def _hung_up(self):
        if self.record.hangup_at is None:
            self.record.hangup_at = time.monotonic()
        self.close_connection = True

    def _reset(self):
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _send(self, status, content_type, body, extra=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status, document, extra=()):
        self._send(status, "application/json; charset=utf-8", json.dumps(document).encode(), extra)

    def _write_chunk(self, data):
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            return True
        except OSError:
            self._hung_up()
            return False

    # -- dispatch

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_HEAD(self):
        self._handle("HEAD")

    def _handle(self, method):
        path, _, query = self.path.partition("?")
        body = self._read_body()
        if path == "/_stub/received":
            return self._report(query)
        self.record = Record(method, path, query, {k.lower(): v for k, v in self.headers.items()}, body,
                             self.headers.items(), "chunked" in (self.headers.get("Transfer-Encoding") or "").lower())
        server = self.server
        with server.lock:
            # The gateway's own looks (at the model list: edgegate_usage.KnownModels, once a minute per
            # worker; at whether a model is remote: edgegate_remote.py) come at any time: kept apart, so
            # that a test counting what its request sent is not disturbed by them.
            agent = self.headers.get("User-Agent")
            if agent == "edgegate-models":
                kept = server.polls
            elif path == "/api/show" and agent == "edgegate-remote-check":
                kept = server.model_checks
            else:
                kept = server.received
            if len(kept) >= server.keep_records:
                del kept[: server.keep_records // 2]
            kept.append(self.record)
            knobs = _knobs(server.defaults, self.headers.get("X-Stub"))
        try:
            self._answer(method, path, body, knobs)
        except OSError:
            self._hung_up()
        finally:
            self.record.finished_at = time.monotonic()

    def _report(self, query):
        """For a stub in another process (the benchmark): what it received,
        with times on this machine's monotonic clock."""
        wanted = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("path")
        with self.server.lock:
            records = [r for r in self.server.received if wanted in (None, r.path)]
            if "clear=1" in query:
                self.server.received = []
        self._send_json(200, [{"path": r.path, "arrived_at": r.arrived_at, "hangup_at": r.hangup_at,
                               "finished_at": r.finished_at, "pieces_sent": r.pieces_sent} for r in records])

    def _answer(self, method, path, body, knobs):
        if knobs.get("never"):
            self._sleep_watching(3600)
            return
        if knobs.get("reset_after") == "0":
            self._reset()
            return
        if not self._sleep_watching(float(knobs.get("delay", 0))):
            return
        if path == "/v1/audio/transcriptions" or path.startswith("/api/blobs/"):
            request = {}  # a multipart form, a blob: not JSON; the route reads the body itself
        else:
            if path in ZSTD_ROUTES and zstandard is not None and \
                    (self.headers.get("Content-Encoding") or "").strip().lower() == "zstd":
                try:
                    body = _decode_body(body, "zstd")
                except Exception:
                    return self._error(path, 400, "failed to decompress request body")
            try:
                request = json.loads(body) if body else {}
            except ValueError:
                request = None
            if not isinstance(request, dict):
                if path == "/v1/messages":
                    return self._error(path, 400, "invalid character in JSON body")
                return self._send_json(400, {"error": "invalid JSON body"})
        if knobs.get("garbage"):
            self.wfile.write(b"NOT HTTP AT ALL\r\n\r\n")
            self.close_connection = True
            return
        if knobs.get("html500"):
            return self._send(500, "text/html", b"<html><body><h1>500 Internal Server Error</h1></body></html>")
        if knobs.get("malformed"):
            return self._send(200, "application/json", b'{"model": "llama3.2", "message": {"content": "trunc')
        if knobs.get("short_body"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "200")
            self.end_headers()
            self.wfile.write(b'{"model": "llama3.2", "done"')  # 19 of the 200 bytes
            self.wfile.flush()
            self.close_connection = True
            return
        if "status" in knobs:
            return self._error(path, int(knobs["status"]), "stub error %s" % knobs["status"])
        if request.get("model") == "missing":
            return self._error(path, 404, "model 'missing' not found")
        route = ROUTES.get((method, path))
        if route is None and len(path) > 1 and path.endswith("/") and (method, path[:-1]) in ROUTES:
            # gin's RedirectTrailingSlash (gin.go redirectRequest): 301 for GET, else 307; no body
            self.send_response(301 if method == "GET" else 307)
            self.send_header("Location", path[:-1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route is None:
            route = next((r for (m, prefix), r in PREFIX_ROUTES.items()
                          if m == method and path.startswith(prefix) and len(path) > len(prefix)), None)
        if route is None:
            return self._error(path, 404, "404 page not found")
        if method == "POST" and path in INFERENCE and path != "/v1/audio/transcriptions":
            return self._inference(path, request, knobs, route)
        route(self, request, knobs)

    def _inference(self, path, request, knobs, route):
        """Load the request's model for its lifetime, or unload it, the way
        Ollama's handlers and scheduler do, around the route's answer."""
        keep_alive = None
        if INFERENCE[path] and request.get("keep_alive") is not None:
            try:
                keep_alive = keep_alive_seconds(request["keep_alive"])
            except ValueError as error:
                return self._error(path, 400, str(error))
        model = request.get("model")
        if keep_alive == 0 and path == "/api/generate" and not request.get("prompt"):
            # GenerateHandler: empty prompt and keep_alive 0 -> expireRunner, no load
            self.server.unload(model)
            return self._send_json(200, {"model": model, "created_at": CREATED_AT, "response": "",
                                         "done": True, "done_reason": "unload"})
        if keep_alive == 0 and path == "/api/chat" and not request.get("messages"):
            self.server.unload(model)
            return self._send_json(200, {"model": model, "created_at": CREATED_AT,
                                         "message": {"role": "assistant", "content": ""},
                                         "done": True, "done_reason": "unload"})
        if path == "/v1/messages":
            problem = messages_problem(request)
            if problem:  # AnthropicMessagesMiddleware refuses it before anything loads
                return self._error(path, 400, problem)
        self.server.load(model, keep_alive)
        try:
            route(self, request, knobs)
        finally:
            if keep_alive == 0:  # a zero lifetime: unloaded as soon as the runner is idle
                self.server.unload(model)

    def _error(self, path, status, message):
        if path == "/v1/messages":
            self._send_json(status, anthropic_error(status, message))
        elif path.startswith("/v1/"):
            self._send_json(status, {"error": {"message": message, "type": "api_error", "param": None,
                                               "code": None}})
        else:
            self._send_json(status, {"error": message})

    # -- streaming

    def _stream(self, content_type, pieces, knobs):
        """Send ``pieces`` (bytes, one per chunk) as a chunked response,
        with the knobs for stalls, delays, resets and truncation."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        if not self._sleep_watching(float(knobs.get("stall", 0))):
            return
        chunk_delay = float(knobs.get("chunk_delay", 0))
        reset_after = int(knobs.get("reset_after", -1))
        truncate_after = int(knobs.get("truncate_after", -1))
        for n, piece in enumerate(pieces):
            if n == reset_after:
                return self._reset()
            if n == truncate_after:
                self.close_connection = True
                return
            if n and chunk_delay and not self._sleep_watching(chunk_delay):
                return
            if not self._write_chunk(piece):
                return
            self.record.sent_at.append(time.monotonic())
            self.record.pieces_sent += 1
        if not self._sleep_watching(float(knobs.get("linger", 0))):
            return
        self._write_chunk(b"")

    def _words(self, knobs):
        n = int(knobs.get("chunks", 3))
        size = int(knobs.get("chunk_bytes", 0))
        if "word" in knobs:
            return [knobs["word"]] * n
        if size:
            return ["x" * size] * n
        return [WORDS[i % len(WORDS)] for i in range(n)]

    # -- Ollama native API

    def api_version(self, request, knobs):
        self._send_json(200, {"version": "0.12.0"})

    def api_tags(self, request, knobs):
        self._send_json(200, {"models": [{"name": m, "model": m, "size": 1000, "digest": "0" * 64,
                                          "modified_at": "2026-01-01T00:00:00Z",
                                          "details": {"format": "gguf", "family": "llama"}} for m in MODELS]})

    def api_ps(self, request, knobs):
        models = []
        for name in self.server.loaded_models():
            entry = self.server.loaded.get(name, {"expires_at": time.time()})
            family = "nomic-bert" if "embed" in name else "llama"
            models.append({"name": name, "model": name, "size": 1000, "digest": "0" * 64,
                           "details": {"parent_model": "", "format": "gguf", "family": family,
                                       "families": [family], "parameter_size": "3.2B",
                                       "quantization_level": "Q4_K_M"},
                           "expires_at": _go_time(entry["expires_at"]), "size_vram": 1000,
                           "context_length": 4096})
        self._send_json(200, {"models": models})

    def root(self, request, knobs):
        self._send(200, "text/plain; charset=utf-8", b"Ollama is running")

    def api_show(self, request, knobs):
        """Ollama's ShowHandler: ``model``, else ``name``; a remote model's
        config gives ``remote_host``/``remote_model`` at the top."""
        name = request.get("model") or request.get("name") or ""
        remote = self.server.remote.get(name) or self.server.remote.get(model_name(name) or "")
        if remote:
            return self._send_json(200, {"modelfile": "", "details": {"format": "", "family": "gptoss"},
                                         "model_info": {"general.architecture": "gptoss"},
                                         "capabilities": ["completion", "tools"],
                                         "remote_host": remote[0], "remote_model": remote[1]})
        self._send_json(200, {"modelfile": "FROM llama3.2", "parameters": "", "template": "{{ .Prompt }}",
                              "details": {"format": "gguf", "family": "llama", "parameter_size": "3B"},
                              "model_info": {"general.architecture": "llama"}, "capabilities": ["completion"]})

    def _native(self, request, knobs, piece_of):
        model = request.get("model", "")
        words = self._words(knobs)
        final = {"model": model, "created_at": "2026-01-01T00:00:00Z", "done": True, "done_reason": "stop",
                 "total_duration": 1000, "load_duration": 10, "prompt_eval_count": 7, "prompt_eval_duration": 10,
                 "eval_count": len(words), "eval_duration": 100}
        if request.get("stream", True) is False:
            document = dict(piece_of("".join(words)), **final)
            if knobs.get("gzip"):
                body = gzip.compress(json.dumps(document).encode())
                return self._send(200, "application/json", body, [("Content-Encoding", "gzip")])
            return self._send_json(200, document)
        lines = [json.dumps(dict(piece_of(w), model=model, created_at=final["created_at"], done=False)).encode()
                 + b"\n" for w in words]
        lines.append(json.dumps(dict(piece_of(""), **final)).encode() + b"\n")
        self._stream("application/x-ndjson", lines, knobs)

    def api_generate(self, request, knobs):
        if not request.get("prompt") and not request.get("images"):
            # A load call: Ollama loads the model and answers at once.
            return self._send_json(200, {"model": request.get("model"), "created_at": "2026-01-01T00:00:00Z",
                                         "response": "", "done": True, "done_reason": "load"})
        self._native(request, knobs, lambda text: {"response": text})

    def api_chat(self, request, knobs):
        if not request.get("messages"):
            # ChatHandler: no messages loads the model and answers at once.
            return self._send_json(200, {"model": request.get("model"), "created_at": CREATED_AT,
                                         "message": {"role": "assistant", "content": ""},
                                         "done": True, "done_reason": "load"})
        self._native(request, knobs, lambda text: {"message": {"role": "assistant", "content": text}})

    def api_embed(self, request, knobs):
        inputs = request.get("input")
        inputs = [] if inputs is None else [inputs] if isinstance(inputs, str) else inputs
        self._send_json(200, {"model": request.get("model"), "embeddings": [[0.1, 0.2, 0.3] for _ in inputs],
                              "total_duration": 100, "load_duration": 10, "prompt_eval_count": 2 * len(inputs)})

    def api_embeddings(self, request, knobs):
        self._send_json(200, {"embedding": [0.1, 0.2, 0.3]})

    # -- OpenAI-compatible API

    def v1_models(self, request, knobs):
        self._send_json(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 1700000000,
                                                           "owned_by": "library"} for m in MODELS]})

    def _openai(self, request, knobs, kind):
        model = request.get("model", "")
        words = self._words(knobs)
        usage = {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}
        base = {"id": "chatcmpl-1", "created": 1700000000, "model": model, "system_fingerprint": "fp_ollama"}
        if kind == "chat":
            whole = {"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop"}
            delta = lambda w: {"index": 0, "delta": {"role": "assistant", "content": w}, "finish_reason": None}
            last = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": "stop"}
            obj = "chat.completion"
        else:
            whole = {"index": 0, "text": "".join(words), "finish_reason": "stop"}
            delta = lambda w: {"index": 0, "text": w, "finish_reason": None}
            last = {"index": 0, "text": "", "finish_reason": "stop"}
            obj = "text_completion"
        tool = knobs.get("tool_call") if kind == "chat" else None
        if tool:
            whole = {"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": tool, "arguments": '{"city": "Paris"}'}}]}}
        if not request.get("stream"):
            return self._send_json(200, dict(base, object=obj, choices=[whole], usage=usage))
        chunk_obj = obj + ".chunk" if kind == "chat" else obj
        if tool:
            fragments = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": tool, "arguments": ""}},
                         {"index": 0, "function": {"arguments": '{"city": '}},
                         {"index": 0, "function": {"arguments": '"Paris"}'}}]
            events = [dict(base, object=chunk_obj, choices=[{"index": 0, "delta": {"tool_calls": [f]},
                                                             "finish_reason": None}]) for f in fragments]
            last = {"index": 0, "delta": {}, "finish_reason": "tool_calls"}
        else:
            events = [dict(base, object=chunk_obj, choices=[delta(w)]) for w in words]
        events.append(dict(base, object=chunk_obj, choices=[last]))
        if (request.get("stream_options") or {}).get("include_usage"):
            events.append(dict(base, object=chunk_obj, choices=[], usage=usage))
        pieces = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
        if "sse_error_after" in knobs:
            n = int(knobs["sse_error_after"])
            pieces = pieces[:n] + [b'data: {"error": {"message": "cloud overloaded", "type": "server_error"}}\n\n']
        self._stream("text/event-stream", pieces, knobs)

    def v1_chat(self, request, knobs):
        self._openai(request, knobs, "chat")

    def v1_completions(self, request, knobs):
        self._openai(request, knobs, "completion")

    def v1_embeddings(self, request, knobs):
        inputs = request.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs or []
        self._send_json(200, {"object": "list", "model": request.get("model"),
                              "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                                       for i in range(len(inputs))],
                              "usage": {"prompt_tokens": 2 * len(inputs), "total_tokens": 2 * len(inputs)}})

    def v1_responses(self, request, knobs):
        words = self._words(knobs)
        self._send_json(200, {"id": "resp_1", "object": "response", "model": request.get("model"),
                              "status": "completed",
                              "output": [{"type": "message", "role": "assistant",
                                          "content": [{"type": "output_text", "text": "".join(words)}]}],
                              "usage": {"input_tokens": 7, "output_tokens": len(words), "total_tokens": 7 + len(words)}})

    def v1_transcriptions(self, request, knobs):
        """middleware.TranscriptionMiddleware: a multipart form in, {"text"} out;
        here the text is the stub's words and "received" says what arrived."""
        try:
            parts = parse_multipart(self.headers.get("Content-Type"), self.record.body)
        except ValueError as error:
            return self._error(self.record.path, 400, "failed to parse multipart form: %s" % error)
        self.record.form = {name: data if filename is not None else data.decode("utf-8", "replace")
                            for name, filename, _, data in parts}
        fields = {name: data.decode("utf-8", "replace") for name, filename, _, data in parts if filename is None}
        files = [(filename, ctype, data) for name, filename, ctype, data in parts if name == "file" and filename is not None]
        model = fields.get("model", "")
        if not model:
            return self._error(self.record.path, 400, "model is required")
        if not files:
            return self._error(self.record.path, 400, "file is required: http: no such file")
        filename, content_type, audio = files[0]
        if not audio:
            return self._error(self.record.path, 400, "audio file is empty")
        if model == "missing":
            return self._error(self.record.path, 404, "model 'missing' not found")
        self.server.load(model)  # on to ChatHandler, without a keep_alive
        text = "".join(self._words(knobs)).strip()
        if fields.get("response_format") == "text":
            return self._send(200, "text/plain", text.encode())
        self._send_json(200, {"text": text, "received": {
            "model": model, "filename": filename, "content_type": content_type, "bytes": len(audio),
            "sha256": hashlib.sha256(audio).hexdigest(), "fields": fields}})

    # -- Anthropic Messages API (anthropic/anthropic.go, middleware/anthropic.go)

    def v1_messages(self, request, knobs):
        model = request["model"]
        words = self._words(knobs)
        tool = knobs.get("tool_call")
        message_id = new_id("msg")
        usage = {"input_tokens": 7, "output_tokens": len(words)}
        stop_reason = "tool_use" if tool else "end_turn"
        if not request.get("stream"):
            if tool:
                content = [{"type": "tool_use", "id": "call_1", "name": tool, "input": {"city": "Paris"}}]
            else:
                content = [{"type": "text", "text": "".join(words)}]
            return self._send_json(200, {"id": message_id, "type": "message", "role": "assistant", "model": model,
                                         "content": content, "stop_reason": stop_reason, "usage": usage})
        # StreamConverter.Process: message_start carries the estimate (the first
        # chunk has no prompt_eval_count yet); message_delta the real counts.
        events = [("message_start", {"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "usage": {"input_tokens": estimated_input_tokens(request), "output_tokens": 0}}})]
        if tool:
            events += [
                ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                    "type": "tool_use", "id": "call_1", "name": tool, "input": {}}}),
                ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                    "type": "input_json_delta", "partial_json": '{"city":"Paris"}'}})]
        else:
            events.append(("content_block_start", {"type": "content_block_start", "index": 0,
                                                   "content_block": {"type": "text", "text": ""}}))
            events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": w}}) for w in words]
        events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason},
                                      "usage": usage}),
                   ("message_stop", {"type": "message_stop"})]
        pieces = [b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(data).encode()) for name, data in events]
        if "sse_error_after" in knobs:
            n = int(knobs["sse_error_after"])
            error = {"type": "error", "error": {"type": "overloaded_error", "message": "cloud overloaded"}}
            pieces = pieces[:n] + [b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"]
        self._stream("text/event-stream", pieces, knobs)

    # -- account and web routes (they reach ollama.com in Ollama)

    def api_me(self, request, knobs):
        self._send_json(200, {"id": "5b1f7e0c-4c2a-4d5e-9f0a-0123456789ab", "email": "stub@example.com",
                              "name": "stub", "plan": "free"})

    def api_signout(self, request, knobs):
        self._send_json(200, None)

    def api_web_search(self, request, knobs):
        if not self.record.body.strip():
            return self._error(self.record.path, 400, "missing request body")
        self._send_json(200, {"results": [{"title": "Stub result", "url": "https://example.com/",
                                           "content": "Result for %s" % request.get("query")}]})

    def api_web_fetch(self, request, knobs):
        if not self.record.body.strip():
            return self._error(self.record.path, 400, "missing request body")
        self._send_json(200, {"title": "Stub page", "content": "Page at %s" % request.get("url"),
                              "links": ["https://example.com/"]})


ROUTES = {
    ("GET", "/"): Handler.root,
    ("HEAD", "/"): Handler.root,
    ("GET", "/api/version"): Handler.api_version,
    ("HEAD", "/api/version"): Handler.api_version,
    ("GET", "/api/tags"): Handler.api_tags,
    ("HEAD", "/api/tags"): Handler.api_tags,
    ("GET", "/api/ps"): Handler.api_ps,
    ("POST", "/api/show"): Handler.api_show,
    ("POST", "/api/generate"): Handler.api_generate,
    ("POST", "/api/chat"): Handler.api_chat,
    ("POST", "/api/embed"): Handler.api_embed,
    ("POST", "/api/embeddings"): Handler.api_embeddings,
    ("GET", "/v1/models"): Handler.v1_models,
    ("POST", "/v1/chat/completions"): Handler.v1_chat,
    ("POST", "/v1/completions"): Handler.v1_completions,
    ("POST", "/v1/embeddings"): Handler.v1_embeddings,
    ("POST", "/v1/responses"): Handler.v1_responses,
    ("POST", "/v1/audio/transcriptions"): Handler.v1_transcriptions,
    ("POST", "/v1/messages"): Handler.v1_messages,
    ("GET", "/api/status"): lambda h, r, k: h._send_json(200, {"cloud": {"disabled": False, "source": "none"}}),
    ("POST", "/api/me"): Handler.api_me,
    ("POST", "/api/signout"): Handler.api_signout,
    ("POST", "/api/experimental/web_search"): Handler.api_web_search,
    ("POST", "/api/experimental/web_fetch"): Handler.api_web_fetch,
    ("GET", "/api/experimental/model-recommendations"): lambda h, r, k: h._send_json(200, {"recommendations": [
        {"model": "llama3.2", "description": "A small model for the stub"}]}),
    ("POST", "/api/pull"): lambda h, r, k: h._send_json(200, {"status": "success"}),
    ("POST", "/api/push"): lambda h, r, k: h._send_json(200, {"status": "success"}),
    ("POST", "/api/create"): lambda h, r, k: h._send_json(200, {"status": "success"}),
    ("POST", "/api/copy"): lambda h, r, k: h._send(200, "text/plain; charset=utf-8", b""),
    ("DELETE", "/api/delete"): lambda h, r, k: h._send_json(200, {}),
}

# Routes with a path parameter (gin's /api/user/keys/:encodedKey, /api/blobs/:digest).
PREFIX_ROUTES = {
    ("GET", "/v1/models/"): lambda h, r, k: h._send_json(200, {
        "id": h.record.path[len("/v1/models/"):], "object": "model", "created": 0, "owned_by": "library"}),
    ("DELETE", "/api/user/keys/"): Handler.api_signout,
    ("POST", "/api/blobs/"): lambda h, r, k: h._send(201, "text/plain; charset=utf-8", b""),
    ("HEAD", "/api/blobs/"): lambda h, r, k: h._send(200, "text/plain; charset=utf-8", b""),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = StubServer(args.port)
    print(server.url, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
