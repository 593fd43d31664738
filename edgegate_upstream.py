"""The upstream call: what goes to Ollama, on which connection, and how a failure is named.

- ``Forward``: what goes upstream and where (built by gateway.py's
  ``ollama_forward`` or edgegate_cloud.py's ``cloud_forward``); the client's
  end-to-end headers (``forwarded_headers``) and the checked path
  (``upstream_target``).
- The /v1 ``keep_alive`` load call (``give_model_its_lifetime``,
  ``ModelLifetimes``).
- ``upstream_error``: every requests/urllib3 failure mapped once to the
  one GatewayError a client can act on, in words a person reads.
- ``UpstreamCall`` and the watched connections: how the watcher cuts an
  upstream call from another thread, even before Ollama has answered.
- ``Upstream``: the transport to one server; ``Upstreams``: one per GPU.

The answer's way back to the client is edgegate_relay.py.
"""

import contextlib
import dataclasses
import http.client
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.parse

import requests
import requests.adapters
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from edgegate_body import EMBEDDING_PATHS
from edgegate_config import keep_alive_seconds
from edgegate_errors import GatewayError
from edgegate_slots import GpuChoice

log = logging.getLogger("edgegate")

# ================================================================ what goes upstream

# RFC 9110 section 7.6.1, plus Host: never forwarded in either direction.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization", "host",
})


@dataclasses.dataclass
class Forward:
    """What goes upstream and where. ``translation`` is set when the answer
    must be turned into the client's shape (the cloud route's /api/chat);
    the core relays a translated answer like any other."""

    upstream: "Upstream"
    provider: str  # who answers: "ollama" or "openai"; named in errors
    where: str  # for the task's message
    method: str
    target: str
    headers: dict
    body: bytes
    translation: object = None  # an edgegate_cloud.Translation


# CORS is the gateway's (README, "Browsers"): Ollama would answer 403 to an
# origin that CORS_ORIGINS allows but OLLAMA_ORIGINS does not.
CORS_REQUEST = frozenset({"origin", "access-control-request-method", "access-control-request-headers"})


def forwarded_headers(environ, strip_keys):
    """The client's end-to-end headers, as they came, for the upstream."""
    connection_named = {t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(",")}
    headers = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].replace("_", "-").lower()
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            name = key.replace("_", "-").lower()
        else:
            continue
        if name in HOP_BY_HOP or name in connection_named or name == "content-length" or name in CORS_REQUEST:
            continue
        if strip_keys and name in ("authorization", "x-api-key"):
            continue
        headers[name.title()] = value
    if "User-Agent" not in headers:  # else urllib3 would add its own
        headers["User-Agent"] = urllib3.util.SKIP_HEADER
    return headers


def upstream_target(environ, path):
    """Path and query for the upstream: the path the gateway checked (decoded,
    so that no other spelling of a refused route reaches Ollama), and the
    query string as it came."""
    query = environ.get("QUERY_STRING", "")
    # PEP 3333: PATH_INFO holds the path's bytes as latin-1 characters.
    return urllib.parse.quote(path.encode("latin-1", "replace"), safe="/:@!$&'()*+,;=-._~") + (
        "?" + query if query else "")


# ================================================================ the keep_alive load call


def give_model_its_lifetime(upstream, path, document, headers, keep_alive_default):
    """The /v1 keep_alive load call (see ModelLifetimes): True when one was sent.
    ``headers``: the client's end-to-end headers, as forwarded."""
    lifetimes = upstream.lifetimes
    keep_alive = document.get("keep_alive", keep_alive_default)
    model = document.get("model")
    if keep_alive in ("", None):
        return False
    if not lifetimes.needed(model, keep_alive):
        lifetimes.used(model, keep_alive)  # this request restarts the lifetime it already has
        return False
    load_path = "/api/embed" if path in EMBEDDING_PATHS else "/api/generate"
    headers = dict(headers, **{"Content-Type": "application/json"})
    try:
        body = json.dumps({"model": model, "keep_alive": keep_alive}, allow_nan=False).encode()  # JSON, never Infinity
        answer = upstream.send("POST", load_path, headers, body)
        _ = answer.content  # read it all, so that the connection goes back to the pool
    except requests.RequestException:
        return True  # the request itself will meet the same problem and report it
    if answer.status_code == 404 and not _is_ollama_error(answer):
        # Ollama's own 404 (unknown model) is {"error": "..."}; anything
        # else means the route itself is missing.
        if lifetimes.native_api_gone():
            log.warning("the upstream answered 404 to %s: it does not speak Ollama's native API; "
                        "no more keep_alive load calls are sent", load_path)
    elif answer.status_code < 400:
        lifetimes.used(model, keep_alive)
    return True


