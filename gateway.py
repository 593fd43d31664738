"""edgegate: a small threaded WSGI gateway in front of a local Ollama daemon.

Run it with ``gunicorn -c gunicorn.conf.py gateway:app``. Clients (the OpenAI
SDK, the ``ollama`` client, curl) change only their base URL. Between client
and Ollama the gateway adds one shared GPU slot, a ``keep_alive`` default,
per-request task status (``status.py``) and one error envelope. The README is
the contract.

This file tells a request's story, top to bottom in the order the request
meets it; each module it calls on has one job:

    1. the app             ``Gateway.__call__``: the key, the route
    2. the proxy's steps   ``proxy``: task id -> body (edgegate_body.py) ->
                           task -> quota (edgegate_usage.py) -> GPU slot
                           (edgegate_slots.py) -> forward
                           (edgegate_upstream.py, edgegate_cloud.py) -> relay
                           (edgegate_relay.py)
    3. the exchange        ``Exchange``: what a request holds, and its one
                           ending, ``Exchange.close``
    4. the watcher         a client that left, a DELETE, a slow reader
    5. the own routes      /tasks, /slots, /readyz, /usage, /metrics, the
                           live page /ui (edgegate_ui.py)
    6. entry points        ``app``, ``python -m gateway check`` and ``hold``
                           (edgegate_check.py, edgegate_hold.py)

Configuration is edgegate_config.py, errors and the access log
edgegate_errors.py, metrics edgegate_metrics.py, usage per key and model
edgegate_usage.py (added to by the exchange's ending); importing this module reads
no configuration and starts nothing (``app`` is configured by
gunicorn.conf.py when gunicorn starts).

The two questions an auditor asks -- is the GPU slot always freed, and does
every task end with a final state? -- are answered by ``Exchange.close``
(section 3), which every request goes through exactly once, and by
edgegate_slots.py, where a slot is handed to its exchange the moment it is taken.
"""

import dataclasses
import hmac
import json
import logging
import os
import re
import selectors
import socket
import sys
import threading
import time
import urllib.parse
import uuid

import requests

import status
from edgegate_batch import BATCH_ITEM, Batches
from edgegate_batch_api import batch_route, is_batch_route
from edgegate_body import read_request
from edgegate_check import check
from edgegate_spool import BodyRoom, give_back_given_share
from edgegate_cloud import cloud_forward
from edgegate_config import KEY_NAME_RE, load_config
from edgegate_errors import GatewayError, access_line, access_log, error_document, printable, status_line
from edgegate_hold import hold_command
from edgegate_metrics import Metrics
from edgegate_relay import Relay, sse_error_event, stream_format
from edgegate_remote import RemoteModels
from edgegate_slots import GpuSlots, QueueFull, wait_turn
from edgegate_ui import LivePage, LoadedModels, live_state
from edgegate_upstream import (
    CONNECT_FAILURES, HOP_BY_HOP, Forward, Upstream, UpstreamCall, Upstreams, caused_by, forwarded_headers,
    give_model_its_lifetime, upstream_call_of_this_thread, upstream_error, upstream_target)
from edgegate_usage import (
    NO_KEY, KnownModels, Quotas, Usage, day_of, day_start, open_usage, seconds_to_midnight, usage_report)
from status import FAILED, RUNNING, SUCCESS

log = logging.getLogger("edgegate")

# ================================================================ 1. the app


