"""Relaying the answer: the upstream's bytes to the client as they arrive.

``Relay`` is the WSGI body of a proxied request; it reports to its exchange
(gateway.py) and never ends a request itself. Around it: the read-ahead
thread that lets an SSE stream send keep-alive comments while the upstream
is silent, the token counts read from the answer's last bytes, and the end
markers that say a stream was complete.
"""

import json
import queue
import re
import threading
import time

import requests

from edgegate_errors import error_document

SSE_KEEPALIVE = b": keep-alive\n\n"
NDJSON_DONE_RE = re.compile(rb'"done"\s*:\s*true')
ANTHROPIC_STOP_RE = re.compile(rb'data:\s*\{\s*"type"\s*:\s*"message_stop"\s*\}\s*$')  # /v1/messages' last event
USAGE_RE = {
    "prompt_tokens": re.compile(rb'"(?:prompt_tokens|prompt_eval_count|input_tokens)"\s*:\s*(\d+)'),
    "completion_tokens": re.compile(rb'"(?:completion_tokens|eval_count|output_tokens)"\s*:\s*(\d+)'),
}
TAIL_BYTES = 8192
# What counts as one generated piece while a stream passes (README, "Live
# page": tokens so far): an NDJSON line of Ollama's that is not the last
# (``"done":false``, server/routes.go writes one per token; the cloud route's
# translation writes ``"done": false``), an SSE ``data:`` event that is not
# ``[DONE]`` (Ollama's OpenAI layer, openai/openai.go, sends one chunk per
# token). An estimate while it runs; the exact count is read from the
# answer's usage when it ends. Counted with bytes.count, about a microsecond
# a chunk.
PIECE_MARKS = {  # format: (what counts one, what takes one back)
    "ndjson": ((b'"done":false', b'"done": false'), ()),
    "sse": ((b"\ndata:",), (b"\ndata: [DONE]", b"\ndata:[DONE]")),
}
PIECE_CARRY = 24  # the longest marker above, less one: a marker split across two chunks is counted once
CHUNK_BYTES = 65536
_END = object()


class Relay:
    """The WSGI response body of a proxied request (PEP 3333 iterable).

    It yields the upstream's bytes as they arrive (urllib3's ``read1``:
    chunk by chunk, no buffering, never decoded, so gzip stays as it came
    and ``Content-Length`` stays true). It does not end the request: it
    tells its ``exchange`` what happened (the methods below; gateway.py's
    ``RelayReport``), and the exchange decides the ending:

    - ``relay_finished(counts)``: the answer arrived whole, with these token
      counts. Said before the client can see the end of the answer -- for
      chunked bodies before the generator returns (gunicorn writes the last
      chunk after), for sized bodies before the last bytes are yielded -- so
      that a client's next request finds the slot free and the task final;
    - ``relay_failed(error)``: the upstream failed (or was cut) mid-answer;
      the exchange answers with the failure to name in the stream, and
      whether the client is still there to read it;
    - ``relay_closed(complete, counts)``: gunicorn closed the body (PEP 3333:
      also when the client went away); a stream whose own end marker had
      passed was complete all the same;
    - and, as it goes: ``first_byte_arrived()``, ``relayed(bytes so far,
      pieces so far)``,
      ``writing(since)`` (gunicorn is writing a piece to the client since
      then, None once written: the watcher drops a client that stops
      reading), ``cut_client()`` (a sized answer cut short).
    """

    def __init__(self, exchange, response, stream_format, error_shape, heartbeat_sec, translate=None):
        self.exchange = exchange
        self.upstream = response
        self.stream_format = stream_format  # "sse", "ndjson" or None
        self.error_shape = error_shape  # (path, task_id): the error event's shape (error_document)
        self.heartbeat_sec = heartbeat_sec
        self.translate = translate  # chunks -> chunks, the answer in the client's shape (cloud route)
        self.length = None if translate else _content_length(response)
        self.tail = b""  # the last bytes relayed: token counts and end markers are read from it
        self.pieces = PieceCount(stream_format)
        self.stop = threading.Event()
        self._body = self._relay()

    def __iter__(self):
        return self._handed_to_gunicorn()

    def _handed_to_gunicorn(self):
        for chunk in self._body:
            self.exchange.writing(time.monotonic())
            yield chunk
            self.exchange.writing(None)

    def close(self):
        if self.stop.is_set():
            return
        self.stop.set()
        try:
            self._body.close()
        finally:
            self.exchange.relay_closed(answer_is_complete(self.tail, self.stream_format), token_counts(self.tail))

    def _upstream_chunks(self):
        raw = self.upstream.raw
        while True:
            chunk = raw.read1(CHUNK_BYTES, decode_content=False)  # what has arrived, as it came
            if not chunk:
                return
            yield chunk

    def _chunks(self):
        """The upstream's chunks, translated, and read ahead where the relay
        must wake without them (SSE keep-alives; joining waiting chunks)."""
        chunks = self._upstream_chunks()
        if self.translate:
            chunks = self.translate(chunks)
        if self.stream_format == "sse":
            return read_ahead(chunks, self.stop, keepalive_every=self.heartbeat_sec)
        if self.stream_format == "ndjson" or self.length is None:
            return read_ahead(chunks, self.stop)
        return chunks

    def _relay(self):
        exchange, sent = self.exchange, 0
        chunks = self._chunks()
        # An empty first item makes gunicorn send the status line and headers
        # now (gunicorn/http/wsgi.py, Response.write), so the client knows its
        # request was taken while the model is still thinking.
        yield b""
        try:
            for chunk in chunks:
                if chunk is not SSE_KEEPALIVE and chunk:
                    if not sent:
                        exchange.first_byte_arrived()
                    sent += len(chunk)
                    self._passing(chunk, sent)
                    if self.length is not None and sent >= self.length:
                        exchange.relay_finished(token_counts(self.tail))
                yield chunk
            if self.length is not None and sent < self.length:
                raise requests.exceptions.ChunkedEncodingError("upstream closed after %d of %d bytes"
                                                               % (sent, self.length))
            exchange.relay_finished(token_counts(self.tail))
        except Exception as error:  # the upstream failed (or was cut) mid-answer
            if answer_is_complete(self.tail, self.stream_format):
                exchange.relay_finished(token_counts(self.tail))
                return
            failure, client_there = exchange.relay_failed(error)
            event = self._error_event(failure) if client_there else None
            if event:
                yield event
            elif self.length is not None:
                # The client was promised Content-Length bytes: end its
                # connection, so that it sees the answer cut short instead
                # of waiting for the rest on a kept-alive connection.
                exchange.cut_client()

    def _passing(self, chunk, sent):
        self.exchange.relayed(sent, self.pieces.add(chunk))
        self.tail = chunk[-TAIL_BYTES:] if len(chunk) >= TAIL_BYTES else (self.tail + chunk)[-TAIL_BYTES:]

    def _error_event(self, failure):
        """The last event of a broken stream, in the stream's own format."""
        path, task_id = self.error_shape
        if self.stream_format == "sse":
            return sse_error_event(error_document(path, failure, task_id))
        if self.stream_format == "ndjson":
            return json.dumps(error_document("/api/", failure, task_id)).encode() + b"\n"
        return None