def _is_ollama_error(response):
    try:
        return isinstance(response.json().get("error"), str)
    except (ValueError, AttributeError):
        return False


class ModelLifetimes:
    """Gives a model its ``keep_alive`` before a ``/v1`` request.

    Ollama's OpenAI-compatible layer has no keep_alive field: it builds the
    native request without one (``openai/openai.go``). The scheduler only
    replaces a loaded model's lifetime when a request carries one: in
    ``server/sched.go``, ``useLoadedRunner`` does ``if pending.sessionDuration
    != nil { runner.sessionDuration = ... }``. So a native load call (model and
    keep_alive, no prompt) sets a lifetime that the following ``/v1`` request
    keeps. (If Ollama must reload the model for that request, for another
    num_ctx say, ``load`` falls back to OLLAMA_KEEP_ALIVE.)

    The call costs one upstream round trip, so it is skipped while the model
    cannot have been unloaded: this worker gave it the same lifetime, and a
    request of this worker used it less than that lifetime ago (less a
    margin). Every use counts, since each request restarts the model's
    lifetime in Ollama (``server/sched.go``: the expiry is set when the
    runner goes idle). So a model in steady use gets one load call, and one
    again only after it may have expired. An upstream that answers 404 to it does not speak Ollama's
    native API (vLLM, llama.cpp's server): it is noted once and no more load
    calls are sent.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._last = {}  # model -> (keep_alive value, seconds, monotonic time of last use)
        self.native_api_missing = False

    def needed(self, model, keep_alive):
        if self.native_api_missing or not isinstance(model, str) or not model:
            return False
        seconds = keep_alive_seconds(keep_alive)
        if seconds == 0:
            # The client asked for unloading after its request; a load call
            # sent before it cannot do that, and would only unload it early.
            return False
        with self._lock:
            last = self._last.get(model)
        if last is None or last[0] != keep_alive or seconds is None:
            return True
        return time.monotonic() - last[2] > seconds - max(1.0, seconds * 0.1)

    def native_api_gone(self):
        """Note that the upstream lacks Ollama's native API; True only the
        first time, so that it is logged once per worker."""
        with self._lock:
            first, self.native_api_missing = not self.native_api_missing, True
        return first

    def used(self, model, keep_alive):
        if isinstance(model, str):
            with self._lock:
                self._last[model] = (keep_alive, keep_alive_seconds(keep_alive), time.monotonic())


# ================================================================ naming a failure


def upstream_error(error, provider, base_url, retry_after=()):
    """Map a requests exception to the one error a client can act on, in
    words a person reads (never a library's repr of its connection pool)."""
    name = UPSTREAM_NAMES.get(provider, provider)
    if caused_by(error, CONNECT_FAILURES):
        return GatewayError(503, "upstream_unreachable", "cannot connect to %s at %s: %s"
                            % (name, base_url, _plain_reason(error)), provider=provider,
                            stage="upstream_unreachable", headers=retry_after)
    if caused_by(error, (urllib3.exceptions.ReadTimeoutError, socket.timeout)):
        return GatewayError(504, "upstream_timeout", "%s at %s did not answer in time" % (name, base_url),
                            provider=provider, stage="timeout")
    return GatewayError(502, "upstream_error", "%s at %s failed: %s" % (name, base_url, _plain_reason(error)),
                        provider=provider, stage="upstream_error")


UPSTREAM_NAMES = {"ollama": "Ollama", "openai": "OpenAI"}
# Failures before anything was sent: the request never reached the upstream.
CONNECT_FAILURES = (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError,
                    ConnectionRefusedError, socket.gaierror)


def _plain_reason(error):
    """What went wrong, said plainly: the operating system's words for the
    innermost socket error, else the innermost message."""
    innermost = error
    for link in _chain(error):
        if isinstance(link, socket.gaierror):
            return "the host name does not resolve"
        if isinstance(link, OSError) and link.strerror:
            return link.strerror[:1].lower() + link.strerror[1:]
        if isinstance(link, (http.client.RemoteDisconnected, urllib3.exceptions.ProtocolError)) or not link.args:
            innermost = link
    if isinstance(innermost, http.client.RemoteDisconnected):
        return "it closed the connection without answering"
    if caused_by(innermost, (http.client.IncompleteRead, urllib3.exceptions.IncompleteRead,
                              urllib3.exceptions.ProtocolError)):
        return "it closed the connection in the middle of its answer"
    text = str(innermost.args[0]) if innermost.args and isinstance(innermost.args[0], str) else str(innermost)
    return re.sub(r"<[^>]*object at 0x[0-9a-f]+>: ?", "", text)[:200] or type(innermost).__name__


def _chain(error):
    """Every exception in the chain requests and urllib3 wrap around a
    failure (first argument, ``reason``, ``__cause__``, ``__context__``),
    outermost first."""
    pending, seen = [error], set()
    while pending:
        error = pending.pop()
        if not isinstance(error, BaseException) or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        pending.extend(error.args[:1])
        pending.extend([getattr(error, "reason", None), error.__cause__, error.__context__])


def caused_by(error, kinds):
    """Whether ``kinds`` is anywhere in the chain around a failure."""
    return any(isinstance(link, kinds) for link in _chain(error))


# ================================================================ the connection, cut from another thread


class UpstreamCall:
    """The gateway's hold on the connection that an exchange's upstream
    request is on.

    ``requests`` gives no response object to close until the upstream has
    sent its headers, yet a client can go away while Ollama is still loading
    the model. So the connection classes below register themselves here when
    a request goes out on them, and ``abort`` can ``shutdown()`` the socket
    from the watcher thread: the blocked read in the request thread then
    fails at once, and Ollama sees the connection close and stops. An
    exchange sends one request at a time (the load call, then the request
    itself), so only the last connection is held: the load call's is back in
    the pool by then, maybe serving another exchange, and must not be cut.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._connection = None
        self._finished = False
        self.reason = None  # why it was aborted: "client_gone", "cancelled", or "ended" by the exchange's ending

    def attach(self, connection):
        with self._lock:
            if self.reason:
                raise ConnectionAbortedError("upstream call aborted (%s)" % self.reason)
            self._connection = connection

    def done(self):
        """The exchange is over: a late abort must not touch the connection,
        which is back in the pool for the next request."""
        with self._lock:
            self._finished = True
            self._connection = None

    def let_go(self, response):
        """The exchange is over. Its response, read to its end, goes back to
        the connection pool; any other is cut, which tells Ollama to stop
        generating."""
        if response is not None and (self.reason is not None or not response.raw.isclosed()):
            self.abort(self.reason or "ended")  # also wakes a read blocked in another thread
            self.done()
            response.raw.close()
        else:
            self.done()
        if response is not None:
            response.raw.release_conn()

    def abort(self, reason):
        with self._lock:
            if self.reason or self._finished:
                return
            self.reason = reason
            connection = self._connection
        sock = getattr(connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


_this_thread = threading.local()  # .call: the UpstreamCall of the exchange this thread serves


@contextlib.contextmanager
def upstream_call_of_this_thread(call):
    """While this block runs, connections that this thread sends a request
    on join ``call`` (see ``_Watched``), so that the watcher can cut them."""
    _this_thread.call = call
    try:
        yield
    finally:
        _this_thread.call = None


class _Watched:
    """Mixin for urllib3 connections: register with the thread's UpstreamCall."""

    def request(self, *args, **kwargs):
        call = getattr(_this_thread, "call", None)
        if call is not None:
            call.attach(self)
        return super().request(*args, **kwargs)

    def connect(self):
        super().connect()
        call = getattr(_this_thread, "call", None)
        if call is not None and call.reason:  # aborted while we were connecting
            self.sock.shutdown(socket.SHUT_RDWR)
            raise ConnectionAbortedError("upstream call aborted (%s)" % call.reason)


class WatchedConnection(_Watched, HTTPConnection):
    pass


class WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class WatchedPool(HTTPConnectionPool):
    ConnectionCls = WatchedConnection


class WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = WatchedHTTPSConnection


class UpstreamRequest(requests.PreparedRequest):
    """A request to one upstream, built by ``Upstream.send``: ``path_url`` is
    the target as the gateway checked it, not parsed again out of ``url``."""

    path_url = None


class WatchedAdapter(requests.adapters.HTTPAdapter):
    """requests' transport to one upstream, for one thread, with the work
    that is the same for every request done once (it was a sixth of the
    upstream call's time; README, "Benchmark"). ``HTTPAdapter.send`` calls
    these hooks, which requests exposes for subclasses (``requests/adapters.py``):

    - ``get_connection_with_tls_context``: the one connection pool of this
      upstream, looked up once (requests parses the URL, looks for proxies
      and builds the pool key on every request);
    - ``request_url``: the target as checked; no proxy is ever used;
    - ``build_response``: requests' own, less the cookie jar: a proxy keeps
      no cookies, and parsing for them cost as much as the rest of it.
    """

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": WatchedPool, "https": WatchedHTTPSPool}
        self._pool = None

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        if self._pool is None:
            self._pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
        return self._pool

    def request_url(self, request, proxies):
        return request.path_url

    def build_response(self, req, resp):
        response = requests.Response()
        response.status_code = resp.status
        response.headers = requests.structures.CaseInsensitiveDict(resp.headers)
        response.encoding = requests.utils.get_encoding_from_headers(response.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response


class Upstream:
    """The way to one upstream server: requests' ``HTTPAdapter`` (a urllib3
    pool of the watched connections above), one per thread, used directly.

    Not a ``requests.Session``: a session adds a cookie jar (a per-thread
    session would carry one client's upstream cookies into the next client's
    request), proxies from the environment (a host's HTTP_PROXY must not
    reroute traffic meant for Ollama), redirects and default headers -- none
    of which a proxy wants -- and its settings merging was a third of the
    gateway's own time per request. Retries are for failed connects only:
    a request that reached Ollama is never sent twice.
    """

    def __init__(self, base, connect_timeout_s, read_timeout_s, retries):
        self.base = base
        self.timeout = urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s)  # taken as it is by requests
        self.retries = retries
        self._local = threading.local()

    def _adapter(self):
        adapter = getattr(self._local, "adapter", None)
        if adapter is None or self._local.pid != os.getpid():  # one per thread, new after a fork
            retry = urllib3.util.Retry(total=self.retries, connect=self.retries, read=0, status=0, other=0,
                                       redirect=0, allowed_methods=None, backoff_factor=0.05,
                                       raise_on_status=False)
            adapter = self._local.adapter = WatchedAdapter(max_retries=retry, pool_connections=4, pool_maxsize=4)
            self._local.pid = os.getpid()
        return adapter

    def send(self, method, target, headers, body=None, timeout=None):
        """The upstream's response, its body not yet read. Raises
        ``requests.RequestException`` (an OSError: never let one escape
        to gunicorn, which would drop the client without an answer)."""
        request = UpstreamRequest()
        request.method = method
        request.url = self.base + target
        request.path_url = target
        request.headers = requests.structures.CaseInsensitiveDict(headers)
        if body is not None:  # bytes, or a spooled body (edgegate_spool.Spool), sent a block at a time
            request.headers["Content-Length"] = str(len(body))
        request.body = body
        request.hooks = {"response": []}
        return self._adapter().send(request, stream=True, timeout=timeout or self.timeout)


class Upstreams:
    """The Ollama servers of UPSTREAM_BASE, one per GPU (README, "Several
    GPUs"): the connections to each, and the looks at what each has loaded
    (GET /api/ps), which ``choice`` (edgegate_slots.GpuChoice) uses to send a
    request where its model is. With one upstream every request goes to it."""

    def __init__(self, config):
        self.config = config
        self.all = [Upstream(base, config.connect_timeout_s, config.read_timeout_s, config.upstream_retries)
                    for base in config.upstream_bases]
        for index, upstream in enumerate(self.all):
            upstream.index = index
            upstream.lifetimes = ModelLifetimes()  # each Ollama has its own loaded models and their lifetimes
        self.choice = GpuChoice(config.upstream_bases, config.gpu_lock_dir, config.upstream_down_s,
                                config.prefer_loaded_wait_s)
        self.several = self.choice.several
        self._looking = threading.Lock()

    def of_slot(self, index):
        """The upstream that serves slot ``index``."""
        return self.all[index] if self.several else self.all[0]

    def first_healthy(self):
        """Where everything but inference goes (/api/tags, /api/show, /v1/models, GET /)."""
        return self.all[self.choice.first_up()]

    def ask_loaded_models(self, force=False):
        """GET /api/ps of every upstream not looked at for LOOK_EVERY_S (one
        thread looks; the others use what is known). A refusal marks it down."""
        if not self.several or not self._looking.acquire(blocking=False):
            return
        try:
            for upstream in self.all:
                if force or self.choice.loaded_models_stale(upstream.index):
                    self._ask_loaded_models_of(upstream)
        finally:
            self._looking.release()

    def _ask_loaded_models_of(self, upstream):
        self.choice.asked_loaded_models(upstream.index)
        try:
            answer = upstream.send("GET", "/api/ps", {"User-Agent": "edgegate-route"},
                                   timeout=(self.config.connect_timeout_s, 2.0))
            models = answer.json().get("models", []) if answer.status_code == 200 else None
        except requests.RequestException as error:
            if caused_by(error, CONNECT_FAILURES):
                self.refused(upstream)
            return
        except (ValueError, AttributeError):
            return
        self.choice.seen(upstream.index, models)

    def refused(self, upstream):
        """``upstream`` refused a connection: its slot is skipped for a while."""
        self.choice.refused(upstream.index)

    def failed_on(self, upstream):
        """A request on ``upstream`` failed: look at it again before the next request."""
        self.choice.ask_again_soon(upstream.index)

    def sent(self, upstream, model, keep_alive):
        """What a request just sent does to ``upstream``'s loaded models."""
        self.choice.sent(upstream.index, model, keep_alive_seconds(keep_alive) == 0)