class Gateway:
    """The WSGI application: per worker process, the services every request
    uses (the GPU slots, the upstreams, the task board, the watcher, metrics).

        from gateway import Gateway
        from edgegate_config import Config
        app = Gateway(Config.from_environ())

    Nothing starts at construction: threads, connections and the store come
    up on the first request in each worker process, after gunicorn's fork.
    """

    def __init__(self, config):
        self.config = config
        self.upstreams = Upstreams(config)  # one per GPU; slot i is upstream i's when there are several
        self.slots = GpuSlots(config.gpu_lock_dir, config.gpu_slots,
                              self.upstreams.choice.choose if self.upstreams.several else None)
        self.retry_after = [("Retry-After", str(config.retry_after_s))]
        self.bodies = BodyRoom(config)  # where request bodies are kept, and the budget for parsing them
        self.remote_models = RemoteModels()  # local names that Ollama forwards elsewhere (edgegate_remote.py)
        self.cloud = Upstream(config.openai_base_url, config.connect_timeout_s, config.read_timeout_s,
                              config.upstream_retries)
        self.metrics = Metrics(None, self.slots, enabled=False)  # until this process has started its own
        self.live_page = LivePage()
        self.loaded_models = LoadedModels(self.upstreams.all, (config.connect_timeout_s, 1.0))
        self._pid = None
        self._start_lock = threading.Lock()
        self._threads = {}  # (service, pid) -> a service with a thread of its own (``_once``)

    def _start_in_this_process(self):
        """The services of this worker process, on its first request. A
        failure here is that request's (answered in the envelope by
        ``__call__``), and the next request tries again."""
        with self._start_lock:
            if self._pid == os.getpid():
                return
            metrics = Metrics(os.path.join(self.config.state_dir, "metrics"), self.slots)
            self.board = status.TaskBoard(status.open_store(self.config), on_failure=metrics.store_failed)
            self.board.tidy()  # the first release's Redis keys (README, "Task status")
            self.usage = open_usage(self.config, self.board.store)  # beside the tasks (README, "Usage and quotas")
            self.quotas = Quotas(self.usage)
            self.batches = Batches(self.config, self, metrics)  # README, "Batches"
            metrics.batch_counts = self.batches.counts_by_status
            # The threads last, each started once in this process: a start that failed and is
            # tried again on the next request leaves no thread of its own behind.
            self.watcher = self._once("watcher", lambda: Watcher(self.board, self.config.heartbeat_sec,
                                                                 self.config.client_send_timeout_s))
            self.watcher.board = self.board
            self.models = self._once("models", lambda: KnownModels(self.upstreams).start())  # metrics' model label
            self.metrics, self._pid = metrics, os.getpid()
            self.batches.runner.start()

    def _once(self, name, start):
        """This process's ``name`` service, started by ``start()`` the first time only."""
        key = (name, os.getpid())
        if key not in self._threads:
            self._threads[key] = start()
        return self._threads[key]

    def start_here(self):
        """Start this worker's services now (gunicorn.conf.py, ``post_worker_init``):
        the batch runner must not wait for a first request after a restart.
        A failure is logged, never fatal (a worker that cannot boot would stop
        gunicorn): the first request tries again."""
        try:
            if self._pid != os.getpid():
                self._start_in_this_process()
        except Exception:
            log.exception("worker %d could not start its services; its first request tries again", os.getpid())

    def __call__(self, environ, start_response):
        exchange = Exchange(self, environ, start_response)
        try:
            if self._pid != os.getpid():
                self._start_in_this_process()
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
            if path in ("/ui", "/ui/") and exchange.method == "GET":  # the page needs no key; all it shows does
                body, headers = self.live_page.html()
                return exchange.answer(200, body, headers, content_type="text/html; charset=utf-8")
            # A batch item runs as the key that made its batch (edgegate_batch.run_item).
            exchange.key = exchange.batch.key if exchange.batch else check_api_key(self.config, exchange.environ)
            if exchange.key is not None and exchange.key.scraper and path not in ("/metrics", "/readyz"):
                raise GatewayError(403, "forbidden", "a metrics key (role 'metrics' in GATEWAY_API_KEYS) may read "
                                   "/metrics and /readyz only")
            if is_batch_route(path):  # files and batches: answered here, never forwarded
                return batch_route(self, exchange)
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


# ================================================================ 2. the proxy's steps


def proxy(gateway, exchange):
    """A request to ``/v1/*`` or ``/api/*``, step by step, each defined below
    in this order. A GatewayError from any of them ends the exchange with
    that error (``Gateway.route``); whatever the exchange holds by then is
    let go by its ending (``Exchange.close``)."""
    exchange.task_id = task_id_of(exchange.environ)
    check_path_spelling(exchange.path)
    exchange.path = without_trailing_slash(exchange.path)
    try:  # read before the claim, so that the task's first document names the model
        request = exchange.request = read_request(gateway.config, gateway.bodies, exchange.environ, exchange.path,
                                                  exchange.method, exchange.key)
        refusal = None
    except GatewayError as error:
        request, refusal = None, error
    if exchange.path != "/":  # "/" answers anyone (no key needed), so it writes nothing to the store
        exchange.claim_task(request)  # from here on the exchange's ending writes the task's last state
    if refusal:
        raise refusal
    if request.inference:
        check_quota(gateway, exchange)  # before a place in the line: a key over its quota waits for nothing
    if request.on_gpu:
        take_slot(gateway, exchange)
        refuse_remote_model(gateway, exchange, request)
    if request.to_cloud:
        forward = cloud_forward(gateway.config, gateway.cloud, exchange.environ, request)
        request.let_go_of_document()  # its body is built: the whole document is no longer needed
    else:
        forward = ollama_forward(gateway, exchange, request)
    exchange.forwarding(forward)
    with upstream_call_of_this_thread(exchange.call):  # a hang-up or DELETE can cut these calls
        if request.on_gpu and request.path.startswith("/v1/"):
            give_model_its_lifetime_now(gateway, exchange, forward, request)
        exchange.response = send_upstream(gateway, exchange, forward)
    return relay_answer(gateway, exchange, forward)


TASK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # a whole value: always fullmatch


