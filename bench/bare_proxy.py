"""The floor for a gunicorn gateway that forwards: a WSGI app (no framework)
that relays each request to the upstream and its answer back, nothing more.

    UPSTREAM_BASE=http://127.0.0.1:11434 \\
        gunicorn -c gunicorn.conf.py --pythonpath bench bare_proxy:app
    BARE_CLIENT=http.client UPSTREAM_BASE=... gunicorn ... bare_proxy:app

Run with edgegate's own ``gunicorn.conf.py`` (gthread, the same workers,
threads and keep-alive), it measures what a gateway costs that only forwards
with a Python HTTP client, before it checks, logs or counts anything: the
empty app (bench/empty_app.py) plus one upstream call. ``BARE_CLIENT`` picks
the client:

- ``requests`` (the default): one ``requests.Session`` per thread
  (``trust_env = False``, so no proxy or netrc lookups), ``stream=True``, the
  answer read from ``response.raw`` (urllib3). That is requests used the
  usual way; edgegate reads ``raw`` the same way but calls requests'
  ``HTTPAdapter`` itself, without a Session (edgegate_upstream.py, ``Upstream``).
- ``http.client``: one ``http.client.HTTPConnection`` per thread, kept alive,
  reconnected once when the upstream has closed a kept-alive connection.

What goes up: the method, the path (PATH_INFO and the query string), the body,
Content-Type, and ``X-Stub`` (the stub upstream's knobs: chunk count, pace;
tests/stub_upstream.py). What comes back: the upstream's status and reason,
Content-Type (and Content-Encoding, if any), and the body. An answer with a
Content-Length is read whole and returned with its length; one without
(chunked: an SSE or NDJSON stream) is relayed as it arrives, one WSGI item per
``read1(65536)``, so gunicorn sends it chunked. ``GET /healthz`` is answered
here (the bench waits for it). An upstream that cannot be reached is a 502.
"""

import http.client
import os
import threading
from urllib.parse import quote, urlsplit

UPSTREAM = os.environ.get("UPSTREAM_BASE", "http://127.0.0.1:11434").rstrip("/")
CLIENT = os.environ.get("BARE_CLIENT", "requests")
TIMEOUT = 300  # seconds of upstream silence before giving up (a stub stall, a slow model)
PIECE = 65536
# Characters of a path that are sent as they are; everything else is %-encoded again (PATH_INFO is decoded).
PATH_SAFE = "/:@!$&'()*+,;=-._~"

_local = threading.local()


# ---------------------------------------------------------------- requests


def _session():
    session = getattr(_local, "session", None)
    if session is None:
        import requests
        session = _local.session = requests.Session()
        session.trust_env = False
    return session


def _send_requests(method, path, body, headers):
    """(status, reason, header getter, read whole, read1, close)."""
    response = _session().request(method, UPSTREAM + path, data=body or None, headers=headers, stream=True,
                                  allow_redirects=False, timeout=(10, TIMEOUT))
    raw = response.raw
    return response.status_code, response.reason, response.headers.get, raw.read, raw.read1, response.close


# ---------------------------------------------------------------- http.client


_parts = urlsplit(UPSTREAM)
_CONNECTION_CLASS = http.client.HTTPSConnection if _parts.scheme == "https" else http.client.HTTPConnection
_PREFIX = _parts.path  # an UPSTREAM_BASE with a path: every request goes below it


def _connection(fresh=False):
    connection = getattr(_local, "connection", None)
    if connection is None or fresh:
        if connection is not None:
            connection.close()
        connection = _local.connection = _CONNECTION_CLASS(_parts.hostname, _parts.port, timeout=TIMEOUT)
    return connection


def _send_http_client(method, path, body, headers):
    """(status, reason, header getter, read whole, read1, close)."""
    connection = _connection()
    reused = connection.sock is not None
    try:
        connection.request(method, _PREFIX + path, body or None, headers)
        response = connection.getresponse()
    except (ConnectionError, http.client.ImproperConnectionState):
        # the upstream closed the kept-alive connection (or a relay before this
        # one ended without reading its answer out): once more, on a new one
        if not reused:
            raise
        connection = _connection(fresh=True)
        connection.request(method, _PREFIX + path, body or None, headers)
        response = connection.getresponse()

    def close():
        if not response.isclosed():  # not read to the end: the connection is unusable (and the upstream hears of it)
            connection.close()

    return response.status, response.reason, response.getheader, response.read, response.read1, close


if CLIENT == "requests":
    _send = _send_requests
elif CLIENT == "http.client":
    _send = _send_http_client
else:
    raise SystemExit("bare_proxy: BARE_CLIENT must be requests or http.client, not %r" % CLIENT)


# ---------------------------------------------------------------- the app


def _relay(read1, close):
    try:
        while True:
            data = read1(PIECE)
            if not data:
                return
            yield data
    finally:
        close()


def app(environ, start_response):
    method = environ["REQUEST_METHOD"]
    path = environ.get("PATH_INFO") or "/"
    if path == "/healthz" and method in ("GET", "HEAD"):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
        return [b"ok\n"]
    path = quote(path.encode("latin-1"), safe=PATH_SAFE)
    if environ.get("QUERY_STRING"):
        path += "?" + environ["QUERY_STRING"]
    length = environ.get("CONTENT_LENGTH")
    body = environ["wsgi.input"].read(int(length)) if length else b""
    headers = {}
    if environ.get("CONTENT_TYPE"):
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    if "HTTP_X_STUB" in environ:
        headers["X-Stub"] = environ["HTTP_X_STUB"]
    try:
        status, reason, header, read, read1, close = _send(method, path, body, headers)
    except Exception as failure:  # refused, reset, timed out: what a gateway answers then
        message = ("upstream: %s\n" % type(failure).__name__).encode()
        start_response("502 Bad Gateway", [("Content-Type", "text/plain"), ("Content-Length", str(len(message)))])
        return [message]
    answer = [(name, header(name)) for name in ("Content-Type", "Content-Encoding") if header(name)]
    status_line = "%d %s" % (status, reason)
    length = header("Content-Length")
    if length is not None:
        try:
            data = read()
        finally:
            close()
        start_response(status_line, answer + [("Content-Length", length if method == "HEAD" else str(len(data)))])
        return [data]
    start_response(status_line, answer)
    return _relay(read1, close)
