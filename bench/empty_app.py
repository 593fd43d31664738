"""The floor for any gunicorn gateway: a WSGI app that does no work.

    gunicorn -c gunicorn.conf.py --pythonpath bench empty_app:app

Run with edgegate's own ``gunicorn.conf.py`` (gthread, the same workers,
threads and keep-alive), it measures what gunicorn costs before a gateway
does anything: it reads the request body and answers a small JSON document
of the size the stub upstream answers a non-streamed chat completion with.

For the streaming measures it honours the stub's ``X-Stub: chunks=N,
chunk_delay=S`` knobs (tests/stub_upstream.py) and yields N prebuilt SSE
events itself, one WSGI item each, sleeping S seconds between them: the
floor for a gateway that relays a stream chunk by chunk.
"""

import json
import time

ANSWER = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "llama3.2",
    "system_fingerprint": "fp_ollama",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}).encode()

_BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "llama3.2",
         "system_fingerprint": "fp_ollama"}
EVENT = b"data: " + json.dumps(dict(_BASE, choices=[{"index": 0, "delta": {"role": "assistant", "content": " stub"},
                                                     "finish_reason": None}])).encode() + b"\n\n"
LAST = b"data: " + json.dumps(dict(_BASE, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": "stop"}])).encode() + b"\n\n"
DONE = b"data: [DONE]\n\n"


def _knobs(header):
    knobs = {}
    for part in header.split(","):
        key, _, value = part.partition("=")
        knobs[key.strip()] = value.strip()
    return knobs


def _events(chunks, pace):
    for n in range(chunks):
        if n and pace:
            time.sleep(pace)
        yield EVENT
    if pace:
        time.sleep(pace)
    yield LAST
    yield DONE


def app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:
        environ["wsgi.input"].read(length)
    stub = environ.get("HTTP_X_STUB")
    if stub:
        knobs = _knobs(stub)
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        return _events(int(knobs.get("chunks", 3)), float(knobs.get("chunk_delay", 0)))
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(ANSWER)))])
    return [ANSWER]