def task_id_of(environ):
    """The client's ``X-Task-Id``, or a new UUID4."""
    given = environ.get("HTTP_X_TASK_ID")
    if given is None:
        return str(uuid.uuid4())
    if not TASK_ID_RE.fullmatch(given):
        raise GatewayError(400, "invalid_task_id", "X-Task-Id must match ^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    return given


def check_path_spelling(path):
    """Refuse ``.``, ``..`` and ``//`` segments, so that no spelling of a
    path reaches a route that its plain spelling is refused."""
    if "//" in path or any(segment in (".", "..") for segment in path.split("/")):
        raise GatewayError(400, "invalid_request", "the path must not contain '.', '..' or '//' segments")


def without_trailing_slash(path):
    """``/api/chat/`` is ``/api/chat``: checked, and forwarded, as the route
    without the slash. Ollama would answer 307 to it (gin's
    RedirectTrailingSlash), and a client following that would come back
    anyway; a check that missed the slashed spelling would let its body
    through unchecked."""
    return path.rstrip("/") if len(path) > 1 else path


# ---------------------------------------------------------------- quota and GPU slot


def check_quota(gateway, exchange):
    """429 ``quota_exceeded`` for a key over one of its daily quotas
    (README, "Usage and quotas"), with Retry-After until midnight UTC, when
    they start again. The admin key, and a key without quotas, read nothing."""
    key = exchange.key
    if key is None or not key.limited:
        return
    now = time.time()
    refusal = gateway.quotas.refusal(key, now)
    if refusal:
        # X-Should-Retry: the openai and anthropic SDKs retry a 429 on their own, and anthropic's
        # would sleep the whole Retry-After (until midnight) first (anthropic/_base_client.py,
        # _should_retry and _calculate_retry_timeout); with "false" both raise at once.
        raise GatewayError(429, "quota_exceeded", refusal + "; the quotas start again at midnight UTC",
                           headers=[("Retry-After", str(seconds_to_midnight(now))), ("X-Should-Retry", "false")],
                           stage="quota_exceeded")


def take_slot(gateway, exchange):
    """Hold a GPU slot for the rest of the exchange: the slot is handed to
    the exchange (``Exchange.own_slot``) the moment it is taken, and freed
    by its ending. With SLOT_WAIT_S = 0 the slot is free now or the answer
    is 503 ``gpu_busy``; above 0 the request waits its turn in the line
    shared by every worker (``wait_in_line``), at most SLOT_WAIT_S. A client
    that leaves, or a DELETE, while the request waits ends the wait."""
    holder_record = {"pid": os.getpid(), "task_id": exchange.task_id, "path": exchange.path,
                     "since": round(time.time(), 3), "model": exchange.model}
    if isinstance(exchange.model, str) and len(exchange.model) > 200:  # the record is read from its first 4 KiB
        holder_record["model"] = exchange.model[:200] + "..."
    if exchange.key is not None:
        holder_record["key"] = exchange.key.name
    if exchange.batch is not None:  # it waits behind every interactive request (README, "Batches")
        holder_record["batch"] = exchange.batch.batch_id
    slots, config = gateway.slots, gateway.config
    gateway.upstreams.ask_loaded_models()  # what each Ollama has loaded, if not known from the last few seconds
    if config.slot_wait_s > 0 or exchange.batch is not None:
        wait_in_line(gateway, exchange, holder_record)
    else:
        slots.try_take(holder_record, {"model": exchange.model}, exchange.own_slot)
    if exchange.slot is not None and gateway.upstreams.several:  # one upstream: the documents keep their shape
        exchange.task.set(slot=exchange.slot.index, upstream=gateway.upstreams.of_slot(exchange.slot.index).base)
    if exchange.call.reason:  # cancelled while waiting, maybe just as the slot came: the ending frees it
        raise abort_error(exchange)
    if exchange.slot is None:
        gateway.metrics.gpu_refused("busy")
        raise GatewayError(503, "gpu_busy", busy_message(slots, config), headers=gateway.retry_after,
                           stage="gpu_busy")
    waited = exchange.slot.taken_at - exchange.started
    gateway.metrics.slot_waited(waited)
    exchange.slot_wait_ms = "%.1f" % (waited * 1000)


def refuse_remote_model(gateway, exchange, request):
    """README, "Ollama cloud models": a local name whose config points at
    another server (``remote_host``) is run there by Ollama, on the box
    owner's account; refused like a cloud name. Asked of the slot's own
    Ollama (edgegate_remote.py), once per name for a while."""
    model = request.document.get("model")
    if gateway.config.allow_ollama_cloud or not isinstance(model, str) or not model.strip():
        return
    upstream = gateway.upstreams.of_slot(exchange.slot.index)
    try:
        remote = gateway.remote_models.is_remote(upstream, model)
    except requests.RequestException as error:
        raise upstream_error(error, "ollama", upstream.base, gateway.retry_after)
    if remote:
        raise GatewayError(403, "cloud_model_disabled",
                           "%s is a remote model (its config names a remote_host): Ollama runs it elsewhere, "
                           "on this box owner's account; it is disabled on this gateway (set "
                           "ALLOW_OLLAMA_CLOUD=1 to allow it)" % printable(model))


def wait_in_line(gateway, exchange, holder_record):
    """The slot at once when nobody waits and one is free; else a place at
    the end of the line until this request's turn comes, SLOT_WAIT_S runs
    out, or the client leaves or a DELETE comes. QUEUE_MAX waiters already,
    one of them of this request's key: 503 ``gpu_busy`` at once, saying so.
    A batch item waits as long as it takes, behind every interactive
    request, and is never refused."""
    config, slots = gateway.config, gateway.slots
    key = exchange.key.name if exchange.key else None  # its name (README, "Keys and their tasks"), never the key
    waiter = dict(holder_record, model=exchange.model, key=key)
    try:
        slot, ticket = slots.line.join(waiter, holder_record, slots, exchange.own_slot,
                                       bound=None if exchange.batch else config.queue_max)
    except QueueFull as full:
        gateway.metrics.gpu_refused("queue_full")
        retry_after = slots.retry_after(full.waiting, config.retry_after_s)
        raise GatewayError(503, "gpu_busy", "GPU queue full: %d requests waiting (QUEUE_MAX); %s"
                           % (full.waiting, busy_message(slots, config)), headers=[("Retry-After", str(retry_after))],
                           stage="gpu_busy")
    if slot is not None:
        return
    joined = time.monotonic()
    stream = None
    try:
        exchange.call.attach(ticket)  # a hang-up or DELETE shuts the ticket's socket (UpstreamCall.abort): we wake
        if exchange.stream and exchange.path.startswith("/v1/"):
            stream = QueuedStream(exchange, joined)
        deadline = None if exchange.batch else joined + config.slot_wait_s  # a batch item waits its turn
        wait_turn(slots, ticket, holder_record, exchange.own_slot, deadline,
                  moved=lambda position: moved_up(gateway, exchange, stream, position),
                  stopped=lambda: exchange.call.reason is not None)
    except ConnectionAbortedError:  # the client left before the wait began
        pass
    finally:
        slots.line.leave(ticket)
        gateway.metrics.queue_waited(time.monotonic() - joined)
        with exchange.task.lock:  # out of the line: the document is again the one its consumers know
            exchange.task.extensions.pop("queue_position", None)


def moved_up(gateway, exchange, stream, position):
    """The request's place in the line, told to its task and to a queued stream."""
    gateway.upstreams.ask_loaded_models()  # outside the line's lock: a look may take a round trip
    if exchange.task.extensions.get("queue_position") != position:
        exchange.task.set(queue_position=position)
    if stream is not None:
        stream.tell(position)


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
    """A streamed ``/v1`` request that waits in line long enough to need
    keep-alives: once it has waited HEARTBEAT_SEC its SSE answer starts
    (200, ``text/event-stream``), so that the client sees ``: queued,
    position N`` comments while it waits -- at each move, and every
    HEARTBEAT_SEC, which also keeps load balancers from cutting it. Its
    headers are then gone: ``Exchange.start`` sends no others, and an error
    that follows (SLOT_WAIT_S out, upstream failed) is the stream's last
    event (``Exchange.answer``). A shorter wait starts nothing, so that the
    answer keeps the upstream's own status and headers: the openai SDK
    raises NotFoundError for a 404 only when it sees the 404 (an error
    event inside a 200 is a bare APIError). NDJSON streams get nothing:
    Ollama's clients parse every line."""

    def __init__(self, exchange, joined):
        self.exchange = exchange
        self.joined = joined  # time.monotonic() when the request joined the line
        self.write = None  # PEP 3333's write(), once the answer has started
        self.every = exchange.gateway.config.heartbeat_sec
        self.told, self.told_at = None, 0.0

    def tell(self, position):
        now = time.monotonic()
        if self.write is None:
            if now - self.joined < self.every:
                return  # a short wait: nothing started yet
            self.write = self.exchange.start_queued_stream()
        elif position == self.told and now - self.told_at < self.every:
            return
        self.told, self.told_at = position, now
        try:  # PEP 3333's write(): gunicorn sends the headers (the first time), then this, now
            self.write((": queued, position %d\n\n" % position).encode())
        except OSError:
            self.exchange.call.abort("client_gone")


# ---------------------------------------------------------------- forwarding


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
        upstreams.sent(upstream, request.document.get("model"),
                       request.document.get("keep_alive", gateway.config.keep_alive_default))
    else:
        upstream = upstreams.first_healthy()
    where = "the upstream" if not upstreams.several else "upstream %d (%s)" % (upstream.index, upstream.base)
    return Forward(upstream, "ollama", where, request.method, upstream_target(exchange.environ, request.path),
                   headers, body)


def give_model_its_lifetime_now(gateway, exchange, forward, request):
    """The /v1 keep_alive load call (edgegate_upstream.ModelLifetimes) to the
    Ollama the request goes to, with the client's headers."""
    headers = forwarded_headers(exchange.environ, bool(gateway.config.api_keys))
    if give_model_its_lifetime(forward.upstream, request.path, request.document, headers,
                               gateway.config.keep_alive_default):
        gateway.metrics.load_call_sent()


def send_upstream(gateway, exchange, forward):
    """The upstream's response, its body not yet read. A failure is named
    once, here: the client's hang-up or a DELETE if the exchange was cut,
    else what the upstream did."""
    try:
        return forward.upstream.send(forward.method, forward.target, forward.headers, forward.body)
    except requests.RequestException as error:
        if exchange.call.reason:
            raise abort_error(exchange)
        if forward.provider == "ollama" and caused_by(error, CONNECT_FAILURES):
            gateway.upstreams.refused(forward.upstream)  # never sent: the next request goes elsewhere
        raise upstream_error(error, forward.provider, forward.upstream.base, gateway.retry_after)


# ---------------------------------------------------------------- the answer


def relay_answer(gateway, exchange, forward):
    """The upstream's answer, on its way to the client. An upstream error on
    /v1 (or one to be translated) is read and answered in the gateway's
    envelope; any other answer is relayed as it comes."""
    response = exchange.response
    exchange.update_task(upstream_status=response.status_code)
    if response.status_code >= 400 and (exchange.path.startswith("/v1/") or forward.translation):
        return answer_upstream_error(exchange, forward)
    translation = forward.translation
    if translation and not translation.stream_format:  # one document: translated before answering
        try:
            document = translation.whole(response, exchange.started)
        except GatewayError:
            raise
        except Exception as error:  # reading the answer failed: a reset, urllib3's errors
            raise upstream_failure(exchange, error)
        exchange.update_task(prompt_tokens=document["prompt_eval_count"], completion_tokens=document["eval_count"])
        return exchange.answer(200, document, outcome=outcome_of_answer(exchange, {}))
    if translation:
        headers = [("Content-Type", translation.content_type)]
        relay_format = translation.stream_format
    else:
        named = {n.strip().lower() for n in response.headers.get("Connection", "").split(",")}
        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP
                   and k.lower() not in named and not k.lower().startswith("access-control-")]
        relay_format = stream_format(response)
    relay = Relay(RelayReport(exchange), response, relay_format, (exchange.path, exchange.task_id),
                  gateway.config.heartbeat_sec, translation.answer if translation else None)
    gateway.metrics.stream_opened()
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


