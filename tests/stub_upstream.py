"""A stand-in for Ollama: a real HTTP server on 127.0.0.1 that speaks Ollama's
native API and its OpenAI-compatible API, and can be told how to misbehave.

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
    linger=S          wait S seconds after the last piece before ending the chunked body
                      (as llama.cpp's server does after data: [DONE])
    status=C          answer with status C and an error body in the route's shape
    reset_after=N     reset the connection (RST) after N pieces; 0 = before headers
    truncate_after=N  close after N pieces without ending the chunked body
    malformed=1       a 200 whose JSON body is broken
    html500=1         a 500 with an HTML page
    garbage=1         an answer that is not HTTP
    never=1           accept and never answer
    gzip=1            a gzip-encoded JSON body

Every request is recorded (``received``): method, path, query, headers, body,
when it arrived, and when the client hung up (``hangup_at``), which is how the
tests measure that the gateway closes the upstream connection.

Run alone for the benchmark: ``python tests/stub_upstream.py --port 8000``.
"""

import argparse
import gzip
import json
import select
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODELS = ["llama3.2:latest", "nomic-embed-text:latest"]
WORDS = ["Hello", " from", " the", " stub", " upstream", "."]


class Record:
    """One request as the stub received it."""

    def __init__(self, method, path, query, headers, body):
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.arrived_at = time.monotonic()
        self.hangup_at = None
        self.finished_at = None
        self.pieces_sent = 0
        self.sent_at = []  # time.monotonic() after each streamed piece was written

    def json(self):
        return json.loads(self.body)


class StubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, port=0):
        super().__init__(("127.0.0.1", port), Handler)
        self.defaults = {}
        self.received = []
        self.keep_records = 100000
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
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

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
        self.record = Record(method, path, query, {k.lower(): v for k, v in self.headers.items()}, body)
        server = self.server
        with server.lock:
            if len(server.received) >= server.keep_records:
                del server.received[: server.keep_records // 2]
            server.received.append(self.record)
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
        try:
            request = json.loads(body) if body else {}
        except ValueError:
            request = None
        if not isinstance(request, dict):
            return self._send_json(400, {"error": "invalid JSON body"})
        if knobs.get("garbage"):
            self.wfile.write(b"NOT HTTP AT ALL\r\n\r\n")
            self.close_connection = True
            return
        if knobs.get("html500"):
            return self._send(500, "text/html", b"<html><body><h1>500 Internal Server Error</h1></body></html>")
        if knobs.get("malformed"):
            return self._send(200, "application/json", b'{"model": "llama3.2", "message": {"content": "trunc')
        if "status" in knobs:
            return self._error(path, int(knobs["status"]), "stub error %s" % knobs["status"])
        if request.get("model") == "missing":
            return self._error(path, 404, "model 'missing' not found")
        route = ROUTES.get((method, path))
        if route is None:
            return self._error(path, 404, "404 page not found")
        route(self, request, knobs)

    def _error(self, path, status, message):
        if path.startswith("/v1/"):
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
        self._send_json(200, {"models": [{"name": MODELS[0], "model": MODELS[0], "size": 1000,
                                          "digest": "0" * 64, "expires_at": "2026-01-01T00:00:00Z",
                                          "size_vram": 1000, "details": {"format": "gguf"}}]})

    def api_show(self, request, knobs):
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


ROUTES = {
    ("GET", "/api/version"): Handler.api_version,
    ("GET", "/api/tags"): Handler.api_tags,
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
    ("POST", "/api/pull"): lambda h, r, k: h._send_json(200, {"status": "success"}),
    ("DELETE", "/api/delete"): lambda h, r, k: h._send_json(200, {}),
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
