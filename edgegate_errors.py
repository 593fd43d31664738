"""edgegate's answers when something goes wrong, and its access log.

One exception type, ``GatewayError`` (status, code, message, provider), is
raised by whatever step refuses or fails; ``error_document`` turns it into
the one error body, in the shape the route's clients read (README,
"Errors"); ``status_line`` gives every status its real reason phrase. The
app (gateway.py) and the worker (edgegate_worker.py) both answer with these,
and both write their access lines with ``access_line``. Nothing here reads
the configuration.
"""

import http
import os
import time


class GatewayError(Exception):
    """Something the gateway refuses or fails at. Raised by any step, it ends
    the exchange (``Exchange.fail``) as one error answer in the shape the
    route's clients read (``error_document``) and, for a task, as FAILED with
    ``stage``."""

    def __init__(self, status, code, message, provider="gateway", headers=(), stage="bad_request"):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.provider = provider
        self.headers = list(headers)
        self.stage = stage


def error_document(path, error, task_id):
    """The one error body of the gateway, in the shape the route's clients
    read (README, "Errors"). Ollama's clients read ``{"error": "<text>"}``,
    so on /api/* and / the gateway's fields sit beside the text; everywhere
    else it is OpenAI's envelope plus ``provider`` and ``task_id``."""
    if path == "/" or path.startswith("/api/"):
        return {"error": error.message, "code": error.code, "provider": error.provider, "task_id": task_id}
    if path == "/v1/messages" or path.startswith("/v1/messages/"):  # the anthropic SDK reads error.type, .message
        return {"type": "error", "error": {"type": anthropic_error_type(error), "message": error.message,
                                           "code": error.code, "provider": error.provider, "task_id": task_id}}
    return {"error": {"message": error.message, "type": error.code, "code": error.code, "param": None,
                      "provider": error.provider, "task_id": task_id}}


def anthropic_error_type(error):
    """Anthropic's error type for a gateway error (its API's error types)."""
    by_code = {"gpu_busy": "overloaded_error", "body_too_large": "request_too_large",
               "upstream_unreachable": "api_error", "upstream_error": "api_error", "upstream_timeout": "api_error"}
    by_status = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 413: "request_too_large", 429: "rate_limit_error", 501: "invalid_request_error",
                 503: "overloaded_error"}
    other = "invalid_request_error" if 400 <= error.status < 500 else "api_error"  # 400, 405, 408, 414, 431...
    return by_code.get(error.code) or by_status.get(error.status, other)


def status_line(status_code, reason=None):
    """``"404 Not Found"``: the reason phrase is the standard library's
    (``http.HTTPStatus``), or ``reason`` when an upstream gave its own."""
    if not reason:
        try:
            reason = http.HTTPStatus(status_code).phrase
        except ValueError:  # a code without a registered phrase (an upstream's 599, say)
            reason = "Unknown"
    return "%d %s" % (status_code, reason)


def short_message(error):
    """An exception's message, cut to 200 characters, for an error answer."""
    text = str(error)
    return text if len(text) < 200 else text[:200] + "..."


# ---------------------------------------------------------------- the access log


class AccessLog:
    """The access log: one line per request, on the stream gunicorn.conf.py
    names (``to``: stdout), and nowhere before that. Each line is one
    ``write(2)`` of its own instead of a ``logging`` record, whose making
    (caller lookup, thread and process names, the handler's lock) cost more
    than the rest of a request's ending; a line shorter than PIPE_BUF never
    interleaves with another worker's. A failed write (stdout closed, disk
    full) loses the line, never the request."""

    def __init__(self):
        self.fd = None

    def to(self, stream):
        self.fd = stream.fileno()

    def write(self, line):
        if self.fd is not None:
            try:
                os.write(self.fd, line.encode("ascii", "backslashreplace") + b"\n")
            except OSError:
                pass


access_log = AccessLog()


def access_line(remote_addr, method, path, status_code, started, task_id=None, model=None, slot_wait_ms=None,
                ttfb_ms=None, bytes_out=0, key_name=None, where=""):
    """One line, never a prompt, a completion, a key or a query string;
    every value from the request escaped, so that it stays one line. The
    worker's own refusals (``edgegate_worker.py``) are written with it too."""
    return '%s "%s %s" %s task=%s model=%s slot_wait_ms=%s ttfb_ms=%s duration_ms=%d bytes=%d key=%s%s' % (
        remote_addr or "-", printable(method), printable(path), status_code or "-", task_id or "-",
        printable(model) if model else "-", slot_wait_ms or "-", ttfb_ms or "-",
        (time.monotonic() - started) * 1000, bytes_out, key_name or "-", where)


def printable(text):
    """``text`` for a log line: control and non-ASCII characters escaped, at most 200 characters."""
    text = text if isinstance(text, str) else repr(text)
    return text.encode("ascii", "backslashreplace").decode().translate(_CONTROL_ESCAPES)[:200]


_CONTROL_ESCAPES = {c: "\\x%02x" % c for c in list(range(32)) + [127]}