# ================================================================ 3. the exchange and its one ending

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


class RelayReport:
    """What an exchange's Relay (edgegate_relay.py) reports as the answer
    passes, and what each report does to the exchange: the relay says what
    happened, and the exchange's ``close`` ends it."""

    def __init__(self, exchange):
        self.exchange = exchange

    def first_byte_arrived(self):
        exchange = self.exchange
        exchange.first_byte_at = time.monotonic()
        ttft = exchange.first_byte_at - exchange.started
        exchange.gateway.metrics.first_byte(ttft)
        exchange.update_task(RUNNING, "streaming", "receiving the upstream's answer", ttft_ms=round(ttft * 1000, 1))

    def relayed(self, bytes_so_far, pieces_so_far):
        self.exchange.bytes_out = bytes_so_far
        self.exchange.progress.pieces = pieces_so_far

    def writing(self, since):
        self.exchange.writing_since = since

    def relay_finished(self, counts):
        """The answer arrived whole."""
        self.exchange.close(outcome_of_answer(self.exchange, counts))

    def relay_failed(self, error):
        """The upstream failed mid-answer: (the failure, whether the client is still there to be told)."""
        failure = upstream_failure(self.exchange, error)
        client_there = self.exchange.call.reason != "client_gone"
        self.exchange.close(Outcome.of(failure))
        return failure, client_there

    def relay_closed(self, complete, counts):
        """gunicorn closed the answer: the end, or the client went away."""
        self.exchange.gateway.metrics.stream_closed()
        self.exchange.close(outcome_of_answer(self.exchange, counts) if complete else None)

    def cut_client(self):
        cut_client(self.exchange)


