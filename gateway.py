"""edgegate: a small threaded WSGI gateway in front of a local Ollama daemon.

Run it with ``gunicorn -c gunicorn.conf.py gateway:app``. Clients (the OpenAI
SDK, the ``ollama`` client, curl) change only their base URL. Between client
and Ollama the gateway adds one shared GPU slot, a ``keep_alive`` default,
per-request task status (``status.py``) and one error envelope. The README is
the contract; this file reads top to bottom in the order a request meets it:

     1. configuration         ``Config``, read once from the environment
     2. the WSGI entry        ``Gateway.__call__``: the key, the route, and
                              ``proxy``: every step of a proxied request, in order
     3. the body              read, checked, and its two changes (model, keep_alive)
     4. the GPU slot          a flock on ``slot-<n>.lock``
     5. the upstream call     the keep_alive load call, then the request itself
     6. relaying the answer   chunk by chunk, SSE keep-alives, token counts
     7. the watcher           a client that left, a DELETE, a slow reader
     8. the ending            ``Exchange.close``: where every request ends
     9. the gateway's routes  /tasks, /slots, /readyz, /metrics
    10. metrics
    11. the cloud route       ``openai/<model>``, behind one seam (``Forward``)
    12. entry points          ``app``, ``python -m gateway check`` and ``hold``

The two questions an auditor asks -- is the GPU slot always freed, and does
every task end with a final state? -- are answered in one place:
``Exchange.close``, which every request goes through exactly once.
"""

import collections
import contextlib
import dataclasses
import email.parser
import email.policy
import fcntl
import functools
import hashlib
import hmac
import http.client
import io
import json
import logging
import math
import os
import queue
import re
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zlib

import requests
import requests.adapters
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

import status
from status import FAILED, RUNNING, SUCCESS

log = logging.getLogger("edgegate")

# ================================================================ 1. configuration


class ConfigError(Exception):
    """A bad environment variable; the message is the one line printed at start."""


def _text(env, name, default="", alias=None):
    value = env.get(name)
    if value is None and alias:
        value = env.get(alias)
    return default if value is None else value.strip()


def _number(env, name, default, kind=int, low=None, high=None, alias=None):
    raw = _text(env, name, None, alias)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError("%s=%r: expected %s" % (name, raw, "a whole number" if kind is int else "a number"))
    if (low is not None and value < low) or (high is not None and value > high):
        span = "at least %s" % low if high is None else "between %s and %s" % (low, high)
        raise ConfigError("%s=%r: expected a number %s" % (name, raw, span))
    return value


def _flag(env, name):
    raw = _text(env, name, "0").lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError("%s=%r: expected 0 or 1" % (name, raw))


def _base_url(env, name, default, alias=None):
    raw = _text(env, name, default, alias).rstrip("/")
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("%s=%r: expected an http:// or https:// URL such as %s" % (name, raw, default))
    if parts.query or parts.fragment:
        raise ConfigError("%s=%r: expected a base URL without query or fragment" % (name, raw))
    if parts.path.endswith("/v1") or parts.path.endswith("/api"):
        raise ConfigError(
            "%s=%r: expected the server's base URL without /v1 or /api (paths are forwarded as they come)"
            % (name, raw)
        )
    return raw


def _upstream_bases(env):
    """UPSTREAM_BASE: one base URL, or several, comma-separated: one Ollama
    per GPU (README, "Several GPUs"), each checked as one URL is."""
    raw = _text(env, "UPSTREAM_BASE", "http://127.0.0.1:11434", alias="OLLAMA_BASE_URL")
    bases = tuple(_base_url({"UPSTREAM_BASE": part}, "UPSTREAM_BASE", "http://127.0.0.1:11434")
                  for part in raw.split(",") if part.strip())
    if not bases:
        raise ConfigError("UPSTREAM_BASE=%r: expected one base URL or several, comma-separated" % raw)
    if len(set(bases)) != len(bases):
        raise ConfigError("UPSTREAM_BASE=%r: an upstream is named twice" % raw)
    return bases


def _gpu_slots(env, upstream_bases):
    """GPU_SLOTS: with one upstream, any count (default 1); with several,
    one slot per upstream, so it may only be left unset or equal to their number."""
    count = len(upstream_bases)
    if count == 1:
        return _number(env, "GPU_SLOTS", 1, int, 1, 1024)
    slots = _number(env, "GPU_SLOTS", count, int, 1, 1024)
    if slots != count:
        raise ConfigError("GPU_SLOTS=%r: with %d upstreams in UPSTREAM_BASE there is one slot per upstream; "
                          "leave GPU_SLOTS unset or set it to %d" % (_text(env, "GPU_SLOTS"), count, count))
    return slots


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """One key of GATEWAY_API_KEYS: its secret, the name that stands for it
    in task documents, the access log and metrics, and whether it is admin."""

    secret: bytes = dataclasses.field(repr=False)
    name: str
    admin: bool


KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _api_keys(env):
    """``key1,key2`` (bare keys), or ``@/path/file`` with one ``KEY [NAME [admin]]``
    a line. A bare key is named by a short fingerprint of it and is not admin."""
    raw = _text(env, "GATEWAY_API_KEYS")
    if raw.startswith("@"):
        try:
            with open(raw[1:], encoding="utf-8") as f:
                lines = [line.split() for line in f.read().splitlines() if line.strip() and not line.startswith("#")]
        except OSError as e:
            raise ConfigError("GATEWAY_API_KEYS=%r: cannot read the key file (%s)" % (raw, e.strerror))
        if not lines:
            raise ConfigError("GATEWAY_API_KEYS=%r: the key file holds no key" % raw)
    else:
        lines = [[k.strip()] for k in raw.split(",") if k.strip()]
    keys = []
    for number, fields in enumerate(lines, 1):
        secret = fields[0]
        name = fields[1] if len(fields) > 1 else "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]
        role = fields[2] if len(fields) > 2 else ""
        if not KEY_NAME_RE.match(name) or role not in ("", "admin") or len(fields) > 3:
            raise ConfigError("GATEWAY_API_KEYS=%r: line %d: expected KEY [NAME [admin]], NAME of letters, "
                              "digits, '.', '_' or '-'" % (raw, number))
        keys.append(ApiKey(secret.encode(), name, role == "admin"))
    if len({k.name for k in keys}) != len(keys):
        raise ConfigError("GATEWAY_API_KEYS=%r: two keys have the same name" % raw)
    return tuple(keys)