def sse_error_event(document):
    """An error document as a stream's last SSE event."""
    event = b"event: error\n" if document.get("type") == "error" else b""  # Anthropic names its events
    return event + b"data: " + json.dumps(document).encode() + b"\n\n"


class PieceCount:
    """Generated pieces (about one a token) counted as a stream passes, from
    each chunk and the last few bytes of the one before: nothing is kept."""

    def __init__(self, stream_format):
        self.counts, self.takes_back = PIECE_MARKS.get(stream_format, ((), ()))
        self.carry = b"\n"  # an SSE stream's first line starts a line too
        self.count = 0

    def add(self, chunk):
        """The count with ``chunk``: a mark is counted in the chunk where it
        ends (found in the carry and the chunk, but not in the carry alone)."""
        if not self.counts:
            return 0
        seen, carry = self.carry + chunk, self.carry
        for mark in self.counts:
            self.count += seen.count(mark) - carry.count(mark)
        for mark in self.takes_back:
            self.count -= seen.count(mark) - carry.count(mark)
        self.carry = seen[-PIECE_CARRY:]
        return self.count


def token_counts(tail):
    """Token counts from the last bytes of a response: OpenAI ``usage`` (in the
    JSON body or the last SSE chunk) or Ollama's ``prompt_eval_count`` and
    ``eval_count`` (in the JSON body or the last NDJSON line). Only the tail
    is kept as the response passes, so a stream is never buffered."""
    counts = {}
    for name, pattern in USAGE_RE.items():
        found = pattern.findall(tail)
        if found:
            counts[name] = int(found[-1])
    return counts


class _Broken:
    """What the upstream reader hands over when the upstream failed."""

    def __init__(self, error):
        self.error = error


def read_ahead(chunks, stop, keepalive_every=None):
    """Yield ``chunks`` read by a helper thread, so that the relay can
    wake up without them: to send an SSE comment whenever the upstream is
    silent for ``keepalive_every`` seconds (idle timeouts of load balancers
    must not cut a long generation), and to join chunks that are already
    waiting into one write to the client (a fast upstream is not slowed down
    to one client write per token; a slow one is never waited for). The
    queue is small and bounded: a client that reads slowly slows the
    upstream down instead of growing a buffer here."""
    handoff = queue.Queue(maxsize=64)

    def put(item):
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read_upstream():
        try:
            for chunk in chunks:
                if not put(chunk):
                    return
            put(_END)
        except Exception as error:
            put(_Broken(error))

    threading.Thread(target=read_upstream, name="edgegate-upstream-reader", daemon=True).start()
    while True:
        try:
            item = handoff.get(timeout=keepalive_every)
        except queue.Empty:
            yield SSE_KEEPALIVE
            continue
        waiting = []
        while isinstance(item, bytes) and not handoff.empty():
            waiting.append(item)
            item = handoff.get_nowait()
        if waiting:
            if isinstance(item, bytes):
                waiting.append(item)
                item = None
            yield b"".join(waiting)
        if item is _END:
            return
        if isinstance(item, _Broken):
            raise item.error
        if item is not None:
            yield item


def answer_is_complete(tail, stream_format):
    """Whether a stream's own end marker has passed: ``data: [DONE]`` for
    SSE, a last line with ``"done": true`` for NDJSON. A client may close
    right after it (the OpenAI SDK does) before the upstream has ended its
    chunked body; its answer was complete all the same."""
    if stream_format == "sse":
        return tail.rstrip().endswith(b"data: [DONE]") or bool(ANTHROPIC_STOP_RE.search(tail))
    if stream_format == "ndjson":
        lines = tail.rstrip().rsplit(b"\n", 1)
        return bool(NDJSON_DONE_RE.search(lines[-1]))
    return False


def _content_length(response):
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def stream_format(response):
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type == "text/event-stream":
        return "sse"
    if content_type in ("application/x-ndjson", "application/ndjson"):
        return "ndjson"
    return None