class Progress:
    """Tokens so far of an answer that streams, and their rate, for the live
    page (README, "Live page"): the relay counts the pieces as they pass
    (edgegate_relay.PieceCount), and the watcher puts them in the task's
    document at most once a second, in the batch it writes anyway."""

    EVERY_S = 1.0

    def __init__(self):
        self.pieces = 0  # set by the relay's thread; read by the watcher's
        self.told, self.told_at = 0, 0.0

    def tell(self, task, first_byte_at, now):
        pieces = self.pieces
        if pieces == self.told or first_byte_at is None or now - self.told_at < self.EVERY_S:
            return
        self.told, self.told_at = pieces, now
        elapsed = now - first_byte_at
        task.set(tokens_so_far=pieces, tokens_per_second=round(pieces / elapsed, 1) if elapsed > 0 else None)


class Exchange:
    """One request and what it holds: its task, its GPU slot, its upstream
    call and response, its place in the watcher.

    ``close(outcome)`` is the one ending of every request, whichever way it
    ends -- answered, refused before or after the slot, upstream failed,
    client gone, cancelled by DELETE, slow reader dropped, a bug of ours --
    and only its first call counts. An answer the gateway makes itself
    (``answer``, ``fail``) ends the exchange before its body is handed to
    gunicorn; a relayed answer ends when its ``Relay`` reports
    (``RelayReport``).
    """

    def __init__(self, gateway, environ, start_response):
        self.gateway, self.environ, self._start_response = gateway, environ, start_response
        self.path, self.method = environ.get("PATH_INFO") or "/", environ.get("REQUEST_METHOD", "GET")
        self.started = time.monotonic()
        self.client_socket = environ.get("gunicorn.socket")
        self.cors_origin = None  # the request's Origin, when CORS_ORIGINS allows it
        self.key = None  # the ApiKey the request came with (keys on)
        self.batch = environ.get(BATCH_ITEM)  # a batch item's BatchItemMark (edgegate_batch.run_item), else None
        self.task_id = None  # the X-Task-Id of a proxied request
        self.model, self.stream = None, False  # as read from its body
        self.inference, self.forwarded = False, False  # forwarded inference: its usage is counted
        # What it holds; each is let go by close().
        self.task = None  # its task, once claimed: only then does the ending write its state
        self.slot = None
        self.call = UpstreamCall()
        self.request = None  # what it asked for (edgegate_body.ProxiedRequest): its body, maybe spooled to a file
        self.response = None  # the upstream's response
        # What its access line and metrics tell.
        self.upstream, self.provider = None, "ollama"  # where it was forwarded; who answers, named in errors
        self.first_byte_at, self.progress = None, Progress()  # the first byte back; tokens so far (live page)
        self.writing_since = None  # set while gunicorn writes a piece of the answer to the client
        self.status_code = None
        self.bytes_out = 0
        self.slot_wait_ms, self.slot_index = None, None  # for the access line, once the slot is freed
        self.gpu_seconds, self.queue_seconds = 0.0, 0.0  # for its usage (README, "Usage and quotas")
        self.answer_started, self._write = False, None  # a queued SSE stream's 200 went out (QueuedStream)
        self.closed, self._close_lock = False, threading.Lock()

    # -- what it takes on

    def claim_task(self, request):
        """The request's task, claimed in the store (409 if its id is live)."""
        if request is not None:
            self.model, self.stream, self.inference = request.model, request.stream, request.inference
        task = status.Task(self.gateway.board, self.task_id, self.gateway.config.algorithm_id, self.method,
                           self.path, owner=self.key.name if self.key else None)
        batch = {"batch": self.batch.batch_id} if self.batch else {}  # an item names its batch
        task.extensions.update(model=self.model, stream=self.stream, **batch)
        if not task.claim():
            raise GatewayError(409, "task_id_in_use", "task %s is still pending or running" % self.task_id)
        self.task = task
        self.gateway.watcher.watch(self)

    def own_slot(self, slot):
        """Handed the GPU slot the moment it is taken (``GpuSlots.try_take``):
        from here on ``close`` frees it."""
        with self._close_lock:
            if not self.closed:
                self.slot = slot
                return
        slot.release()  # ended meanwhile (cannot happen on the request's own thread; kept safe)

    def forwarding(self, forward):
        self.upstream = forward.upstream if forward.provider == "ollama" else None
        self.provider = forward.provider
        self.forwarded = True
        self.update_task(RUNNING, "forwarding", "forwarded to %s" % forward.where)

    def update_task(self, *change, **extensions):
        """A change of the task's document, when the exchange has a task."""
        if self.task is not None:
            self.task.set(*change, **extensions)

    # -- answering

    def start(self, status_code, reason, headers, exc_info=None):
        """Start the answer. It is counted now, so that /metrics shows a long stream that has begun.
        Returns PEP 3333's ``write``; once a queued stream has started, nothing more."""
        if self.answer_started:
            return self._write
        give_back_given_share()  # the answer begins: no body is read whole any more (edgegate_spool)
        self.status_code = status_code
        self.gateway.metrics.request_answered(self.path, status_code, self.key)
        if self.task_id:
            headers = list(headers) + [("X-Task-Id", self.task_id)]
        if self.cors_origin:
            headers = list(headers) + [("Access-Control-Allow-Origin", self.cors_origin), ("Vary", "Origin"),
                                       ("Access-Control-Expose-Headers", "X-Task-Id, Retry-After")]
        self._write = self._start_response(status_line(status_code, reason), headers, exc_info)
        return self._write

    def start_queued_stream(self):
        """A streamed request's SSE answer, started while it waits (``QueuedStream``)."""
        write = self.start(200, None, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
        self.answer_started = True
        return write

    def answer(self, status_code, document, headers=(), outcome=None, exc_info=None,
               content_type="application/json"):
        """An answer of the gateway's own (a JSON document, or bytes of
        ``content_type``); the exchange ends before gunicorn sends it."""
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        if self.answer_started and isinstance(document, dict):  # its 200 went out while it queued
            body = sse_error_event(document)
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
            self._quietly(self._let_go_of_body)
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
        response, self.response = self.response, None
        self.call.let_go(response)

    def _let_go_of_body(self):
        request, self.request = self.request, None
        if request is not None:
            request.close()  # its spool file, if it had one, is deleted now

    def _free_slot(self):
        slot, self.slot = self.slot, None
        if slot is not None:
            held = time.monotonic() - slot.taken_at
            self.slot_index, self.gpu_seconds, self.queue_seconds = slot.index, held, slot.taken_at - self.started
            slot.release()
            self.gateway.metrics.slot_held(held, slot.index)

    def _finish_task(self, outcome):
        if outcome.state == FAILED and outcome.stage in UPSTREAM_STAGES:
            self.gateway.metrics.upstream_failed(outcome.stage)
        duration_ms = round((time.monotonic() - self.started) * 1000, 1)
        usage = usage_of(self, outcome)
        self.task.finish(outcome.state, outcome.stage, outcome.message,
                         then=self.gateway.usage.adding(usage) if usage else None,  # the same round trip
                         duration_ms=duration_ms, **outcome.counts)
        if usage:
            usage_counted(self.gateway, usage, self.model)


def outcome_of_answer(exchange, counts):
    """The outcome of an upstream answer that arrived whole."""
    response = exchange.response
    if response is not None and response.status_code < 400:
        return Outcome(SUCCESS, "completed", "completed", counts)
    upstream_status = response.status_code if response is not None else None
    return Outcome(FAILED, "upstream_error", "the upstream answered %s" % upstream_status, counts)


def usage_of(exchange, outcome):
    """What a forwarded inference request adds to its key's and model's day
    (README, "Usage and quotas"): the tokens its answer reported (a
    translated answer noted them in its task), its slot's time. None for
    any other request -- and if counting fails: the task must end all the same."""
    if not (exchange.inference and exchange.forwarded):
        return None
    try:
        extensions = exchange.task.extensions
        prompt = outcome.counts.get("prompt_tokens", extensions.get("prompt_tokens"))
        completion = outcome.counts.get("completion_tokens", extensions.get("completion_tokens"))
        answered = (extensions.get("upstream_status") or 999) < 400  # the model exists: an upstream ran it
        return Usage(exchange.key.name if exchange.key else NO_KEY,
                     exchange.gateway.models.kept_as(exchange.model, answered), int(prompt or 0),
                     int(completion or 0), exchange.gpu_seconds, exchange.queue_seconds, time.time())
    except Exception:  # a bug of ours
        log.exception("counting the usage of %s %s", exchange.method, printable(exchange.path))
        return None


def usage_counted(gateway, usage, model):
    """A request's usage, stored: this worker's quotas and the metrics count it too."""
    try:
        gateway.quotas.counted(usage)
        gateway.metrics.inference_counted(usage.key, gateway.models.label(model), usage.prompt_tokens,
                                          usage.completion_tokens, usage.gpu_seconds)
    except Exception:  # a bug of ours: the access line is still written
        log.exception("counting the usage of a request for %s", printable(model))


def upstream_failure(exchange, error):
    """The GatewayError that names a failed upstream call of this exchange."""
    if exchange.call.reason:
        return abort_error(exchange)
    gateway = exchange.gateway
    upstream = gateway.cloud if exchange.provider == "openai" else (exchange.upstream or gateway.upstreams.all[0])
    if upstream is exchange.upstream:
        gateway.upstreams.failed_on(upstream)  # is it still there? looked at before the next request
    return upstream_error(error, exchange.provider, upstream.base, gateway.retry_after)


def abort_error(exchange):
    """Why an exchange was cut short: a DELETE, or the client went away."""
    if exchange.call.reason == "cancelled":
        return GatewayError(503, "cancelled", "task %s was cancelled by DELETE /tasks/%s"
                            % (exchange.task_id, exchange.task_id), stage="cancelled")
    return GatewayError(503, "cancelled", "the client went away", stage="cancelled")


def cut_client(exchange):
    """End the client's connection: an answer cut short, a client that does not read."""
    if exchange.client_socket is not None:
        try:
            exchange.client_socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def exchange_access_line(exchange):
    started, upstreams = exchange.started, exchange.gateway.upstreams
    slot_index = exchange.slot_index
    where = ""
    if upstreams.several and slot_index is not None:
        where = " slot=%d upstream=%s" % (slot_index, upstreams.of_slot(slot_index).base)
    return access_line(
        exchange.environ.get("REMOTE_ADDR"), exchange.method, exchange.path, exchange.status_code, started,
        exchange.task_id, exchange.model, exchange.slot_wait_ms,
        "%.1f" % ((exchange.first_byte_at - started) * 1000) if exchange.first_byte_at else None,
        exchange.bytes_out, exchange.key.name if exchange.key else None, where)


# ================================================================ 4. the watcher

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
        self.exchanges = {}  # the task's store id (status.store_id: the key's name and the task id) -> Exchange
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

    def local(self, store_id):
        with self.lock:
            return self.exchanges.get(store_id)

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
        now = time.monotonic()
        for exchange in exchanges:
            exchange.progress.tell(exchange.task, exchange.first_byte_at, now)
        status.flush_tasks(self.board, [e.task for e in exchanges], self.heartbeat_sec)
        for exchange in exchanges:
            since = exchange.writing_since
            if since is not None and now - since > self.client_send_timeout_s:
                # Slow readers: gunicorn's socket has no send timeout, so a
                # client that stays connected but never reads would hold this
                # request's thread (and slot) for ever.
                self._drop_slow_reader(exchange)
        cancelled = self.board.cancels_among([e.task.store_id for e in exchanges])
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
        cut_client(exchange)


def cancel(exchange):
    """A DELETE: cut the upstream call; and the client too if gunicorn is
    blocked writing to it (a client that does not read would otherwise hold
    the thread and the slot until CLIENT_SEND_TIMEOUT_S)."""
    exchange.call.abort("cancelled")
    if exchange.writing_since is not None:
        cut_client(exchange)


# ================================================================ 5. the gateway's own routes

def own_route(gateway, exchange):
    """/readyz, /slots, /tasks/status[/<id>], DELETE /tasks/<id>, /usage, /metrics, /ui/state."""
    path, method = exchange.path, exchange.method
    if path == "/readyz":
        return readyz(gateway, exchange)
    if path == "/slots" and method == "GET":
        return exchange.answer(200, seen_by(exchange.key, describe_slots(gateway)))
    if path == "/ui/state" and method == "GET":
        state = live_state(seen_by(exchange.key, describe_slots(gateway, with_upstream=True)), gateway.board,
                           exchange.key, gateway.loaded_models.describe())
        return exchange.answer(200, state, [("Cache-Control", "no-store")])
    if path == "/tasks/status" and method == "GET":
        return list_tasks(gateway, exchange)
    if path.startswith("/tasks/status/") and method == "GET":
        return exchange.answer(200, known_task(gateway, exchange, path[len("/tasks/status/"):])[1])
    if path.startswith("/tasks/") and method == "DELETE":
        return cancel_task(gateway, exchange, path[len("/tasks/"):])
    if path == "/usage" and method == "GET":
        return usage_answer(gateway, exchange)
    if path == "/metrics" and method == "GET":
        key = exchange.key
        if key is not None and not (key.admin or key.scraper):  # every key's name and counts are in it
            raise GatewayError(403, "forbidden", "/metrics needs an admin key or a metrics key (a line "
                               "'KEY NAME metrics' in the key file); it shows every key's counts")
        if not gateway.metrics.enabled:
            raise GatewayError(404, "not_found", gateway.metrics.missing)
        return exchange.answer(200, gateway.metrics.exposition(),
                               content_type="text/plain; version=0.0.4; charset=utf-8")
    raise GatewayError(404, "not_found", "no route for %s %s" % (method, printable(path)))


DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")  # a whole value: fullmatch


def usage_answer(gateway, exchange):
    """GET /usage[?from=YYYY-MM-DD&to=YYYY-MM-DD] (README, "Usage and
    quotas"): a key sees its own usage, the admin (and anyone, without
    keys) everyone's. Without dates: today, the last 7 and the last 30 days."""
    query = urllib.parse.parse_qs(exchange.environ.get("QUERY_STRING", ""))
    first, last = query.get("from", [None])[-1], query.get("to", [None])[-1]
    now = time.time()
    if first is not None or last is not None:
        last = last or day_of(now)
        first = first or last
        for name, day in (("from", first), ("to", last)):
            if not _is_date(day):
                raise GatewayError(400, "invalid_request", "%s must be a date YYYY-MM-DD (UTC), not %r"
                                   % (name, printable(day)))
        if first > last:
            raise GatewayError(400, "invalid_request", "from (%s) is after to (%s)" % (first, last))
    key = exchange.key
    own = key.name if key is not None and not key.admin else None
    report = usage_report(gateway.usage, now, own, first, last, gateway.config.usage_days)
    return exchange.answer(200, report)


def _is_date(text):
    try:
        return bool(DATE_RE.fullmatch(text)) and day_start(text) is not None
    except ValueError:
        return False


def seen_by(key, seen):
    """/slots as ``key`` may see it: a key that is not admin sees the task
    ids, models and key names of its own tasks only, and not which models
    each GPU's Ollama has loaded (other keys' models, with several GPUs)."""
    if key is not None and not key.admin:
        for entry in seen["slots"] + seen["queue"]:
            entry.pop("loaded", None)
            if entry.get("key") != key.name:
                for private in ("task_id", "model", "key", "batch"):
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
        gateway.board.ping()
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
        if caused_by(error, CONNECT_FAILURES):
            gateway.upstreams.refused(upstream)
        return upstream_error(error, "ollama", upstream.base).message
    if answer.status_code >= 500:
        where = "the upstream" if not gateway.upstreams.several else "the upstream at %s" % upstream.base
        return "%s answered %d to /api/version" % (where, answer.status_code)
    return None


def describe_slots(gateway, with_upstream=False):
    """/slots: each slot (with several upstreams: its upstream, whether it is
    up, and what its Ollama has loaded), and the line. ``with_upstream``:
    each slot names its upstream even when there is one (the live page)."""
    slots = gateway.slots.describe()
    if with_upstream and not gateway.upstreams.several:
        for entry in slots:
            entry["upstream"] = gateway.upstreams.all[0].base
    if gateway.upstreams.several:
        for entry, upstream in zip(slots, gateway.upstreams.choice.describe()):
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
    if owner and (key is None or not key.admin or not KEY_NAME_RE.fullmatch(owner)):
        raise GatewayError(404, "not_found", "no task with that id")
    if not TASK_ID_RE.fullmatch(task_id):
        raise GatewayError(404, "not_found", "no task with that id")
    kept_as = status.store_id(task_id, owner or (key.name if key else None))
    document = gateway.board.get(kept_as)
    if document is None and key is not None and key.admin and not owner:
        kept_as = status.store_id(task_id)
        document = gateway.board.get(kept_as)
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
    items = gateway.board.recent(int(limit_text), state, key.name if key and not key.admin else None)
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
        gateway.board.request_cancel(kept_as)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        time.sleep(0.05)
        document = gateway.board.get(kept_as) or document
        if document["state"] not in status.LIVE_STATES:
            return exchange.answer(200, document)
    return exchange.answer(202, document)


# ================================================================ 6. entry points


class Application:
    """``gateway:app``, the WSGI callable gunicorn serves. Importing this
    module builds nothing: gunicorn.conf.py reads the configuration when
    gunicorn starts (a bad value stops the start with one line) and hands it
    over with ``configure``. Served without that file (another WSGI server,
    ``gunicorn gateway:app``), it reads the environment on its first request."""

    def __init__(self):
        self.gateway = None
        self._lock = threading.Lock()

    def configure(self, config):
        self.gateway = Gateway(config)

    def __call__(self, environ, start_response):
        if self.gateway is None:
            with self._lock:
                if self.gateway is None:
                    self.configure(load_config())
        return self.gateway(environ, start_response)


app = Application()


USAGE = "usage: python -m gateway check | hold [--wait SECONDS] [--slot N | --all] -- COMMAND ARGS..."


def main(argv):
    """``python -m gateway check`` or ``python -m gateway hold ...``: the exit status."""
    if argv[:1] == ["hold"]:
        gateway = Gateway(load_config())
        return hold_command(gateway.config, gateway.slots, gateway.upstreams, argv[1:])
    if argv != ["check"]:
        print(USAGE, file=sys.stderr)
        return 2
    return check(Gateway(load_config()))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