KEEP_ALIVE_RE = re.compile(r"^-?\d+(\.\d+)?(ns|us|µs|ms|s|m|h)?$|^(-?\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _keep_alive_default(env):
    raw = _text(env, "KEEP_ALIVE_DEFAULT", "30s")
    if raw == "":
        return ""
    if not KEEP_ALIVE_RE.match(raw):
        raise ConfigError("KEEP_ALIVE_DEFAULT=%r: expected an Ollama duration such as 30s, 5m, 1h or -1" % raw)
    if keep_alive_seconds(raw) == 0:
        raise ConfigError("KEEP_ALIVE_DEFAULT=%r: 0 would unload the model after every request; "
                          "leave it empty to send no default" % raw)
    return raw


# The origins Ollama allows by default (envconfig.AllowedOrigins); CORS_ORIGINS
# adds to them, as OLLAMA_ORIGINS does, so that a browser app that worked
# against Ollama keeps working. "x*" matches any origin that starts with "x".
OLLAMA_ORIGINS = tuple(
    "%s://%s%s" % (scheme, host, port) for host in ("localhost", "127.0.0.1", "0.0.0.0")
    for scheme in ("http", "https") for port in ("", ":*")
) + ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")


def _cors_origins(env):
    added = tuple(o.strip().lower().rstrip("/") for o in _text(env, "CORS_ORIGINS").split(",") if o.strip())
    for origin in added:
        if origin != "*" and "://" not in origin:
            raise ConfigError("CORS_ORIGINS=%r: expected origins such as https://app.example.com, "
                              "http://localhost:* or *" % origin)
    return added + OLLAMA_ORIGINS


def _directory(env, name, default):
    path = os.path.expanduser(_text(env, name, default))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError("%s=%r: cannot create the directory (%s)" % (name, path, e.strerror))
    if not os.access(path, os.W_OK):
        raise ConfigError("%s=%r: the directory is not writable by this user" % (name, path))
    return path


UNIX_SOCKET_PATH_MAX = 107  # bytes of sun_path on Linux, less its closing NUL (unix(7))


def _lock_directory(env, state_dir):
    """GPU_LOCK_DIR, short enough for the GPU line's unix sockets, which live
    in it as ``queue/<20 digits>.sock`` (README, "Sharing the GPU slot")."""
    path = _directory(env, "GPU_LOCK_DIR", os.path.join(state_dir, "locks"))
    longest = len(os.fsencode(os.path.join(path, "queue", "%020d.sock" % 0)))
    if longest > UNIX_SOCKET_PATH_MAX:
        raise ConfigError("GPU_LOCK_DIR=%r: too long for the GPU queue's unix sockets (%d bytes with their names; "
                          "at most %d): set a shorter GPU_LOCK_DIR or STATE_DIR" % (path, longest, UNIX_SOCKET_PATH_MAX))
    return path


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of the gateway, read once from the environment (README, "Configuration")."""

    upstream_base: str  # the first of upstream_bases
    upstream_bases: tuple  # one Ollama per GPU; slot i belongs to upstream i when there are several
    upstream_down_s: float
    prefer_loaded_wait_s: float
    connect_timeout_s: float
    read_timeout_s: float
    upstream_retries: int
    redis_url: str
    redis_host: str
    redis_port: int
    redis_user: str
    redis_password: str
    redis_db: int
    status_prefix: str
    ttl_running: int
    ttl_done: int
    heartbeat_sec: float
    algorithm_id: str
    state_dir: str
    gpu_slots: int
    gpu_lock_dir: str
    slot_wait_s: float
    queue_max: int
    retry_after_s: int
    keep_alive_default: str
    default_model: str
    model_aliases: tuple
    max_body_bytes: int
    api_keys: tuple
    allow_management: bool
    allow_ollama_cloud: bool
    cors_origins: tuple
    openai_api_key: str
    openai_base_url: str
    client_send_timeout_s: float
    client_header_timeout_s: float
    client_body_timeout_s: float
    max_connections_per_client: int
    bind: str
    workers: int
    threads: int

    @classmethod
    def from_environ(cls, env=None):
        env = os.environ if env is None else env
        redis_url = _text(env, "REDIS_URL")
        if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("REDIS_URL=%r: expected a redis://, rediss:// or unix:// URL" % redis_url)
        state_dir = _directory(env, "STATE_DIR", "~/.local/state/edgegate")
        upstream_bases = _upstream_bases(env)
        return cls(
            upstream_base=upstream_bases[0],
            upstream_bases=upstream_bases,
            upstream_down_s=_number(env, "UPSTREAM_DOWN_S", 10.0, float, 0),  # a refusing upstream is skipped
            prefer_loaded_wait_s=_number(env, "PREFER_LOADED_WAIT_S", 0.0, float, 0),  # the head waits for its model
            connect_timeout_s=_number(env, "UPSTREAM_CONNECT_TIMEOUT_S", 2.0, float, 0.01),
            read_timeout_s=_number(env, "UPSTREAM_READ_TIMEOUT_S", 300.0, float, 0.01,
                                   alias="PROVIDER_TIMEOUT_SECONDS"),
            upstream_retries=_number(env, "UPSTREAM_RETRIES", 2, int, 0, 10),
            redis_url=redis_url,
            redis_host=_text(env, "REDIS_HOST"),
            redis_port=_number(env, "REDIS_PORT", 6379, int, 1, 65535),
            redis_user=_text(env, "REDIS_USER"),
            redis_password=_text(env, "REDIS_PASSWORD"),
            redis_db=_number(env, "REDIS_DB", 0, int, 0),
            status_prefix=_text(env, "STATUS_PREFIX", "ts:ollama:"),
            ttl_running=_number(env, "TTL_RUNNING", 3600, int, 1),
            ttl_done=_number(env, "TTL_DONE", 86400, int, 1),
            heartbeat_sec=_number(env, "HEARTBEAT_SEC", 10.0, float, 0.05),
            algorithm_id=_text(env, "ALGORITHM_ID", "ollama-openai"),
            state_dir=state_dir,
            gpu_slots=_gpu_slots(env, upstream_bases),
            gpu_lock_dir=_lock_directory(env, state_dir),
            slot_wait_s=_number(env, "SLOT_WAIT_S", 0.0, float, 0),
            queue_max=_number(env, "QUEUE_MAX", 16, int, 0),  # waiters in the GPU line (with SLOT_WAIT_S)
            retry_after_s=_number(env, "RETRY_AFTER_S", 2, int, 0),
            keep_alive_default=_keep_alive_default(env),
            default_model=_text(env, "DEFAULT_MODEL"),
            model_aliases=tuple(a.strip() for a in _text(env, "MODEL_ALIASES", "ollama,local").split(",") if a.strip()),
            max_body_bytes=_number(env, "MAX_BODY_BYTES", 64 * 1024 * 1024, int, 1),
            api_keys=_api_keys(env),
            allow_management=_flag(env, "ALLOW_MANAGEMENT"),
            allow_ollama_cloud=_flag(env, "ALLOW_OLLAMA_CLOUD"),
            cors_origins=_cors_origins(env),
            openai_api_key=_text(env, "OPENAI_API_KEY"),
            openai_base_url=_base_url(env, "OPENAI_BASE_URL", "https://api.openai.com"),
            client_send_timeout_s=_number(env, "CLIENT_SEND_TIMEOUT_S", 60.0, float, 1),
            client_header_timeout_s=_number(env, "CLIENT_HEADER_TIMEOUT_S", 10.0, float, 0.1),
            client_body_timeout_s=_number(env, "CLIENT_BODY_TIMEOUT_S", 30.0, float, 0.1),
            max_connections_per_client=_number(env, "MAX_CONNECTIONS_PER_CLIENT", 256, int, 0),  # 0: no cap
            bind=_text(env, "GATEWAY_BIND", "0.0.0.0:11535"),
            workers=_number(env, "WORKERS", 2, int, 1, 64),
            threads=_number(env, "THREADS", 32, int, 1, 1024),
        )


def load_config():
    """The configuration, or one line on stderr and exit 2."""
    try:
        return Config.from_environ()
    except ConfigError as error:
        print("edgegate: configuration error: %s" % error, file=sys.stderr)
        raise SystemExit(2)


# ================================================================ 2. the WSGI entry


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
    if path == "/v1/messages":  # the anthropic SDK reads error.type and error.message
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


class Gateway:
    """The WSGI application: per worker process, the services every request
    uses (the GPU slots, the upstream, the task board, the watcher, metrics).

        from gateway import Gateway, Config
        app = Gateway(Config.from_environ())

    Nothing starts at construction: threads, connections and the store come
    up on the first request in each worker process, after gunicorn's fork.
    """

    def __init__(self, config):
        self.config = config
        self.upstreams = Upstreams(config)  # one per GPU; slot i is upstream i's when there are several
        self.slots = GpuSlots(config.gpu_lock_dir, config.gpu_slots,
                              self.upstreams.choose if self.upstreams.several else None)
        self.retry_after = [("Retry-After", str(config.retry_after_s))]
        self.upstream = self.upstreams.all[0]
        self.lifetimes = self.upstream.lifetimes
        self.cloud = Upstream(config.openai_base_url, config.connect_timeout_s, config.read_timeout_s,
                              config.upstream_retries)
        self._pid = None
        self._start_lock = threading.Lock()

    def _start_in_this_process(self):
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self.metrics = Metrics(os.path.join(self.config.state_dir, "metrics"), self.slots)
            self.board = status.TaskBoard(status.open_store(self.config),
                                          on_failure=lambda: self.metrics.count("store_errors"))
            self.watcher = Watcher(self.board, self.config.heartbeat_sec, self.config.client_send_timeout_s)
            self._pid = os.getpid()

    def __call__(self, environ, start_response):
        if self._pid != os.getpid():
            self._start_in_this_process()
        exchange = Exchange(self, environ, start_response)
        try:
            return self.route(exchange)
        except Exception:  # a bug of ours: the exchange still ends, with one envelope, never a bare 500
            log.exception("internal error on %s %s", exchange.method, printable(exchange.path))
            error = GatewayError(500, "internal_error", "the gateway failed on this request; see its log",
                                 stage="internal_error")
            if exchange.status_code is not None:  # an answer has started and cannot be replaced: gunicorn cuts it
                exchange.close(Outcome.of(error))
                raise
            return exchange.fail(error, sys.exc_info())

    def route(self, exchange):
        path = exchange.path
        try:
            exchange.cors_origin = allowed_origin(self.config, exchange.environ)
            if exchange.method == "OPTIONS" and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in exchange.environ:
                return answer_preflight(exchange)
            if path == "/healthz":
                return exchange.answer(200, {"status": "ok", "pid": os.getpid()})
            if path == "/" and exchange.method in ("GET", "HEAD"):  # "Ollama is running": clients check it first
                return proxy(self, exchange)
            exchange.key = check_api_key(self.config, exchange.environ)
            if path.startswith(("/v1/", "/api/", "//")):  # "//api/pull" is refused as a spelling, not a 404
                return proxy(self, exchange)
            return own_route(self, exchange)
        except GatewayError as error:
            return exchange.fail(error)
        except status.StoreUnavailable as error:
            return exchange.fail(GatewayError(503, "store_unavailable", str(error), provider=error.provider))


def check_api_key(config, environ):
    """GATEWAY_API_KEYS: ``Authorization: Bearer`` or ``X-API-Key``, in
    constant time. The key that matched (None when keys are off)."""
    if not config.api_keys:
        return None
    offered = environ.get("HTTP_X_API_KEY", "")
    authorization = environ.get("HTTP_AUTHORIZATION", "")
    if authorization[:7].lower() == "bearer ":
        offered = authorization[7:].strip()
    offered = offered.encode("utf-8", "replace")
    match = None
    for key in config.api_keys:  # no early exit: the same time whichever key matches
        if hmac.compare_digest(offered, key.secret):
            match = key
    if match:
        return match
    raise GatewayError(401, "unauthorized", "a valid API key is required (Authorization: Bearer <key>)",
                       headers=[("WWW-Authenticate", "Bearer")])


def allowed_origin(config, environ):
    """The request's Origin when it is allowed (CORS_ORIGINS and Ollama's
    defaults), else None: an origin not allowed gets no CORS headers."""
    origin = environ.get("HTTP_ORIGIN", "").strip()
    if not origin:
        return None
    lowered = origin.lower()
    for allowed in config.cors_origins:
        if allowed == "*" or lowered == allowed or (allowed.endswith("*") and lowered.startswith(allowed[:-1])):
            return origin
    return None


def answer_preflight(exchange):
    """A browser's CORS preflight, answered here and before the key check
    (browsers send no key with it); the real request still needs one."""
    if exchange.cors_origin is None:
        raise GatewayError(403, "cors_origin_not_allowed", "origin %s is not allowed (CORS_ORIGINS)"
                           % printable(exchange.environ.get("HTTP_ORIGIN", "")))
    requested = exchange.environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "")
    headers = [("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"),
               ("Access-Control-Max-Age", "43200")]
    if requested.strip():
        headers.append(("Access-Control-Allow-Headers", printable(requested)))
    return exchange.answer(204, b"", headers, content_type="text/plain")


def proxy(gateway, exchange):
    """A request to ``/v1/*`` or ``/api/*``, step by step. Each step is
    defined further down, in this order; a GatewayError from any of them
    ends the exchange with that error (``Gateway.route``)."""
    exchange.task_id = task_id_of(exchange.environ)
    check_path_spelling(exchange.path)
    try:  # read before the claim, so that the task's first document names the model
        request, refusal = read_request(gateway.config, exchange), None
    except GatewayError as error:
        request, refusal = None, error
    if exchange.path != "/":  # "/" answers anyone (no key needed), so it writes nothing to the store
        exchange.claim_task()  # from here on the exchange's ending writes the task's last state
    if refusal:
        raise refusal
    on_gpu = request.on_gpu
    if on_gpu:
        take_slot(gateway, exchange)
    forward = cloud_forward(gateway, exchange, request) if request.to_cloud else ollama_forward(gateway, exchange,
                                                                                                request)
    exchange.note(RUNNING, "forwarding", "forwarded to %s" % forward.where)
    with upstream_call_of_this_thread(exchange.call):  # a hang-up or DELETE can cut these calls
        if on_gpu:
            give_model_its_lifetime(gateway, exchange, request)
        exchange.response = send_upstream(exchange, forward)
    return relay_answer(exchange, forward)


TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def task_id_of(environ):
    """The client's ``X-Task-Id``, or a new UUID4."""
    given = environ.get("HTTP_X_TASK_ID")
    if given is None:
        return str(uuid.uuid4())
    if not TASK_ID_RE.match(given):
        raise GatewayError(400, "invalid_task_id", "X-Task-Id must match ^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    return given


def check_path_spelling(path):
    """Refuse ``.``, ``..`` and ``//`` segments, so that no spelling of a
    path reaches a route that its plain spelling is refused."""
    if "//" in path or any(segment in (".", "..") for segment in path.split("/")):
        raise GatewayError(400, "invalid_request", "the path must not contain '.', '..' or '//' segments")


# ================================================================ 3. the body

# Every POST route that runs a model, and the kind of body it has: "json", or
# "multipart" (a form whose ``model`` field names the model). The next route
# Ollama adds is one line here.
INFERENCE_ROUTES = {
    "/api/generate": "json", "/api/chat": "json", "/api/embed": "json", "/api/embeddings": "json",
    "/v1/chat/completions": "json", "/v1/completions": "json", "/v1/responses": "json",
    "/v1/embeddings": "json", "/v1/messages": "json", "/v1/audio/transcriptions": "multipart",
}
EMBEDDING_PATHS = frozenset({"/v1/embeddings", "/api/embed", "/api/embeddings"})
# Routes that change the box's models, or act for (and spend) the box
# owner's ollama.com account: refused unless ALLOW_MANAGEMENT=1.
MANAGEMENT_PATHS = frozenset({
    "/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete",
    "/api/me", "/api/signout", "/api/experimental/web_search", "/api/experimental/web_fetch",
})
MANAGEMENT_PREFIXES = ("/api/blobs/", "/api/user/keys")
# Ollama runs a model named like this on ollama.com, on the owner's account
# (internal/modelref, parseSourceSuffix: the text after the last ":",
# trimmed, is "cloud" or ends in "-cloud"); a name ending "-cloud" is refused too.
OLLAMA_CLOUD_MODEL_RE = re.compile(r"(?:[-:]\s*cloud|:[^:/]*-cloud)\s*$", re.IGNORECASE)


@dataclasses.dataclass
class ProxiedRequest:
    """What the client asked for, checked: the body to send upstream (the
    bytes as they came unless a change was made) and, on an inference
    route, its document (the parsed JSON, or the form's model)."""

    path: str
    method: str
    body: bytes
    document: dict = None
    decoded: bool = False  # the body came compressed and is sent decoded

    @property
    def inference(self):
        return self.document is not None

    @property
    def to_cloud(self):
        return self.inference and is_cloud_model(self.document)

    @property
    def on_gpu(self):
        """Runs on this box's GPU: not the cloud route, not an Ollama cloud model."""
        model = self.document.get("model") if self.inference else None
        return self.inference and not self.to_cloud and not (
            isinstance(model, str) and OLLAMA_CLOUD_MODEL_RE.search(model))


def read_request(config, exchange):
    """Refusals first, then the body: decoded if it came compressed, parsed
    and adjusted on an inference route, passed on as it came elsewhere."""
    path, method = exchange.path, exchange.method
    if path.rstrip("/") in MANAGEMENT_PATHS or path.startswith(MANAGEMENT_PREFIXES):
        if not config.allow_management:
            raise GatewayError(403, "management_disabled",
                               "%s is disabled on this gateway (set ALLOW_MANAGEMENT=1 to allow it)" % path)
        if exchange.key is not None and not exchange.key.admin:
            raise GatewayError(403, "management_disabled", "%s needs an admin key (GATEWAY_API_KEYS, "
                               "a line 'KEY NAME admin' in the key file)" % path)
    raw, decoded = decoded_body(exchange.environ, read_body(exchange.environ, config.max_body_bytes),
                                config.max_body_bytes)
    kind = INFERENCE_ROUTES.get(path) if method == "POST" else None
    if kind is None:
        return ProxiedRequest(path, method, raw, decoded=decoded)
    if kind == "multipart":
        models = form_models(exchange.environ, raw)
        for model in models[1:]:  # Ollama runs the first; none may be a refused one
            refuse_ollama_cloud(config, model)
        document, changed = {"model": models[0] if models else None}, False
    else:
        document = parse_json_object(raw)
        changed = False if is_cloud_model(document) else adjust_body(path, document, config)
    refuse_ollama_cloud(config, document.get("model"))
    stream = document.get("stream", path.startswith("/api/") and path not in EMBEDDING_PATHS)
    exchange.model, exchange.stream = document.get("model"), bool(stream)
    return ProxiedRequest(path, method, json.dumps(document).encode() if changed else raw, document, decoded)


def refuse_ollama_cloud(config, model):
    if isinstance(model, str) and OLLAMA_CLOUD_MODEL_RE.search(model) and not config.allow_ollama_cloud:
        raise GatewayError(403, "cloud_model_disabled",
                           "%s is an Ollama cloud model, run by ollama.com on this box owner's account; "
                           "it is disabled on this gateway (set ALLOW_OLLAMA_CLOUD=1 to allow it)" % printable(model))


def form_models(environ, body):
    """The models a multipart request (a transcription) names, in the order
    Ollama reads them (Go's ``FormValue``: the query string first, then the
    form; it runs the first), without changing the body, which goes
    upstream as it came."""
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).get("model", [])
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + environ.get("CONTENT_TYPE", "").encode("latin-1") + b"\r\n\r\n" + body)
    form = [part.get_content() for part in (message.iter_parts() if message.is_multipart() else [])
            if part.get_param("name", header="content-disposition") == "model"]
    return [(m if isinstance(m, str) else m.decode("utf-8", "replace")).strip() for m in query + form]


def read_body(environ, limit):
    """The request body, refused with 413 before reading when too large."""
    length = environ.get("CONTENT_LENGTH") or ""
    if length:
        try:
            declared = int(length)
        except ValueError:
            raise GatewayError(400, "invalid_request", "Content-Length is not a number")
        if declared > limit:
            raise GatewayError(413, "body_too_large",
                               "request body of %d bytes is over MAX_BODY_BYTES (%d)" % (declared, limit))
        return environ["wsgi.input"].read(declared) if declared else b""
    # No length: a chunked request body (gunicorn decodes it). Read one byte
    # past the limit to know whether it is over, never more.
    body = environ["wsgi.input"].read(limit + 1)
    if len(body) > limit:
        raise GatewayError(413, "body_too_large", "request body is over MAX_BODY_BYTES (%d)" % limit)
    return body


def decoded_body(environ, raw, limit):
    """A body sent compressed (``Content-Encoding`` gzip, deflate or zstd;
    coding agents send zstd), decoded a piece at a time, so that a small bomb
    is refused once its output passes MAX_BODY_BYTES, never inflated whole.
    Returns the body and whether it was decoded."""
    encoding = environ.get("HTTP_CONTENT_ENCODING", "").strip().lower()
    if encoding in ("", "identity"):
        return raw, False
    if encoding not in BODY_DECODERS:
        raise GatewayError(415, "unsupported_encoding", "Content-Encoding %s is not supported; send the body "
                           "plain or as gzip, deflate or zstd" % printable(encoding))
    pieces, size = [], 0
    try:
        for piece in BODY_DECODERS[encoding](raw):
            size += len(piece)
            if size > limit:
                raise GatewayError(413, "body_too_large", "request body is over MAX_BODY_BYTES (%d) once "
                                   "decoded from %s" % (limit, encoding))
            pieces.append(piece)
    except GatewayError:
        raise
    except Exception as error:  # zlib.error, EOFError, zstd's own errors: all mean a broken body
        raise GatewayError(400, "invalid_request", "the body is not valid %s: %s" % (encoding, _short(error)))
    return b"".join(pieces), True


def _inflate(raw, wbits):
    decompressor = zlib.decompressobj(wbits)
    data = raw
    while data:
        yield decompressor.decompress(data, 65536)
        data = decompressor.unconsumed_tail
    yield decompressor.flush()
    if not decompressor.eof:
        raise EOFError("the compressed body ends early")


def _unzstd(raw):
    if zstd_reader is None:
        raise GatewayError(415, "unsupported_encoding", "zstd needs the zstandard package on Python < 3.14")
    reader = zstd_reader(io.BytesIO(raw))
    while True:
        piece = reader.read(65536)
        if not piece:
            return
        yield piece


try:  # zstd: in the standard library from Python 3.14, else the zstandard wheel (README, "Dependencies")
    from compression.zstd import ZstdFile as zstd_reader
except ImportError:
    try:
        import zstandard

        zstd_reader = zstandard.ZstdDecompressor().stream_reader
    except ImportError:
        zstd_reader = None

BODY_DECODERS = {
    "gzip": lambda raw: _inflate(raw, 16 + zlib.MAX_WBITS), "x-gzip": lambda raw: _inflate(raw, 16 + zlib.MAX_WBITS),
    "deflate": lambda raw: _inflate(raw, zlib.MAX_WBITS), "zstd": _unzstd,
}


def parse_json_object(raw):
    """The body as a JSON object, read as strictly as Ollama's decoder: UTF-8
    only, no NaN or Infinity, no lone surrogates; a ``model`` is a string."""
    try:
        document = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_one_key_each)
        if b"\\u" in raw and re.search(rb"\\u[dD][89a-fA-F]", raw):  # encoded surrogates: all must pair up
            json.dumps(document, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and UnicodeEncodeError are ValueErrors
        raise GatewayError(400, "invalid_json", "request body is not valid JSON: %s" % str(e)[:200])
    if not isinstance(document, dict):
        raise GatewayError(400, "invalid_json", "request body must be a JSON object, not %s"
                           % type(document).__name__)
    if "model" in document and not isinstance(document["model"], str):
        raise GatewayError(400, "invalid_request", "model must be a string, not %s"
                           % type(document["model"]).__name__, )
    return document


def _refuse_constant(name):
    raise ValueError("%s is not JSON" % name)


def _one_key_each(pairs):
    """A JSON object whose keys Ollama reads as Python does. Go's decoder
    matches keys without regard to case and keeps the last of repeated ones,
    so {"model": "a", "MODEL": "b"} would run "b" there while this gateway
    checked "a": such bodies are refused."""
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("a key appears twice in one object")
    for key in document:
        if key != "model" and key.casefold() == "model":
            raise ValueError("%r: the key is \"model\", in lower case" % key[:20])
    return document


def adjust_body(path, document, config):
    """The two changes the gateway makes to an inference body (README,
    "Request body"): the default model, and ``keep_alive`` on Ollama's
    native API. True when the document changed (else the original bytes go
    upstream)."""
    changed = False
    if config.default_model and (document.get("model") in config.model_aliases or "model" not in document):
        document["model"] = config.default_model
        changed = True
    if path.startswith("/api/") and config.keep_alive_default and "keep_alive" not in document:
        document["keep_alive"] = config.keep_alive_default
        changed = True
    return changed


# ================================================================ 4. the GPU slot


def take_slot(gateway, exchange):
    """Hold a GPU slot for the rest of the exchange (freed by its ending).
    With SLOT_WAIT_S = 0 the slot is free now or the answer is 503
    ``gpu_busy``; above 0 the request waits its turn in the line shared by
    every worker (``wait_in_line``), at most SLOT_WAIT_S. A client that
    leaves, or a DELETE, while the request waits ends the wait."""
    holder = {"pid": os.getpid(), "task_id": exchange.task_id, "path": exchange.path,
              "since": round(time.time(), 3)}
    if exchange.key is not None:
        holder["key"] = exchange.key.name
    slots, wait_s = gateway.slots, gateway.config.slot_wait_s
    gateway.upstreams.look()  # what each Ollama has loaded, if not known from the last few seconds
    if wait_s > 0:
        exchange.slot = wait_in_line(gateway, exchange, holder)
    else:
        exchange.slot = slots.try_take(holder, {"model": exchange.model})
    if exchange.slot is not None:
        exchange.slot_taken_at = time.monotonic()
        if gateway.upstreams.several:  # one upstream: the documents keep the shape they always had
            exchange.task.set(slot=exchange.slot.index, upstream=gateway.upstreams.of_slot(exchange.slot.index).base)
    if exchange.call.reason:  # cancelled while waiting, maybe just as the slot came: the ending frees it
        raise abort_error(exchange)
    if exchange.slot is None:
        gateway.metrics.count("gpu_busy")
        gateway.metrics.count("gpu_refusals", "busy")
        raise GatewayError(503, "gpu_busy", busy_message(slots, gateway.config), headers=gateway.retry_after,
                           stage="gpu_busy")
    waited = exchange.slot_taken_at - exchange.started
    gateway.metrics.observe("slot_wait", waited)
    exchange.slot_wait_ms = "%.1f" % (waited * 1000)


def wait_in_line(gateway, exchange, holder):
    """The slot at once when nobody waits and one is free; else a place at
    the end of the line until this request's turn comes (a slot, returned),
    SLOT_WAIT_S runs out, or the client leaves or a DELETE comes (None).
    QUEUE_MAX waiters already: 503 ``gpu_busy`` at once, saying so."""
    config, slots = gateway.config, gateway.slots
    key = exchange.key.name if exchange.key else None  # its name (README, "Keys and their tasks"), never the key
    place = dict(holder, model=exchange.model, key=key)
    try:
        slot, ticket = slots.line.join(place, holder, slots, bound=config.queue_max)
    except QueueFull as full:
        gateway.metrics.count("gpu_busy")
        gateway.metrics.count("gpu_refusals", "queue_full")
        retry_after = slots.retry_after(full.waiting, config.retry_after_s)
        raise GatewayError(503, "gpu_busy", "GPU queue full: %d requests waiting (QUEUE_MAX); %s"
                           % (full.waiting, busy_message(slots, config)), headers=[("Retry-After", str(retry_after))],
                           stage="gpu_busy")
    if slot is not None:
        return slot
    joined = time.monotonic()
    stream = None
    try:
        exchange.call.attach(ticket)  # a hang-up or DELETE shuts the ticket's socket (UpstreamCall.abort): we wake
        if exchange.stream and exchange.path.startswith("/v1/"):
            stream = QueuedStream(exchange)
        return wait_turn(slots, ticket, holder, joined + config.slot_wait_s,
                         moved=lambda position: _moved_up(exchange, stream, position),
                         stopped=lambda: exchange.call.reason is not None)
    except ConnectionAbortedError:  # the client left before the wait began
        return None
    finally:
        slots.line.leave(ticket)
        gateway.metrics.observe("queue_wait", time.monotonic() - joined)
        with exchange.task.lock:  # out of the line: the document is again the one its consumers know
            exchange.task.extensions.pop("queue_position", None)


def _moved_up(exchange, stream, position):
    exchange.gateway.upstreams.look()  # outside the line's lock: a look may take a round trip
    if position and exchange.task.extensions.get("queue_position") != position:
        exchange.task.set(queue_position=position)
    if stream is not None and position:
        stream.tell(position)


def wait_turn(slots, ticket, holder, deadline, moved, stopped):
    """Wait in line with ``ticket`` until its turn gives it a slot (returned),
    ``deadline`` (time.monotonic(); None: no limit) passes or ``stopped()``
    (None). ``moved(position)`` hears its place (1 = next; 0 = served) after
    each look. Sleeps on the ticket's socket: a wake, a shutdown, or FALLBACK_S."""
    while not stopped():
        slot, position = slots.line.turn(ticket, holder, slots)
        moved(position)
        if slot is not None:
            return slot
        left = SlotLine.FALLBACK_S if deadline is None else deadline - time.monotonic()
        if left <= 0:
            return None
        ticket.wait(min(left, SlotLine.FALLBACK_S))
    return None


def busy_message(slots, config):
    """Who holds the GPU, by task id -- unless API keys are on: then a task
    id of another key is not told (README, "Keys and their tasks")."""
    held = [s for s in slots.describe() if s["state"] == "held"]
    if not held:
        return "GPU slot busy"
    first = held[0]
    since = first.get("since")
    age = " for %.1f s" % (time.time() - since) if isinstance(since, (int, float)) else ""
    if config.api_keys:
        return "GPU slot busy (held%s)" % age
    who = "task %s" % first["task_id"] if first.get("task_id") else "pid %s" % first.get("pid")
    return "GPU slot busy (held by %s%s)" % (who, age)


class QueuedStream:
    """A streamed ``/v1`` request that waits in line: its SSE answer starts
    now (200, ``text/event-stream``), so that the client sees ``: queued,
    position N`` comments while it waits -- at each move, and every
    HEARTBEAT_SEC, which also keeps load balancers from cutting it. Its
    headers are then gone: ``Exchange.start`` sends no others, and an error
    that follows (SLOT_WAIT_S out, upstream failed) is the stream's last
    event (``Exchange.answer``). NDJSON streams get nothing: Ollama's
    clients parse every line."""

    def __init__(self, exchange):
        self.exchange = exchange
        self.write = exchange.start(200, None, [("Content-Type", "text/event-stream"),
                                                ("Cache-Control", "no-cache")])
        exchange.answer_started = True
        self.every = exchange.gateway.config.heartbeat_sec
        self.told, self.told_at = None, 0.0

    def tell(self, position):
        now = time.monotonic()
        if position == self.told and now - self.told_at < self.every:
            return
        self.told, self.told_at = position, now
        try:  # PEP 3333's write(): gunicorn sends the headers (the first time), then this, now
            self.write((": queued, position %d\n\n" % position).encode())
        except OSError:
            self.exchange.call.abort("client_gone")


def queued_stream_event(document):
    """An error document as the last event of a stream whose 200 went out while it queued."""
    event = b"event: error\n" if document.get("type") == "error" else b""  # Anthropic names its events
    return event + b"data: " + json.dumps(document).encode() + b"\n\n"


RECORD_BYTES = 512  # a holder record is padded to this, so that a shorter one leaves no tail of the last


def holder_record(path):
    """The JSON object at the start of a slot's lock file ({} if none):
    what follows it is padding, or the tail of a longer earlier record."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(4096).lstrip()
        record, _ = json.JSONDecoder().raw_decode(text)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


class Slot:
    """One held GPU slot: a lock file's descriptor with an exclusive flock on it."""

    def __init__(self, index, fd, on_release):
        self.index = index
        self.fd = fd
        self.taken_at = time.monotonic()
        self.on_release = on_release

    def release(self):
        """Drop the lock; the descriptor is kept for the next hold, and the
        line hears of it (``GpuSlots._released``). Only the first call counts."""
        fd, self.fd = self.fd, None
        if fd is not None:
            self.on_release(self, fd)


class GpuSlots:
    """``GPU_SLOTS`` lock files, ``slot-<n>.lock`` in ``GPU_LOCK_DIR``, and
    the line of those who wait for one (``SlotLine``).

    Why flock and not a Redis lock: the kernel drops a flock when its holder
    dies, even on SIGKILL, so a crashed worker can never wedge the GPU, and
    any other program on the box (ASR, TTS, ``flock(1)``) can take part
    without talking to us. The lock belongs to the open file description:
    two descriptors opened apart exclude each other, even in one thread,
    while one shared across fork or by two holders would exclude nothing.
    So each hold uses a descriptor this process opened and nobody else
    uses meanwhile; a released one is kept for the next hold of that slot
    (one ``open`` and ``close`` less per request), never across a fork.

    The holder record (JSON: pid, task id, path, since) is written over the
    file's start when the lock is taken, and left there when it goes: the
    kernel's lock table says whether the slot is held, and a record counts
    only when its pid is the lock's (``describe``).
    """

    KEEP_PER_SLOT = 4  # released descriptors kept per slot, for holds at once in this process

    def __init__(self, lock_dir, count, choose=None):
        self.paths = [os.path.join(lock_dir, "slot-%d.lock" % n) for n in range(count)]
        self.line = SlotLine(lock_dir)
        self.holds = collections.deque(maxlen=32)  # this process's recent hold times, for Retry-After
        self.choose = choose  # several upstreams: (slot indexes, place) -> the order to try them in
        self.held_here = set()  # indexes this process holds: not worth a try
        self._kept = {}  # index -> [released descriptors]
        self._kept_pid = os.getpid()

    def try_take(self, holder, place=None):
        """The first free slot of those ``place`` may have (``place["slots"]``:
        only these, for ``hold --slot``), in the order ``choose`` prefers for
        it; None when none is free."""
        indexes = range(len(self.paths))
        if place and place.get("slots") is not None:
            indexes = [i for i in place["slots"] if 0 <= i < len(self.paths)]
        if self.choose is not None:
            indexes = self.choose(indexes, place or {})
        if self._kept_pid != os.getpid():  # forked: the parent's descriptors would share its locks
            self.held_here, self._kept, self._kept_pid = set(), {}, os.getpid()
        record = None
        for index in indexes:
            if index in self.held_here:
                continue
            fd = self._descriptor(index)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._keep(index, fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            self.held_here.add(index)
            slot = Slot(index, fd, self._released)
            try:
                if record is None:
                    record = json.dumps(holder).encode()
                os.pwrite(fd, record.ljust(RECORD_BYTES), 0)
            except BaseException:
                slot.release()
                raise
            return slot
        return None

    def _descriptor(self, index):
        """A descriptor of slot ``index``'s lock file that nobody uses: one
        kept from an earlier hold in this process, else a new one."""
        kept = self._kept.get(index)
        if kept:
            try:
                return kept.pop()
            except IndexError:  # another thread took the last one
                pass
        return os.open(self.paths[index], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _keep(self, index, fd):
        kept = self._kept.setdefault(index, [])
        if len(kept) < self.KEEP_PER_SLOT:
            kept.append(fd)
        else:
            os.close(fd)

    def _released(self, slot, fd):
        """Drop ``slot``'s lock (closing the descriptor if that fails), then
        wake the line: the next waiter may have it."""
        self.held_here.discard(slot.index)
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            os.close(fd)  # closing drops the lock too
        else:
            self._keep(slot.index, fd)
        self.holds.append(time.monotonic() - slot.taken_at)
        try:
            self.line.wake_all()
        except OSError:  # a wake that fails costs a waiter FALLBACK_S, never the ending
            log.exception("could not wake the GPU queue")

    def retry_after(self, waiting, floor):
        """Seconds until a place may open: the holders' and ``waiting``
        waiters' turns at this process's recent hold time, never below ``floor``."""
        if not self.holds:
            return floor
        mean = sum(self.holds) / len(self.holds)
        return max(floor, math.ceil((waiting + 1) * mean / len(self.paths)))

    def describe(self):
        """Each slot, free or held, read without touching the locks.

        The truth is the kernel's table ``/proc/locks`` (taking a lock to look
        would make a real acquirer fail); the file adds task, path and since.
        """
        locked = _flock_holders()
        slots = []
        for index, path in enumerate(self.paths):
            entry = {"slot": index, "lock_file": path, "state": "free"}
            try:
                st = os.stat(path)
            except FileNotFoundError:
                slots.append(entry)
                continue
            pid = locked.get((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
            if pid is None:
                pid = locked.get((None, None, st.st_ino))
            if pid is not None:
                entry.update(state="held", pid=pid)
                record = holder_record(path)
                # A record left by an earlier holder, or none (flock(1)
                # writes nothing): the kernel's pid stands alone then.
                if record.get("pid") == pid:
                    entry.update({k: record[k] for k in ("task_id", "path", "since", "key") if k in record})
            slots.append(entry)
        return slots


class Upstreams:
    """The Ollama servers of UPSTREAM_BASE, one per GPU, and which one a
    request goes to (README, "Several GPUs"). With one upstream all of this
    stands aside: every request goes to it, as it always did.

    With several, slot i belongs to upstream i, and an inference request
    tries the free slots in this order (``choose``, under the line's lock):
    first those whose Ollama has the request's model loaded -- a load costs
    seconds, a loaded model nothing -- then the one idle longest (the lock
    file's mtime: ``Slot.release`` truncates it, so it is the time the slot
    was last let go, seen by every worker). An upstream that refused a
    connection is skipped for UPSTREAM_DOWN_S, unless all are down (then the
    request goes and names the failure). With PREFER_LOADED_WAIT_S a waiter
    whose model is loaded on a busy slot tries only that slot until it has
    waited that long, rather than load the model a second time elsewhere.

    What is loaded where comes from each Ollama's GET /api/ps, looked at
    again after LOOK_EVERY_S by each worker (outside the line's lock), and
    from what this worker just sent: a request loads its model where it
    goes, ``keep_alive: 0`` unloads it (server/sched.go).
    """

    LOOK_EVERY_S = 3.0

    def __init__(self, config):
        self.config = config
        self.all = [Upstream(base, config.connect_timeout_s, config.read_timeout_s, config.upstream_retries)
                    for base in config.upstream_bases]
        for index, upstream in enumerate(self.all):
            upstream.index, upstream.down_until, upstream.looked_at = index, 0.0, 0.0
            upstream.loaded = frozenset()  # model names as /api/ps shows them (``loaded_name``)
            upstream.lifetimes = ModelLifetimes()  # each Ollama has its own loaded models and their lifetimes
        self.several = len(self.all) > 1
        self._looking = threading.Lock()

    def of_slot(self, index):
        """The upstream that serves slot ``index``."""
        return self.all[index] if self.several else self.all[0]

    def first_healthy(self):
        """Where everything but inference goes (/api/tags, /api/show, /v1/models, GET /)."""
        now = time.monotonic()
        return next((u for u in self.all if u.down_until <= now), self.all[0])

    def up(self, upstream, now=None):
        return upstream.down_until <= (time.monotonic() if now is None else now)

    def choose(self, indexes, place):
        """``indexes`` (slots) in the order to try them for ``place`` (its
        ``model``; its ``since``, wall time, for PREFER_LOADED_WAIT_S)."""
        now = time.monotonic()
        indexes = list(indexes)
        up = [i for i in indexes if self.all[i].down_until <= now] or indexes
        model = loaded_name(place.get("model"))
        has_model = [i for i in up if model in self.all[i].loaded]
        since, patience = place.get("since"), self.config.prefer_loaded_wait_s
        if has_model and patience > 0 and since is not None and time.time() - since < patience:
            return has_model  # wait a little for the slot that has the model loaded
        idle = sorted(up, key=self._released_at)
        return has_model + [i for i in idle if i not in has_model]

    def _released_at(self, index):
        try:
            return os.stat(os.path.join(self.config.gpu_lock_dir, "slot-%d.lock" % index)).st_mtime
        except OSError:
            return 0.0

    def look(self, force=False):
        """GET /api/ps of every upstream not looked at for LOOK_EVERY_S (one
        thread looks; the others use what is known). A refusal marks it down."""
        if not self.several or not self._looking.acquire(blocking=False):
            return
        try:
            for upstream in self.all:
                if force or time.monotonic() - upstream.looked_at >= self.LOOK_EVERY_S:
                    self._look_at(upstream)
        finally:
            self._looking.release()

    def _look_at(self, upstream):
        upstream.looked_at = time.monotonic()
        try:
            answer = upstream.send("GET", "/api/ps", {"User-Agent": "edgegate-route"},
                                   timeout=(self.config.connect_timeout_s, 2.0))
            models = answer.json().get("models", []) if answer.status_code == 200 else None
        except requests.RequestException as error:
            if _caused_by(error, CONNECT_FAILURES):
                self.refused(upstream)
            return
        except (ValueError, AttributeError):
            return
        upstream.down_until = 0.0
        if isinstance(models, list):
            upstream.loaded = frozenset(loaded_name(m.get("name") or m.get("model"))
                                        for m in models if isinstance(m, dict))

    def refused(self, upstream):
        """``upstream`` refused a connection: skip its slot for UPSTREAM_DOWN_S."""
        if self.several:
            if upstream.down_until <= time.monotonic():
                log.warning("upstream %s refused a connection: its slot is skipped for %s s",
                            upstream.base, self.config.upstream_down_s)
            upstream.down_until = time.monotonic() + self.config.upstream_down_s

    def in_doubt(self, upstream):
        """A request on ``upstream`` failed: look at it again before the next request."""
        upstream.looked_at = 0.0

    def sent(self, upstream, model, keep_alive):
        """What a request just sent does to ``upstream``'s loaded models."""
        name = loaded_name(model)
        if self.several and name:
            if keep_alive_seconds(keep_alive) == 0:
                upstream.loaded = upstream.loaded - {name}
            else:
                upstream.loaded = upstream.loaded | {name}

    def describe(self):
        now = time.monotonic()
        return [{"upstream": u.base, "upstream_state": "up" if u.down_until <= now else "down",
                 "loaded": sorted(u.loaded)} for u in self.all]


def loaded_name(model):
    """``model`` as /api/ps names it: ``:latest`` added to a name without a tag."""
    if not isinstance(model, str) or not model.strip():
        return None
    model = model.strip()
    return model if ":" in model.rpartition("/")[2] else model + ":latest"


class QueueFull(Exception):
    """QUEUE_MAX waiters are in line already."""

    def __init__(self, waiting):
        super().__init__("%d waiting" % waiting)
        self.waiting = waiting


class SlotLine:
    """The line of those waiting for a GPU slot, shared by every worker
    process and by ``python -m gateway hold``: files in GPU_LOCK_DIR/queue,
    beside the slots, so that it needs nothing the slots do not (no Redis).

    - A waiter's ticket is ``<n>.ticket`` (n: CLOCK_MONOTONIC nanoseconds at
      arrival, taken under ``queue.lock``: one clock for every process of
      the box), JSON saying who waits, and the waiter holds an flock on it
      for as long as it waits. A ticket whose lock can be taken is dead (its
      waiter was killed, even by SIGKILL) and is removed: nothing dead ever
      blocks the line.
    - No polling: each waiter sleeps on its own unix datagram socket
      ``<n>.sock``. Whoever changes the line -- a slot freed, a waiter served
      or gone -- sends each waiter one datagram (``wake_all``); each then
      takes ``queue.lock`` and looks whether it is first (``turn``). Order
      and the try for the slot happen under that lock, so two waiters never
      both take the turn.
    - The slow fallback: a program holding the slot with flock(1), or a
      worker killed while holding it, sends nothing when the lock goes, and
      a waiter killed in line cannot either. So each waiter also looks every
      FALLBACK_S on its own; such a hand-over takes up to that long.
    - Fair between keys (``line_order``): ``served.json`` keeps when each
      key last got its turn.

    Every waiter wakes on every change, so positions stay current at once;
    the cost grows with the square of the line, which QUEUE_MAX keeps short.
    """

    FALLBACK_S = 0.5

    def __init__(self, lock_dir):
        self.dir = os.path.join(lock_dir, "queue")
        self.lock_path = os.path.join(self.dir, "queue.lock")
        self.served_path = os.path.join(self.dir, "served.json")

    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def join(self, place, holder, slots, bound=None):
        """(slot, None) when nobody waits and a slot is free, else (None, a
        new Ticket) at the end of the line. QueueFull with ``bound`` waiting."""
        with self._locked():
            waiting = self._live()
            if not waiting:
                slot = slots.try_take(holder, place)
                if slot is not None:
                    return slot, None
            if bound is not None and len(waiting) >= bound:
                raise QueueFull(len(waiting))
            return None, Ticket.issue(self.dir, place)

    def turn(self, ticket, holder, slots):
        """(slot, 0) when it is ``ticket``'s turn and a slot is free (the
        ticket leaves the line); else (None, its position, 1 = next)."""
        with self._locked():
            order = [name for name, _ in line_order(self._live(), self._served())]
            position = order.index(ticket.name) + 1 if ticket.name in order else 1
            if position > 1:
                return None, position
            slot = slots.try_take(holder, ticket.place)
            if slot is None:
                return None, position
            try:
                self._mark_served(ticket.place.get("key"))
            except OSError as error:  # a full disk costs the fairness record, never the slot just taken
                log.warning("could not record a key's turn in %s: %s", self.served_path, error)
            ticket.tear_down()
        self.wake_all()  # the next one may find another slot free; everyone moves up
        return slot, 0

    def leave(self, ticket):
        """The ticket leaves the line (served, timed out, or its client
        left); those behind it move up."""
        if ticket is None:
            return
        if not ticket.gone:
            with self._locked():
                ticket.tear_down()
            self.wake_all()
        ticket.close()

    def wake_all(self):
        """One datagram to every waiter: look at the line again."""
        try:
            names = [n for n in os.listdir(self.dir) if n.endswith(".sock")]
        except FileNotFoundError:
            return
        if not names:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as out:
            out.setblocking(False)
            for name in names:
                try:
                    out.sendto(b"!", os.path.join(self.dir, name))
                except OSError:  # dead (reaped soon), or its buffer full of wakes already
                    pass

    def describe(self):
        """The waiters in the order they will be served, for /slots and /metrics."""
        try:
            waiting = self._live(reap=False)
        except FileNotFoundError:
            return []
        return [{"position": n + 1, "task_id": place.get("task_id"), "path": place.get("path"),
                 "model": place.get("model"), "since": place.get("since"), "key": place.get("key"),
                 "pid": place.get("pid")}
                for n, (_, place) in enumerate(line_order(waiting, self._served()))]

    def _live(self, reap=True):
        """[(name, place)] of the live tickets, in arrival order; dead ones
        removed (under the lock only)."""
        live = []
        for entry in sorted(os.listdir(self.dir)):
            if not entry.endswith(".ticket"):
                continue
            name = entry[:-len(".ticket")]
            try:
                fd = os.open(os.path.join(self.dir, entry), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # its waiter holds it: alive
                try:
                    live.append((name, json.loads(os.pread(fd, 65536, 0) or b"{}")))
                except ValueError:
                    live.append((name, {}))
                continue
            finally:
                os.close(fd)
            if reap:
                _unlink(os.path.join(self.dir, name + ".ticket"), os.path.join(self.dir, name + ".sock"))
        return live

    def _served(self):
        try:
            with open(self.served_path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _mark_served(self, key):
        now = time.time()
        served = {k: t for k, t in self._served().items() if now - t < 3600}  # older is as good as never
        served[key or ""] = now
        temporary = self.served_path + ".new"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(served, f)
        os.replace(temporary, self.served_path)


def line_order(waiting, served):
    """``waiting`` ([(name, place)], in arrival order) in the order the
    line serves it: the next turn goes to the waiting key served least
    recently (``served``: key -> time of its last turn), and within a key
    to the first arrived. So one key's backlog of 50 keeps another key's
    one request waiting behind one of them, not fifty. Without keys
    (all None) this is arrival order."""
    by_key = {}
    for name, place in waiting:
        by_key.setdefault(place.get("key") or "", collections.deque()).append((name, place))
    last = {key: served.get(key, 0.0) for key in by_key}
    order, turn = [], 0
    while by_key:
        key = min(by_key, key=lambda k: (last[k], by_key[k][0][0]))
        order.append(by_key[key].popleft())
        if not by_key[key]:
            del by_key[key]
        turn += 1
        last[key] = 1e18 + turn  # as if served after everyone now waiting
    return order


class Ticket:
    """One waiter's place in the line (see ``SlotLine``): its ticket file,
    flocked for as long as it waits, and the datagram socket it sleeps on.
    ``sock`` is what ``UpstreamCall.abort`` shuts down on a hang-up or a
    DELETE while the request waits: the sleep ends at once."""

    def __init__(self, directory, name, place, fd, sock):
        self.base = os.path.join(directory, name)
        self.name = name
        self.place = place
        self.fd = fd
        self.sock = sock
        self.gone = False  # its files are removed: it is out of the line

    @classmethod
    def issue(cls, directory, place):
        """A new ticket, complete before it is seen: written under another
        name, then renamed (the flock stays with the file)."""
        name = "%020d" % time.monotonic_ns()
        base = os.path.join(directory, name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        fd = None
        try:
            sock.bind(base + ".sock")
            fd = os.open(base + ".new", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps(place).encode())
            os.rename(base + ".new", base + ".ticket")
        except BaseException:
            sock.close()
            if fd is not None:
                os.close(fd)
            _unlink(base + ".sock", base + ".new")
            raise
        return cls(directory, name, place, fd, sock)

    def wait(self, timeout):
        """Sleep until a wake, a shutdown of ``sock``, or ``timeout``."""
        readable, _, _ = select.select([self.sock], [], [], timeout)
        if readable:
            self.sock.setblocking(False)
            try:
                while self.sock.recv(16):  # the wakes that came meanwhile
                    pass
            except OSError:
                pass

    def tear_down(self):
        """Out of the line (under the line's lock)."""
        if not self.gone:
            self.gone = True
            _unlink(self.base + ".ticket", self.base + ".sock")

    def close(self):
        self.sock.close()
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def _unlink(*paths):
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _flock_holders():
    """{(major, minor, inode): pid} of every FLOCK in the kernel's table."""
    holders = {}
    try:
        with open("/proc/locks", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return holders
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or "->" in fields:
            continue
        try:
            major, minor, inode = fields[5].split(":")
            key = (int(major, 16), int(minor, 16), int(inode))
            holders[key] = int(fields[4])
            holders[(None, None, key[2])] = int(fields[4])
        except ValueError:
            continue
    return holders


# ================================================================ 5. the upstream call

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
    translation: "Translation" = None


def ollama_forward(gateway, exchange, request):
    """The request for Ollama: same method, path, query, body and end-to-end headers."""
    body = request.body
    if not body and not exchange.environ.get("CONTENT_LENGTH"):
        body = None  # the client sent no body: no Content-Length either
    headers = forwarded_headers(exchange.environ, bool(gateway.config.api_keys))
    if request.decoded:
        headers.pop("Content-Encoding", None)
    upstreams = gateway.upstreams
    if exchange.slot is not None:  # inference: the slot's own Ollama, which now loads the model (or unloads it)
        upstream = upstreams.of_slot(exchange.slot.index)
        document = request.document if isinstance(request.document, dict) else {}
        upstreams.sent(upstream, document.get("model"),
                       document.get("keep_alive", gateway.config.keep_alive_default))
    else:
        upstream = upstreams.first_healthy()
    exchange.upstream = upstream
    where = "the upstream" if not upstreams.several else "upstream %d (%s)" % (upstream.index, upstream.base)
    return Forward(upstream, "ollama", where, request.method,
                   upstream_target(exchange.environ, request.path), headers, body)


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


def give_model_its_lifetime(gateway, exchange, request):
    """The /v1 keep_alive load call (see ModelLifetimes)."""
    if not request.path.startswith("/v1/"):
        return
    document, upstream = request.document, exchange.upstream or gateway.upstream
    lifetimes = upstream.lifetimes
    keep_alive = document.get("keep_alive", gateway.config.keep_alive_default)
    model = document.get("model")
    if keep_alive in ("", None):
        return
    if not lifetimes.needed(model, keep_alive):
        lifetimes.used(model, keep_alive)  # this request restarts the lifetime it already has
        return
    gateway.metrics.count("load_calls")
    load_path = "/api/embed" if request.path in EMBEDDING_PATHS else "/api/generate"
    headers = forwarded_headers(exchange.environ, bool(gateway.config.api_keys))
    headers["Content-Type"] = "application/json"
    try:
        answer = upstream.send("POST", load_path, headers,
                                       json.dumps({"model": model, "keep_alive": keep_alive}).encode())
        _ = answer.content  # read it all, so that the connection goes back to the pool
    except requests.RequestException:
        return  # the request itself will meet the same problem and report it
    if answer.status_code == 404 and not _is_ollama_error(answer):
        # Ollama's own 404 (unknown model) is {"error": "..."}; anything
        # else means the route itself is missing.
        if lifetimes.native_api_gone():
            log.warning("the upstream answered 404 to %s: it does not speak Ollama's native API; "
                        "no more keep_alive load calls are sent", load_path)
    elif answer.status_code < 400:
        lifetimes.used(model, keep_alive)


def _is_ollama_error(response):
    try:
        return isinstance(response.json().get("error"), str)
    except (ValueError, AttributeError):
        return False


DURATION_PART_RE = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value):
    """Seconds of an Ollama keep_alive (a number of seconds or a Go duration);
    negative means forever (returns inf); None when it cannot be read."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _duration_text_seconds(value)
    else:
        return None
    if seconds is None:
        return None
    return float("inf") if seconds < 0 else seconds


@functools.lru_cache(maxsize=256)  # read twice per /v1 request, and nearly always the same few texts
def _duration_text_seconds(value):
    """Seconds of a number or Go duration in text; None when it is neither."""
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        parts = DURATION_PART_RE.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return None
        return sum(float(n) * DURATION_UNITS[u] for n, u in parts)


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


def send_upstream(exchange, forward):
    """The upstream's response, its body not yet read. A failure is named
    once, here: the client's hang-up or a DELETE if the exchange was cut,
    else what the upstream did."""
    exchange.provider = forward.provider
    try:
        return forward.upstream.send(forward.method, forward.target, forward.headers, forward.body)
    except requests.RequestException as error:
        if exchange.call.reason:
            raise abort_error(exchange)
        if forward.provider == "ollama" and _caused_by(error, CONNECT_FAILURES):
            exchange.gateway.upstreams.refused(forward.upstream)  # never sent: the next request goes elsewhere
        raise upstream_error(error, forward.provider, forward.upstream.base, exchange.gateway.retry_after)


def upstream_error(error, provider, base_url, retry_after=()):
    """Map a requests exception to the one error a client can act on, in
    words a person reads (never a library's repr of its connection pool)."""
    name = UPSTREAM_NAMES.get(provider, provider)
    if _caused_by(error, CONNECT_FAILURES):
        return GatewayError(503, "upstream_unreachable", "cannot connect to %s at %s: %s"
                            % (name, base_url, _plain_reason(error)), provider=provider,
                            stage="upstream_unreachable", headers=retry_after)
    if _caused_by(error, (urllib3.exceptions.ReadTimeoutError, socket.timeout)):
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
    if _caused_by(innermost, (http.client.IncompleteRead, urllib3.exceptions.IncompleteRead,
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


def _caused_by(error, kinds):
    """Whether ``kinds`` is anywhere in the chain around a failure."""
    return any(isinstance(link, kinds) for link in _chain(error))


def _short(error):
    text = str(error)
    return text if len(text) < 200 else text[:200] + "..."



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
        if body is not None:
            request.headers["Content-Length"] = str(len(body))
        request.body = body
        request.hooks = {"response": []}
        return self._adapter().send(request, stream=True, timeout=timeout or self.timeout)


# ================================================================ 6. relaying the answer

SSE_KEEPALIVE = b": keep-alive\n\n"
NDJSON_DONE_RE = re.compile(rb'"done"\s*:\s*true')
ANTHROPIC_STOP_RE = re.compile(rb'data:\s*\{\s*"type"\s*:\s*"message_stop"\s*\}\s*$')  # /v1/messages' last event
USAGE_RE = {
    "prompt_tokens": re.compile(rb'"(?:prompt_tokens|prompt_eval_count|input_tokens)"\s*:\s*(\d+)'),
    "completion_tokens": re.compile(rb'"(?:completion_tokens|eval_count|output_tokens)"\s*:\s*(\d+)'),
}
TAIL_BYTES = 8192
CHUNK_BYTES = 65536
_END = object()


def relay_answer(exchange, forward):
    """The upstream's answer, on its way to the client. An upstream error on
    /v1 (or one to be translated) is read and answered in the gateway's
    envelope; any other answer is relayed as it comes."""
    response = exchange.response
    exchange.note(upstream_status=response.status_code)
    if response.status_code >= 400 and (exchange.path.startswith("/v1/") or forward.translation):
        return answer_upstream_error(exchange, forward)
    if forward.translation and not forward.translation.stream_format:  # one document: translated before answering
        return exchange.answer(200, forward.translation.whole(exchange), outcome=outcome_of_answer(exchange, {}))
    if forward.translation:
        headers = [("Content-Type", forward.translation.content_type)]
        relay = Relay(exchange, forward.translation.stream_format, forward.translation.answer)
    else:
        named = {n.strip().lower() for n in response.headers.get("Connection", "").split(",")}
        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP
                   and k.lower() not in named and not k.lower().startswith("access-control-")]
        relay = Relay(exchange, stream_format(response))
    exchange.start(response.status_code, response.reason, headers)
    return relay


def answer_upstream_error(exchange, forward):
    """The upstream's error answer (1 MiB at most): its status and message."""
    try:
        raw = exchange.response.raw.read(1024 * 1024, decode_content=True)
    except Exception as error:
        raise upstream_failure(exchange, error)
    status_code = exchange.response.status_code
    message = _upstream_message(raw) or "the upstream answered %d" % status_code
    return exchange.fail(GatewayError(status_code, _upstream_code(status_code), message,
                                      provider=forward.provider, stage="upstream_error"))


def _upstream_message(raw):
    """The message of an Ollama error body: ``{"error": "..."}`` on /api,
    ``{"error": {"message": "..."}}`` from its OpenAI layer (and OpenAI)."""
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return raw.decode("utf-8", "replace")[:500] if raw else None
    if isinstance(error, dict):
        return error.get("message")
    return error if isinstance(error, str) else None


def _upstream_code(status_code):
    return {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
            429: "rate_limited"}.get(status_code, "upstream_error")


class Relay:
    """The WSGI response body of a proxied request (PEP 3333 iterable).

    It yields the upstream's bytes as they arrive (urllib3's ``read1``:
    chunk by chunk, no buffering, never decoded, so gzip stays as it came
    and ``Content-Length`` stays true). The exchange ends before the client
    can see the end of the answer -- for chunked bodies before the generator
    returns (gunicorn writes the last chunk after), for sized bodies before
    the last bytes are yielded -- so that a client's next request finds the
    slot free and the task final. ``close()``, which gunicorn calls also
    when the client went away (PEP 3333), ends it otherwise.
    """

    def __init__(self, exchange, stream_format, translate=None):
        self.exchange = exchange
        self.upstream = exchange.response
        self.stream_format = stream_format  # "sse", "ndjson" or None
        self.translate = translate  # chunks -> chunks, the answer in the client's shape (cloud route)
        self.length = None if translate else _content_length(self.upstream)
        self.tail = b""  # the last bytes relayed: token counts and end markers are read from it
        self.stop = threading.Event()
        self._body = self._relay()
        exchange.gateway.metrics.streams(+1)

    def __iter__(self):
        return self._handed_to_gunicorn()

    def _handed_to_gunicorn(self):
        """The body, noting since when gunicorn has been writing each piece:
        the watcher drops a client that stops reading (``Watcher._tick``)."""
        exchange = self.exchange
        for chunk in self._body:
            exchange.writing_since = time.monotonic()
            yield chunk
            exchange.writing_since = None

    def close(self):
        if self.stop.is_set():
            return
        self.stop.set()
        try:
            self._body.close()
        finally:
            self.exchange.gateway.metrics.streams(-1)
            # Cut short: the client left (or the relay failed). A stream
            # whose own end marker already passed was complete all the same.
            complete = answer_is_complete(self.tail, self.stream_format)
            self.exchange.close(outcome_of_answer(self.exchange, token_counts(self.tail)) if complete else None)

    def _upstream_chunks(self):
        raw = self.upstream.raw
        while True:
            chunk = raw.read1(CHUNK_BYTES, decode_content=False)  # what has arrived, as it came
            if not chunk:
                return
            yield chunk

    def _relay(self):
        exchange = self.exchange
        chunks = self._upstream_chunks()
        if self.translate:
            chunks = self.translate(chunks)
        if self.stream_format == "sse":
            chunks = read_ahead(chunks, self.stop, keepalive_every=exchange.gateway.config.heartbeat_sec)
        elif self.stream_format == "ndjson" or self.length is None:
            chunks = read_ahead(chunks, self.stop)
        sent = 0
        # An empty first item makes gunicorn send the status line and headers
        # now (gunicorn/http/wsgi.py, Response.write), so the client knows its
        # request was taken while the model is still thinking.
        yield b""
        try:
            for chunk in chunks:
                if chunk is SSE_KEEPALIVE:
                    yield chunk
                    continue
                if exchange.first_byte_at is None:
                    exchange.first_byte_arrived()
                sent += len(chunk)
                exchange.bytes_out = sent
                self.tail = chunk[-TAIL_BYTES:] if len(chunk) >= TAIL_BYTES else (self.tail + chunk)[-TAIL_BYTES:]
                if self.length is not None and sent >= self.length:
                    exchange.close(outcome_of_answer(exchange, token_counts(self.tail)))
                yield chunk
            if self.length is not None and sent < self.length:
                raise requests.exceptions.ChunkedEncodingError("upstream closed after %d of %d bytes"
                                                               % (sent, self.length))
            exchange.close(outcome_of_answer(exchange, token_counts(self.tail)))
        except Exception as error:  # the upstream failed (or was cut) mid-answer
            if answer_is_complete(self.tail, self.stream_format):
                exchange.close(outcome_of_answer(exchange, token_counts(self.tail)))
                return
            failure = upstream_failure(exchange, error)
            client_left = exchange.call.reason == "client_gone"
            exchange.close(Outcome.of(failure))
            event = self._error_event(failure)
            if event and not client_left:
                yield event
            elif self.length is not None and exchange.client_socket is not None:
                # The client was promised Content-Length bytes: end its
                # connection, so that it sees the answer cut short instead
                # of waiting for the rest on a kept-alive connection.
                try:
                    exchange.client_socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _error_event(self, failure):
        """The last event of a broken stream, in the stream's own format."""
        if self.stream_format == "sse":
            document = error_document(self.exchange.path, failure, self.exchange.task_id)
            event = b"event: error\n" if document.get("type") == "error" else b""  # Anthropic names its events
            return event + b"data: " + json.dumps(document).encode() + b"\n\n"
        if self.stream_format == "ndjson":
            return json.dumps(error_document("/api/", failure, self.exchange.task_id)).encode() + b"\n"
        return None


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


# ================================================================ 7. the watcher


def client_gone(sock):
    """True when the client closed its side (EOF or error), without reading."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


class Watcher:
    """One thread per worker process that watches every open exchange.

    How the gateway notices a dead client: gunicorn's gthread worker only
    learns it when a write fails (``gunicorn/workers/gthread.py``, the loop
    over the response iterable), and a silent upstream gives it nothing to
    write. So the client sockets (``environ["gunicorn.socket"]``) sit in an
    epoll set here; a FIN or RST makes one readable, a peek reads EOF, and the
    exchange is aborted within milliseconds. The same thread, every tick,
    writes the batched status updates and heartbeats and asks the store
    whether a DELETE from another worker cancelled one of our tasks.
    """

    TICK_S = 0.25

    def __init__(self, board, heartbeat_sec, client_send_timeout_s):
        self.board = board
        self.heartbeat_sec = heartbeat_sec
        self.client_send_timeout_s = client_send_timeout_s
        self.selector = selectors.DefaultSelector()
        self.exchanges = {}  # task_id -> Exchange
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="edgegate-watcher", daemon=True)
        self.thread.start()

    def watch(self, exchange):
        """From the claim of its task to its ending (``Exchange.close``)."""
        with self.lock:
            self.exchanges[exchange.task.store_id] = exchange
            if exchange.client_socket is not None:
                try:
                    self.selector.register(exchange.client_socket, selectors.EVENT_READ, exchange)
                except (ValueError, KeyError, OSError):
                    pass

    def unwatch(self, exchange):
        with self.lock:
            if self.exchanges.get(exchange.task.store_id) is exchange:
                del self.exchanges[exchange.task.store_id]
            self._unregister(exchange)

    def _unregister(self, exchange):
        try:
            self.selector.unregister(exchange.client_socket)
        except (ValueError, KeyError, OSError, TypeError):
            pass

    def local(self, task_id):
        with self.lock:
            return self.exchanges.get(task_id)

    def _run(self):
        next_tick = time.monotonic()
        while True:
            try:
                for key, _ in self.selector.select(timeout=0.1):
                    exchange = key.data
                    with self.lock:
                        # The event may be stale: that exchange ended and its
                        # kept-alive socket now serves the next request.
                        try:
                            if self.selector.get_key(key.fileobj).data is not exchange:
                                continue
                        except (KeyError, ValueError):
                            continue
                        self._unregister(exchange)  # gone, or the client pipelined bytes: stop watching
                    if client_gone(exchange.client_socket):
                        exchange.call.abort("client_gone")
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.TICK_S
                    self._tick()
            except Exception:  # the watcher must outlive any one failure
                log.exception("watcher tick failed")
                time.sleep(self.TICK_S)

    def _tick(self):
        with self.lock:
            exchanges = list(self.exchanges.values())
        if not exchanges:
            return
        status.flush_tasks(self.board, [e.task for e in exchanges], self.heartbeat_sec)
        now = time.monotonic()
        for exchange in exchanges:
            since = exchange.writing_since
            if since is not None and now - since > self.client_send_timeout_s:
                # Slow readers: gunicorn's socket has no send timeout, so a
                # client that stays connected but never reads would hold this
                # request's thread (and slot) for ever.
                self._drop_slow_reader(exchange)
        cancelled = self.board.call("cancels_among", [e.task.store_id for e in exchanges], default=set())
        for exchange in exchanges:
            if exchange.task.store_id in cancelled:
                cancel(exchange)

    @staticmethod
    def _drop_slow_reader(exchange):
        """The client has not taken a piece of its answer for
        CLIENT_SEND_TIMEOUT_S. Cut both sides: gunicorn's blocked write then
        fails with EPIPE (a client gone, logged at debug level only), and
        the exchange ends as cancelled."""
        exchange.call.abort("client_gone")
        _cut_client(exchange)


def cancel(exchange):
    """A DELETE: cut the upstream call; and the client too if gunicorn is
    blocked writing to it (a client that does not read would otherwise hold
    the thread and the slot until CLIENT_SEND_TIMEOUT_S)."""
    exchange.call.abort("cancelled")
    if exchange.writing_since is not None:
        _cut_client(exchange)


def _cut_client(exchange):
    if exchange.client_socket is not None:
        try:
            exchange.client_socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# ================================================================ 8. the ending

REASONS = {
    200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}
UPSTREAM_STAGES = ("upstream_error", "upstream_unreachable", "timeout")


@dataclasses.dataclass
class Outcome:
    """How an exchange ended, as its task records it."""

    state: str  # SUCCESS or FAILED
    stage: str
    message: str
    counts: dict = dataclasses.field(default_factory=dict)  # prompt_tokens, completion_tokens

    @classmethod
    def of(cls, error):
        return cls(FAILED, error.stage, error.message)


class Exchange:
    """One request and everything it holds: its task, its GPU slot, its
    upstream call and response, its place in the watcher.

    ``close(outcome)`` is the one ending of every request, whichever way it
    ends -- answered, refused before or after the slot, upstream failed,
    client gone, cancelled by DELETE, slow reader dropped, a bug of ours --
    and only its first call counts. An answer the gateway makes itself
    (``answer``, ``fail``) ends the exchange before its body is handed to
    gunicorn; a relayed answer ends it from ``Relay`` (see there).
    """

    def __init__(self, gateway, environ, start_response):
        self.gateway = gateway
        self.environ = environ
        self._start_response = start_response
        self.path = environ.get("PATH_INFO") or "/"
        self.method = environ.get("REQUEST_METHOD", "GET")
        self.started = time.monotonic()
        self.client_socket = environ.get("gunicorn.socket")
        self.task_id = None  # the X-Task-Id of a proxied request
        self.task = None  # its task, once claimed: only then does the ending write its state
        self.model = None
        self.stream = False
        self.provider = "ollama"  # who answers; named in errors
        self.call = UpstreamCall()
        self.slot = None
        self.slot_taken_at = None
        self.slot_wait_ms = None
        self.upstream = None  # the Ollama it was forwarded to (one of Upstreams.all)
        self.slot_index = None
        self.response = None  # the upstream's response
        self.first_byte_at = None
        self.writing_since = None  # set while gunicorn writes a piece of the answer to the client
        self.status_code = None
        self.bytes_out = 0
        self.cors_origin = None  # the request's Origin, when CORS_ORIGINS allows it
        self.key = None  # the ApiKey the request came with (keys on)
        self.answer_started = False  # a queued SSE stream's 200 went out while it waited (QueuedStream)
        self._write = None
        self.closed = False
        self._close_lock = threading.Lock()

    # -- the task

    def claim_task(self):
        task = status.Task(self.gateway.board, self.task_id, self.gateway.config.algorithm_id, self.method,
                           self.path, owner=self.key.name if self.key else None)
        task.extensions.update(model=self.model, stream=self.stream)
        if not task.claim():
            raise GatewayError(409, "task_id_in_use", "task %s is still pending or running" % self.task_id)
        self.task = task
        self.gateway.watcher.watch(self)

    def first_byte_arrived(self):
        self.first_byte_at = time.monotonic()
        ttft = self.first_byte_at - self.started
        self.gateway.metrics.observe("ttft", ttft)
        self.note(RUNNING, "streaming", "receiving the upstream's answer", ttft_ms=round(ttft * 1000, 1))

    def note(self, *change, **extensions):
        """A change of the task's document, when the exchange has a task."""
        if self.task is not None:
            self.task.set(*change, **extensions)

    # -- answering

    def start(self, status_code, reason, headers, exc_info=None):
        """Start the answer. It is counted now, so that /metrics shows a long stream that has begun.
        Returns PEP 3333's ``write``; once a queued stream has started, nothing more."""
        if self.answer_started:
            return self._write
        self.status_code = status_code
        self.gateway.metrics.request(self.path, status_code, self.key)
        if self.task_id:
            headers = list(headers) + [("X-Task-Id", self.task_id)]
        if self.cors_origin:
            headers = list(headers) + [("Access-Control-Allow-Origin", self.cors_origin), ("Vary", "Origin"),
                                       ("Access-Control-Expose-Headers", "X-Task-Id, Retry-After")]
        self._write = self._start_response("%d %s" % (status_code, reason or REASONS.get(status_code, "Unknown")),
                                           headers, exc_info)
        return self._write

    def answer(self, status_code, document, headers=(), outcome=None, exc_info=None,
               content_type="application/json"):
        """An answer of the gateway's own (a JSON document, or bytes of
        ``content_type``); the exchange ends before gunicorn sends it."""
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        if self.answer_started and isinstance(document, dict):  # its 200 went out while it queued
            body = queued_stream_event(document)
        self.start(status_code, None, [("Content-Type", content_type),
                                       ("Content-Length", str(len(body)))] + list(headers), exc_info)
        self.bytes_out = len(body)
        self.close(outcome)
        return [body]

    def fail(self, error, exc_info=None):
        """End with ``error``: its envelope to the client, FAILED for the task."""
        return self.answer(error.status, error_document(self.path, error, self.task_id), error.headers,
                           Outcome.of(error), exc_info)

    # -- the one ending

    def close(self, outcome=None):
        """End the exchange: let go of the upstream, free the GPU slot, write
        the task's last state, count it, and log its access line. With no
        ``outcome`` the request was cut short: the client went away, or a
        DELETE cancelled it. Only the first call counts."""
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        try:
            self._quietly(self._let_go_of_upstream)  # each step runs whatever the one before it did
            self._quietly(self._free_slot)
        finally:
            if self.task is not None:
                self.gateway.watcher.unwatch(self)
                self._finish_task(outcome or Outcome.of(abort_error(self)))
            access_log.write(exchange_access_line(self))

    def _quietly(self, step):
        """A step of the ending; a failure is logged, never raised into an answer already started."""
        try:
            step()
        except Exception:
            log.exception("ending %s %s: %s", self.method, printable(self.path), step.__name__)

    def _let_go_of_upstream(self):
        """A response read to its end goes back to the connection pool; any
        other is cut, which tells Ollama to stop generating."""
        response, self.response = self.response, None
        if response is not None and (self.call.reason is not None or not response.raw.isclosed()):
            self.call.abort(self.call.reason or "ended")  # also wakes a read blocked in another thread
            self.call.done()
            response.raw.close()
        else:
            self.call.done()
        if response is not None:
            response.raw.release_conn()

    def _free_slot(self):
        slot, self.slot = self.slot, None
        self.slot_index = slot.index if slot is not None else None  # for the access line
        if slot is not None:
            slot.release()
            self.gateway.metrics.observe("slot_hold", time.monotonic() - self.slot_taken_at, str(slot.index))

    def _finish_task(self, outcome):
        if outcome.state == FAILED and outcome.stage in UPSTREAM_STAGES:
            self.gateway.metrics.count("upstream_errors", outcome.stage)
        duration_ms = round((time.monotonic() - self.started) * 1000, 1)
        self.task.finish(outcome.state, outcome.stage, outcome.message, duration_ms=duration_ms, **outcome.counts)


def outcome_of_answer(exchange, counts):
    """The outcome of an upstream answer that arrived whole."""
    response = exchange.response
    if response is not None and response.status_code < 400:
        return Outcome(SUCCESS, "completed", "completed", counts)
    upstream_status = response.status_code if response is not None else None
    return Outcome(FAILED, "upstream_error", "the upstream answered %s" % upstream_status, counts)


def upstream_failure(exchange, error):
    """The GatewayError that names a failed upstream call of this exchange."""
    if exchange.call.reason:
        return abort_error(exchange)
    gateway = exchange.gateway
    upstream = gateway.cloud if exchange.provider == "openai" else (exchange.upstream or gateway.upstream)
    if upstream is exchange.upstream:
        gateway.upstreams.in_doubt(upstream)  # is it still there? looked at before the next request
    return upstream_error(error, exchange.provider, upstream.base, gateway.retry_after)


def abort_error(exchange):
    """Why an exchange was cut short: a DELETE, or the client went away."""
    if exchange.call.reason == "cancelled":
        return GatewayError(503, "cancelled", "task %s was cancelled by DELETE /tasks/%s"
                            % (exchange.task_id, exchange.task_id), stage="cancelled")
    return GatewayError(503, "cancelled", "the client went away", stage="cancelled")


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


def exchange_access_line(exchange):
    started = exchange.started
    gateway = exchange.gateway
    where = ""
    if gateway.upstreams.several and exchange.slot_index is not None:
        where = " slot=%d upstream=%s" % (exchange.slot_index, gateway.upstreams.of_slot(exchange.slot_index).base)
    return access_line(
        exchange.environ.get("REMOTE_ADDR"), exchange.method, exchange.path, exchange.status_code, started,
        exchange.task_id, exchange.model, exchange.slot_wait_ms,
        "%.1f" % ((exchange.first_byte_at - started) * 1000) if exchange.first_byte_at else None,
        exchange.bytes_out, exchange.key.name if exchange.key else None, where)


def printable(text):
    """``text`` for a log line: control and non-ASCII characters escaped, at most 200 characters."""
    text = text if isinstance(text, str) else repr(text)
    return text.encode("ascii", "backslashreplace").decode().translate(_CONTROL_ESCAPES)[:200]


_CONTROL_ESCAPES = {c: "\\x%02x" % c for c in list(range(32)) + [127]}


# ================================================================ 9. the gateway's own routes


def own_route(gateway, exchange):
    """/readyz, /slots, /tasks/status[/<id>], DELETE /tasks/<id>, /metrics."""
    path, method = exchange.path, exchange.method
    if path == "/readyz":
        return readyz(gateway, exchange)
    if path == "/slots" and method == "GET":
        return exchange.answer(200, seen_by(exchange.key, describe_slots(gateway)))
    if path == "/tasks/status" and method == "GET":
        return list_tasks(gateway, exchange)
    if path.startswith("/tasks/status/") and method == "GET":
        return exchange.answer(200, known_task(gateway, exchange, path[len("/tasks/status/"):])[1])
    if path.startswith("/tasks/") and method == "DELETE":
        return cancel_task(gateway, exchange, path[len("/tasks/"):])
    if path == "/metrics" and method == "GET":
        if not gateway.metrics.enabled:
            raise GatewayError(404, "not_found", "metrics need prometheus_client: pip install 'edgegate[metrics]'")
        return exchange.answer(200, gateway.metrics.exposition(),
                               content_type="text/plain; version=0.0.4; charset=utf-8")
    raise GatewayError(404, "not_found", "no route for %s %s" % (method, printable(path)))


def seen_by(key, seen):
    """/slots as ``key`` may see it: a key that is not admin sees the task
    ids, models and key names of its own tasks only."""
    if key is not None and not key.admin:
        for entry in seen["slots"] + seen["queue"]:
            if entry.get("key") != key.name:
                for private in ("task_id", "model", "key"):
                    entry.pop(private, None)
    return seen


def readyz(gateway, exchange):
    """200 when the upstream answers /api/version and the store answers.
    With several upstreams: each is listed, and one that answers is enough."""
    problems, upstreams = [], []
    for upstream in gateway.upstreams.all:
        problem = upstream_problem(gateway, upstream)
        upstreams.append({"upstream": upstream.base, "state": "down" if problem else "up",
                          **({"error": problem} if problem else {})})
    if all(u["state"] == "down" for u in upstreams):
        problems.append(("upstream", "; ".join(u["error"] for u in upstreams)))
    shown = {"upstreams": upstreams} if gateway.upstreams.several else {}
    try:
        gateway.board.query("ping")
    except status.StoreUnavailable as error:
        problems.append((error.provider, str(error)))
    if not problems:
        return exchange.answer(200, {"status": "ready", "store": gateway.board.provider, **shown})
    message = "not ready: " + "; ".join(p[1] for p in problems)
    upstream_first = problems[0][0] == "upstream"
    error = GatewayError(503, "upstream_unreachable" if upstream_first else "store_unavailable", message,
                         provider="ollama" if upstream_first else problems[0][0],
                         headers=[("X-Not-Ready", ", ".join(p[0] for p in problems))])
    return exchange.fail(error)


def upstream_problem(gateway, upstream):
    """None when ``upstream`` answers /api/version, else what is wrong, in
    words; a refusal also marks it down (``Upstreams.refused``)."""
    try:
        answer = upstream.send("GET", "/api/version", {"User-Agent": "edgegate-readyz"}, timeout=(1.0, 1.0))
        _ = answer.content  # read it all, so that the connection goes back to the pool
    except requests.RequestException as error:
        if _caused_by(error, CONNECT_FAILURES):
            gateway.upstreams.refused(upstream)
        return upstream_error(error, "ollama", upstream.base).message
    if answer.status_code >= 500:
        where = "the upstream" if not gateway.upstreams.several else "the upstream at %s" % upstream.base
        return "%s answered %d to /api/version" % (where, answer.status_code)
    return None


def describe_slots(gateway):
    """/slots: each slot (with several upstreams: its upstream, whether it is
    up, and what its Ollama has loaded), and the line."""
    slots = gateway.slots.describe()
    if gateway.upstreams.several:
        for entry, upstream in zip(slots, gateway.upstreams.describe()):
            entry.update(upstream)
    return {"slots": slots, "queue": gateway.slots.line.describe()}


def known_task(gateway, exchange, wanted):
    """(where it is kept, its document) of a task the caller may see, or 404.

    With API keys, each key has its own task ids and sees only its own
    tasks; another key's task is 404, never 403, so ids do not leak. An
    admin key sees every task: its own as ``<id>``, another key's as
    ``<key name>/<id>``, and one made without a key (``gateway hold``) as ``<id>``."""
    key = exchange.key
    owner, _, task_id = wanted.rpartition("/")
    if owner and (key is None or not key.admin or not KEY_NAME_RE.match(owner)):
        raise GatewayError(404, "not_found", "no task with that id")
    if not TASK_ID_RE.match(task_id):
        raise GatewayError(404, "not_found", "no task with that id")
    kept_as = status.store_id(task_id, owner or (key.name if key else None))
    document = gateway.board.query("get", kept_as)
    if document is None and key is not None and key.admin and not owner:
        kept_as = status.store_id(task_id)
        document = gateway.board.query("get", kept_as)
    if document is None:
        raise GatewayError(404, "not_found", "no task %s (unknown or expired)" % printable(wanted))
    return kept_as, document


def list_tasks(gateway, exchange):
    query = urllib.parse.parse_qs(exchange.environ.get("QUERY_STRING", ""))
    limit_text = query.get("limit", ["50"])[-1]
    if not (limit_text.isascii() and limit_text.isdigit()) or not 1 <= int(limit_text) <= 1000:
        raise GatewayError(400, "invalid_request", "limit must be a whole number from 1 to 1000")
    state = query.get("state", [None])[-1]
    if state is not None and state not in status.STATES:
        raise GatewayError(400, "invalid_request", "state must be one of %s" % ", ".join(status.STATES))
    key = exchange.key
    items = gateway.board.query("recent", int(limit_text), state, key.name if key and not key.admin else None)
    return exchange.answer(200, {"items": items, "count": len(items)})


def cancel_task(gateway, exchange, task_id):
    """DELETE /tasks/<id>: cancel it wherever it runs, and wait (briefly)
    to answer with its final document."""
    kept_as, document = known_task(gateway, exchange, task_id)
    if document["state"] not in status.LIVE_STATES:
        raise GatewayError(409, "task_finished", "task %s has already finished (%s)"
                           % (printable(task_id), document["state"]))
    local = gateway.watcher.local(kept_as)
    if local is not None:
        cancel(local)
    else:
        gateway.board.query("request_cancel", kept_as)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        time.sleep(0.05)
        document = gateway.board.query("get", kept_as) or document
        if document["state"] not in status.LIVE_STATES:
            return exchange.answer(200, document)
    return exchange.answer(202, document)


# ================================================================ 10. metrics


class Metrics:
    """Prometheus metrics, summed over all workers (README, "Metrics").

    ``prometheus_client`` is an optional extra (``pip install
    'edgegate[metrics]'``); without it every method here does nothing and
    ``/metrics`` answers 404 saying what to install. Its multiprocess mode
    keeps each worker's values in files under ``STATE_DIR/metrics``, which
    gunicorn.conf.py empties when the server starts; the library reads the
    directory from PROMETHEUS_MULTIPROC_DIR when it is first imported, so it
    is set here, after the fork and before that import.
    """

    ROUTE_CLASSES = (("/v1/", "proxy"), ("/api/", "proxy"), ("/tasks/", "tasks"), ("/slots", "slots"),
                     ("/metrics", "metrics"), ("/healthz", "health"), ("/readyz", "health"))

    def __init__(self, directory, slots):
        self.slots = slots
        self.enabled = False
        os.makedirs(directory, exist_ok=True)
        # Set, not defaulted: a PROMETHEUS_MULTIPROC_DIR inherited from the
        # environment would take the values to a directory that
        # gunicorn.conf.py does not empty, summing in another run's.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        try:
            import prometheus_client as prom
            from prometheus_client import multiprocess
            from prometheus_client.core import GaugeMetricFamily
        except ImportError:
            return
        self.prom, self.multiprocess, self.GaugeMetricFamily = prom, multiprocess, GaugeMetricFamily
        seconds = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
        own = {"registry": None}  # the values live in the multiprocess files, read at scrape time
        self.requests = prom.Counter("edgegate_requests_total",
                                     "Requests answered, by route class, status and API key name",
                                     ["route", "status", "key"], **own)
        self.gpu_busy = prom.Counter("edgegate_gpu_busy_total", "Inference requests refused with 503 gpu_busy",
                                     **own)
        self.slot_wait = prom.Histogram("edgegate_slot_wait_seconds", "Time spent waiting for a GPU slot",
                                        buckets=seconds, **own)
        self.slot_hold = prom.Histogram("edgegate_slot_hold_seconds", "Time a GPU slot was held, by slot",
                                        ["slot"], buckets=seconds, **own)
        self.ttft = prom.Histogram("edgegate_time_to_first_token_seconds",
                                   "From a request's arrival to the upstream's first body byte", buckets=seconds,
                                   **own)
        self.upstream_errors = prom.Counter("edgegate_upstream_errors_total", "Failed upstream calls, by kind",
                                            ["kind"], **own)
        self.store_errors = prom.Counter("edgegate_store_errors_total", "Failed task store calls", **own)
        self.load_calls = prom.Counter("edgegate_keep_alive_load_calls_total",
                                       "keep_alive load calls sent before /v1 requests", **own)
        self.queue_wait = prom.Histogram("edgegate_queue_wait_seconds", "Time spent waiting in the GPU line",
                                         buckets=seconds, **own)
        self.gpu_refusals = prom.Counter("edgegate_gpu_refusals_total",
                                         "Inference requests refused for the GPU, by reason (busy, queue_full)",
                                         ["reason"], **own)
        self.open_streams = prom.Gauge("edgegate_open_streams", "Responses being relayed now",
                                       multiprocess_mode="livesum", **own)
        self.enabled = True

    def request(self, path, status_code, key=None):
        if self.enabled:
            route = next((name for prefix, name in self.ROUTE_CLASSES if path.startswith(prefix)), "other")
            if path in INFERENCE_ROUTES:
                route = "inference"
            self.requests.labels(route, str(status_code or "-"), key.name if key else "-").inc()

    def observe(self, histogram, seconds, label=None):
        if self.enabled:
            metric = getattr(self, histogram)
            (metric if label is None else metric.labels(label)).observe(seconds)

    def count(self, counter, label=None):
        if self.enabled:
            metric = getattr(self, counter)
            (metric.labels(label) if label else metric).inc()

    def streams(self, change):
        if self.enabled:
            self.open_streams.inc(change)

    def exposition(self):
        """The text of /metrics: every worker's values, and the slots now."""
        registry = self.prom.CollectorRegistry()
        self.multiprocess.MultiProcessCollector(registry)
        held = sum(1 for slot in self.slots.describe() if slot["state"] == "held")
        slots = self.GaugeMetricFamily("edgegate_gpu_slots", "GPU slots by state", labels=["state"])
        slots.add_metric(["held"], held)
        slots.add_metric(["free"], len(self.slots.paths) - held)
        waiting = self.GaugeMetricFamily("edgegate_queue_length", "Waiters in the GPU line now (all workers, "
                                         "and python -m gateway hold)", value=len(self.slots.line.describe()))
        registry.register(_Fixed([slots, waiting]))
        return self.prom.generate_latest(registry)


class _Fixed:
    """A Prometheus collector that returns metric families made at scrape time."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


# ================================================================ 11. the cloud route

CLOUD_PREFIX = "openai/"
CLOUD_PATHS = "/v1/* and /api/chat"


def is_cloud_model(document):
    model = document.get("model") if document else None
    return isinstance(model, str) and model.startswith(CLOUD_PREFIX)


def cloud_forward(gateway, exchange, request):
    """README, "Cloud route": ``openai/<model>`` goes to OPENAI_BASE_URL with
    the gateway's key and no GPU slot; /v1 as it is, /api/chat translated to
    a chat completion, and its answer back to Ollama's shape. This is the
    route's one seam with the core: a Forward, with a Translation or not."""
    config, document = gateway.config, request.document
    if not config.openai_api_key:
        raise GatewayError(503, "provider_not_configured",
                           "model %s needs the cloud route: set OPENAI_API_KEY" % document["model"],
                           provider="openai", stage="upstream_unreachable")
    if not (request.path.startswith("/v1/") or request.path == "/api/chat"):
        raise GatewayError(400, "invalid_request", "the cloud route (openai/...) serves %s" % CLOUD_PATHS)
    model = document["model"][len(CLOUD_PREFIX):]
    headers = forwarded_headers(exchange.environ, strip_keys=True)
    headers["Authorization"] = "Bearer " + config.openai_api_key
    headers["Content-Type"] = "application/json"
    if request.path != "/api/chat":
        body = json.dumps(dict(document, model=model)).encode()
        return Forward(gateway.cloud, "openai", "the cloud (openai)", "POST",
                       upstream_target(exchange.environ, request.path), headers, body)
    chat = ollama_chat_to_openai(document, model)
    headers["Accept-Encoding"] = "identity"  # the translation reads the answer's bytes
    return Forward(gateway.cloud, "openai", "the cloud (openai)", "POST", "/v1/chat/completions", headers,
                   json.dumps(chat).encode(), Translation(document["model"], chat["stream"]))


class Translation:
    """The cloud's chat completion as Ollama's /api/chat answer: NDJSON lines
    when streaming, one JSON document otherwise."""

    def __init__(self, model, stream):
        self.model = model
        self.stream_format = "ndjson" if stream else None
        self.content_type = "application/x-ndjson" if stream else "application/json"

    def answer(self, chunks):
        return openai_stream_to_ollama(chunks, self.model)

    def whole(self, exchange):
        """A non-streamed answer, read whole (16 MiB at most) and translated
        before the client is answered: a broken one is a 502, never a 200."""
        try:
            raw = exchange.response.raw.read(16 * 1024 * 1024, decode_content=True)
            document = openai_answer_to_ollama(json.loads(raw), self.model, exchange.started)
        except (ValueError, AttributeError, TypeError) as error:
            raise GatewayError(502, "upstream_error", "the cloud's answer is not a chat completion: %s"
                               % _short(error), provider="openai", stage="upstream_error")
        except Exception as error:
            raise upstream_failure(exchange, error)
        exchange.note(prompt_tokens=document["prompt_eval_count"], completion_tokens=document["eval_count"])
        return document


def _iso_now():
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"


def ollama_chat_to_openai(document, model):
    """An Ollama /api/chat request as an OpenAI chat completion request."""
    request = {"model": model, "messages": [_openai_message(m, n) for n, m in enumerate(document.get("messages") or [])]}
    stream = document.get("stream", True) is not False  # Ollama streams unless told not to
    request["stream"] = stream
    if stream:
        request["stream_options"] = {"include_usage": True}
    options = document.get("options") or {}
    for ollama_name, openai_name in (("temperature", "temperature"), ("top_p", "top_p"), ("stop", "stop"),
                                     ("seed", "seed"), ("presence_penalty", "presence_penalty"),
                                     ("frequency_penalty", "frequency_penalty")):
        if options.get(ollama_name) is not None:
            request[openai_name] = options[ollama_name]
    if isinstance(options.get("num_predict"), int) and options["num_predict"] > 0:  # -1 and -2 mean no limit
        request["max_tokens"] = options["num_predict"]
    form = document.get("format")
    if form == "json":
        request["response_format"] = {"type": "json_object"}
    elif isinstance(form, dict):
        request["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": form}}
    if document.get("tools"):
        request["tools"] = [dict(tool, type=tool.get("type", "function")) for tool in document["tools"]]
    return request


def _openai_message(message, position):
    converted = {"role": message.get("role", "user"), "content": message.get("content", "")}
    if message.get("images"):
        converted["content"] = [{"type": "text", "text": converted["content"]}] + [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}
            for image in message["images"]]
    if message.get("tool_calls"):
        converted["tool_calls"] = [
            {"id": "call_%d_%d" % (position, n), "type": "function",
             "function": {"name": call["function"]["name"],
                          "arguments": json.dumps(call["function"].get("arguments", {}))}}
            for n, call in enumerate(message["tool_calls"])]
    if converted["role"] == "tool":
        converted["tool_call_id"] = message.get("tool_call_id") or message.get("tool_name") or "call"
    return converted


def _ollama_tool_calls(calls):
    """OpenAI tool calls (arguments as a JSON string) in Ollama's shape (an object)."""
    converted = []
    for call in calls:
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = {"_raw": function.get("arguments")}
        converted.append({"function": {"name": function.get("name"), "arguments": arguments}})
    return converted


def _ollama_final(model, finish_reason, usage, started):
    return {"model": model, "created_at": _iso_now(), "message": {"role": "assistant", "content": ""},
            "done": True, "done_reason": "length" if finish_reason == "length" else "stop",
            "total_duration": int((time.monotonic() - started) * 1e9),
            "prompt_eval_count": (usage or {}).get("prompt_tokens", 0),
            "eval_count": (usage or {}).get("completion_tokens", 0)}


def openai_answer_to_ollama(answer, model, started):
    """A non-streamed chat completion as Ollama's /api/chat answer."""
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    document = _ollama_final(model, choice.get("finish_reason"), answer.get("usage"), started)
    document["message"] = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("tool_calls"):
        document["message"]["tool_calls"] = _ollama_tool_calls(message["tool_calls"])
    return document


class CloudError(Exception):
    """An error event inside the cloud's stream."""


def openai_stream_to_ollama(chunks, model):
    """OpenAI's SSE chunks in, Ollama's NDJSON lines out: one line per
    content delta, tool calls (assembled from their fragments) in one line
    when complete, and a last ``done: true`` line with the token counts."""
    started = time.monotonic()
    pending, tool_calls, finish_reason, usage = b"", {}, None, None

    def line(document):
        return json.dumps(document).encode() + b"\n"

    def ending():
        out = b""
        if tool_calls:
            calls = [tool_calls[i] for i in sorted(tool_calls)]
            out += line({"model": model, "created_at": _iso_now(), "done": False,
                         "message": {"role": "assistant", "content": "", "tool_calls": _ollama_tool_calls(calls)}})
        return out + line(_ollama_final(model, finish_reason, usage, started))

    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        out = b""
        for raw in lines:
            raw = raw.strip()
            if not raw.startswith(b"data:"):
                continue  # blank separators, comments, event names
            data = raw[5:].strip()
            if data == b"[DONE]":
                yield out + ending()
                return
            event = json.loads(data)
            if event.get("error"):
                error = event["error"]
                raise CloudError(error.get("message") if isinstance(error, dict) else str(error))
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                finish_reason = choice.get("finish_reason") or finish_reason
                for fragment in delta.get("tool_calls") or []:
                    call = tool_calls.setdefault(fragment.get("index", 0),
                                                 {"function": {"name": "", "arguments": ""}})
                    function = fragment.get("function") or {}
                    call["function"]["name"] += function.get("name") or ""
                    call["function"]["arguments"] += function.get("arguments") or ""
                if delta.get("content"):
                    out += line({"model": model, "created_at": _iso_now(), "done": False,
                                 "message": {"role": "assistant", "content": delta["content"]}})
        if out:
            yield out
    raise CloudError("the cloud stream ended without [DONE]")


# ================================================================ 12. entry points


app = Gateway(load_config())


def _masked(config):
    """The configuration as ``check`` prints it: secrets shown as ***."""
    shown = dataclasses.asdict(config)
    shown["api_keys"] = "%d key(s): %s" % (len(config.api_keys), ", ".join(
        k.name + (" (admin)" if k.admin else "") for k in config.api_keys)) if config.api_keys else ""
    for secret in ("redis_password", "openai_api_key"):
        if shown[secret]:
            shown[secret] = "***"
    if config.redis_url:
        parts = urllib.parse.urlsplit(config.redis_url)
        if parts.password:
            netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
            shown["redis_url"] = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return shown


def check(gateway, out=sys.stdout):
    """``python -m gateway check``: the effective configuration (secrets
    masked), whether the upstream and the store answer, and the slots. What
    an operator runs first when something is off. Returns the exit status."""
    ok = True
    print("configuration:", file=out)
    for name, value in _masked(gateway.config).items():
        print("  %-22s %s" % (name, value), file=out)
    for upstream in gateway.upstreams.all:  # one per GPU when there are several
        try:
            answer = upstream.send("GET", "/api/version", {"User-Agent": "edgegate-check"}, timeout=(2, 2))
            print("upstream:  %s answered %d %s" % (upstream.base, answer.status_code,
                                                    answer.text.strip()[:80]), file=out)
            ok = ok and answer.status_code < 400
        except requests.RequestException as error:
            print("upstream:  %s does NOT answer: %s" % (upstream.base,
                                                         upstream_error(error, "ollama", upstream.base).message),
                  file=out)
            ok = False
    store = status.open_store(gateway.config)
    try:
        store.ping()
        print("store:     %s answers" % store.provider, file=out)
    except Exception as error:
        print("store:     %s does NOT answer: %s" % (store.provider, error), file=out)
        ok = False
    for slot in gateway.slots.describe():
        holder = "" if slot["state"] == "free" else " by pid %s%s" % (
            slot.get("pid"), " (task %s)" % slot["task_id"] if slot.get("task_id") else "")
        print("slot %d:    %s%s  [%s]" % (slot["slot"], slot["state"], holder, slot["lock_file"]), file=out)
    return 0 if ok else 1


class Hold:
    """``python -m gateway hold [--wait SECONDS] -- COMMAND ARGS...``: give
    the GPU to another program, safely (README, "Sharing the GPU slot").

    It joins the same line as the gateway's requests, takes the slot, has
    Ollama unload every loaded model (``keep_alive`` 0 for each model
    ``/api/ps`` lists, then until ``/api/ps`` is empty or UNLOAD_TIMEOUT_S),
    runs the command with the slot held, lets go when it exits, and exits
    with its exit status. The slot is an flock, so a ``kill -9`` of this
    process frees it too; the command does not inherit it (O_CLOEXEC). It is
    a task (path ``hold``, the command's name as model) like any request:
    /slots and /tasks/status show it, and DELETE /tasks/<id> ends it.
    Exit status 75 (EX_TEMPFAIL) when the slot did not come within --wait.
    """

    UNLOAD_TIMEOUT_S = 30.0
    BUSY_EXIT = 75

    def __init__(self, gateway, command, wait_s=None, slots=None):
        self.gateway, self.command, self.wait_s = gateway, command, wait_s
        self.wanted = slots  # None: any one slot; else these slots, each taken in turn (--slot N, --all)
        config = gateway.config
        self.board = status.TaskBoard(status.open_store(config))
        self.task = status.Task(self.board, "hold-%d-%s" % (os.getpid(), uuid.uuid4().hex[:8]),
                                config.algorithm_id, "HOLD", "hold")
        self.task.extensions.update(model=os.path.basename(command[0]))
        self.child = None
        self.cancelled = False  # by DELETE /tasks/<id> while it waited
        self.stop = threading.Event()

    def run(self):
        self.task.claim()
        threading.Thread(target=self._heartbeat, name="edgegate-hold", daemon=True).start()
        taken = []
        try:
            deadline = None if self.wait_s is None else time.monotonic() + self.wait_s
            for wanted in ([None] if self.wanted is None else [[n] for n in self.wanted]):
                slot = self._take(wanted, deadline)
                if slot is None:
                    break
                taken.append(slot)
            if slot is None:
                why = "cancelled by DELETE" if self.cancelled else "no GPU slot within %s s" % self.wait_s
                self.task.finish(FAILED, "cancelled" if self.cancelled else "gpu_busy", why)
                print("edgegate hold: %s" % why, file=sys.stderr)
                return self.BUSY_EXIT
            self.task.set(RUNNING, "unloading", "asking Ollama to unload its models")
            for upstream in {self.gateway.upstreams.of_slot(slot.index).base: self.gateway.upstreams.of_slot(
                    slot.index) for slot in taken}.values():  # only the Ollama(s) whose slot it holds
                self._unload_models(upstream)
            return self._run_command()
        except SystemExit:  # a signal while it waited (``signalled``)
            self.task.finish(FAILED, "cancelled", "stopped by a signal")
            raise
        finally:
            self.stop.set()
            for slot in taken:
                slot.release()

    def _take(self, wanted, deadline):
        now = round(time.time(), 3)
        holder = {"pid": os.getpid(), "task_id": self.task.task_id, "path": "hold", "since": now}
        place = dict(holder, model=self.task.extensions["model"], key="hold", slots=wanted)
        line = self.gateway.slots.line
        slot, ticket = line.join(place, holder, self.gateway.slots)
        if slot is not None:
            return slot
        try:
            return wait_turn(self.gateway.slots, ticket, holder, deadline,
                             moved=lambda position: self.task.set(queue_position=position or None),
                             stopped=self.stop.is_set)
        finally:
            line.leave(ticket)

    def _unload_models(self, upstream):
        deadline = time.monotonic() + self.UNLOAD_TIMEOUT_S
        try:
            loaded = self._loaded(upstream)
            for model in loaded:
                body = json.dumps({"model": model, "keep_alive": 0}).encode()
                upstream.send("POST", "/api/generate", {"Content-Type": "application/json"}, body).close()
            while loaded and time.monotonic() < deadline:
                time.sleep(0.1)
                loaded = self._loaded(upstream)
        except (requests.RequestException, ValueError) as error:
            print("edgegate hold: could not ask Ollama to unload (%s); running the command anyway"
                  % _short(error), file=sys.stderr)
            return
        if loaded:
            print("edgegate hold: still loaded after %.0f s: %s; running the command anyway"
                  % (self.UNLOAD_TIMEOUT_S, ", ".join(loaded)), file=sys.stderr)

    def _loaded(self, upstream):
        answer = upstream.send("GET", "/api/ps", {"User-Agent": "edgegate-hold"}, timeout=(2, 5))
        return [m.get("name") or m.get("model") for m in answer.json().get("models", [])]

    def _run_command(self):
        self.task.set(RUNNING, "holding", "running %s with the GPU slot held" % printable(self.command[0]))
        try:
            self.child = subprocess.Popen(self.command)
        except OSError as error:
            self.task.finish(FAILED, "command_failed", "cannot run %s: %s" % (printable(self.command[0]),
                                                                             error.strerror))
            print("edgegate hold: cannot run %s: %s" % (self.command[0], error.strerror), file=sys.stderr)
            return 127
        code = self.child.wait()
        code = 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N
        if code == 0:
            self.task.finish(SUCCESS, "completed", "the command exited with status 0")
        else:
            self.task.finish(FAILED, "command_failed", "the command exited with status %d" % code)
        return code

    def _heartbeat(self):
        """The task's writes and heartbeat, as a worker's watcher does; and a
        DELETE: it ends the wait, or sends the command SIGTERM."""
        while not self.stop.wait(Watcher.TICK_S):
            status.flush_tasks(self.board, [self.task], self.gateway.config.heartbeat_sec)
            if self.task.task_id in self.board.call("cancels_among", [self.task.task_id], default=set()):
                if self.child is None:
                    self.cancelled = True
                    self.stop.set()
                elif self.child.poll() is None:
                    self.child.terminate()

    def signalled(self, signum, frame):
        """SIGTERM, SIGINT, SIGHUP: passed to the command; while waiting, leave the line."""
        if self.child is not None:
            self.child.send_signal(signum)
        else:
            raise SystemExit(128 + signum)


def hold_command(gateway, argv):
    """Parse ``[--wait SECONDS] [--slot N | --all] -- COMMAND ARGS...`` and run a Hold."""
    wait_s, slots, count = None, None, gateway.config.gpu_slots
    while argv[:1] in (["--wait"], ["--slot"], ["--all"]):
        if argv[0] == "--all":
            slots, argv = list(range(count)), argv[1:]
            continue
        if len(argv) < 2:
            break
        if argv[0] == "--slot":
            if not argv[1].isdigit() or int(argv[1]) >= count:
                print("edgegate hold: --slot expects a slot number from 0 to %d, got %r" % (count - 1, argv[1]),
                      file=sys.stderr)
                return 2
            slots = [int(argv[1])]
        else:
            try:
                wait_s = float(argv[1])
            except ValueError:
                wait_s = -1
            if wait_s < 0:
                print("edgegate hold: --wait expects seconds, got %r" % argv[1], file=sys.stderr)
                return 2
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m gateway hold [--wait SECONDS] [--slot N | --all] -- COMMAND ARGS...",
              file=sys.stderr)
        return 2
    hold = Hold(gateway, argv, wait_s, slots)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, hold.signalled)
    return hold.run()


if __name__ == "__main__":
    if sys.argv[1:2] == ["hold"]:
        raise SystemExit(hold_command(app, sys.argv[2:]))
    if sys.argv[1:] != ["check"]:
        print("usage: python -m gateway check | hold [--wait SECONDS] [--slot N | --all] -- COMMAND ARGS...",
              file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(check(app))
