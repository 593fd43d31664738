"""The batch routes the gateway answers itself (README, "Batches"); Ollama
never sees them. OpenAI's Files and Batch API and Anthropic's Message
Batches, in their own shapes, so that their SDKs parse them unchanged
(``openai.types.Batch``, ``FileObject``; ``anthropic.types.messages.MessageBatch``,
``MessageBatchIndividualResponse``). Files, the store and the runner are
edgegate_batch.py; each handler gets the exchange (gateway.Exchange) and
answers with ``exchange.answer``; a refusal is a GatewayError, turned into
the route's error shape by the gateway (edgegate_errors.error_document).

    POST /v1/files, GET /v1/files, GET|DELETE /v1/files/{id}, GET /v1/files/{id}/content
    POST /v1/batches, GET /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel
    POST /v1/messages/batches, GET /v1/messages/batches, GET|DELETE /v1/messages/batches/{id},
    GET /v1/messages/batches/{id}/results, POST /v1/messages/batches/{id}/cancel
"""

import datetime
import json
import re
import sqlite3
import time
import urllib.parse

import redis

from edgegate_batch import (ANTHROPIC_ENDPOINT, ENDED, ENDPOINTS, MAX_LINES, new_id, now_s, read_upload,
                            shown_status)
from edgegate_body import read_json_body
from edgegate_errors import GatewayError, printable
from edgegate_spool import give_back_given_share

ROUTE_PREFIXES = ("/v1/files", "/v1/batches", "/v1/messages/batches")
LISTED_PURPOSES = ("batch", "batch_output")  # Anthropic's input and results files are the batch's own
WINDOW_RE = re.compile(r"([1-9][0-9]{0,5})([smh])")
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600}


def is_batch_route(path):
    return any(path == prefix or path.startswith(prefix + "/") for prefix in ROUTE_PREFIXES)


def batch_route(gateway, exchange):
    """Answer a batch route: the handler for its method and path, or 404/405."""
    path, method = exchange.path, exchange.method
    parts = path.split("/")[2:]  # "/v1/batches/x/cancel" -> ["batches", "x", "cancel"]
    if parts[0] == "messages":
        parts = ["message_batches"] + parts[2:]
    handler = ROUTES.get((method, parts[0], len(parts), parts[2] if len(parts) > 2 else None))
    if handler is None:
        raise GatewayError(404, "not_found", "no route for %s %s" % (method, printable(path)))
    try:
        return handler(gateway, exchange, *parts[1:2])
    except (redis.RedisError, sqlite3.Error) as error:
        store = gateway.batches.store.provider
        raise GatewayError(503, "store_unavailable", "the batch store (%s) did not answer: %s" % (store, error),
                           provider=store)


def visible(exchange, owner):
    """May the caller see a thing its ``owner`` (a key's name) made? Its own, or anything for the admin."""
    key = exchange.key
    return key is None or key.admin or key.name == owner


def owner_of(exchange):
    return exchange.key.name if exchange.key else None


def _query(exchange):
    return urllib.parse.parse_qs(exchange.environ.get("QUERY_STRING", ""))


def _limit(query, default, highest):
    text = query.get("limit", [str(default)])[-1]
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= highest:
        raise GatewayError(400, "invalid_request", "limit must be a whole number from 1 to %d" % highest)
    return int(text)


# ================================================================ OpenAI: files


def public_file(meta):
    return {k: v for k, v in meta.items() if k not in ("owner", "lines")}


def known_file(gateway, exchange, file_id):
    meta = gateway.batches.files.get(file_id)
    if meta is None or not visible(exchange, meta["owner"]):
        raise GatewayError(404, "not_found", "no file %s" % printable(file_id))
    return meta


def upload_file(gateway, exchange):
    """POST /v1/files: a JSONL file for a batch, streamed to disk."""
    give_back_given_share()  # never whole in memory: the body budget the worker took for it goes back
    batches = gateway.batches
    purpose, filename, temporary, lines = read_upload(exchange.environ, batches.files,
                                                      gateway.config.batch_max_file_bytes)
    if purpose != "batch":
        batches.files.discard(temporary)
        raise GatewayError(400, "invalid_request", "purpose must be 'batch' (this gateway keeps files for batches "
                           "only), not %s" % printable(str(purpose)))
    meta = batches.files.adopt(temporary, owner_of(exchange), "batch", filename, lines)
    return exchange.answer(200, public_file(meta))


def list_files(gateway, exchange):
    query = _query(exchange)
    limit = _limit(query, 10000, 10000)
    found = [m for m in gateway.batches.files.all()
             if m["purpose"] in LISTED_PURPOSES and visible(exchange, m["owner"])]
    purpose = query.get("purpose", [None])[-1]
    if purpose:
        found = [m for m in found if m["purpose"] == purpose]
    return exchange.answer(200, _page(found, query.get("after", [None])[-1], limit, public_file))


def get_file(gateway, exchange, file_id):
    return exchange.answer(200, public_file(known_file(gateway, exchange, file_id)))


def delete_file(gateway, exchange, file_id):
    known_file(gateway, exchange, file_id)
    gateway.batches.files.delete(file_id)
    return exchange.answer(200, {"id": file_id, "object": "file", "deleted": True})


def file_content(gateway, exchange, file_id):
    meta = known_file(gateway, exchange, file_id)
    return send_file(exchange, gateway.batches.files.path(meta["id"]))


def send_file(exchange, path):
    """A file's bytes, read and sent a piece at a time."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise GatewayError(404, "not_found", "the file is gone")
    try:
        size = f.seek(0, 2)
        f.seek(0)
        if exchange.client_socket is not None:
            # A client that stops reading must not hold the thread: gunicorn's
            # sendall of each piece fails after CLIENT_SEND_TIMEOUT_S and the
            # connection is closed (the worker makes the socket non-blocking
            # again for a kept-alive connection's next request).
            exchange.client_socket.settimeout(exchange.gateway.config.client_send_timeout_s)
        exchange.start(200, None, [("Content-Type", "application/jsonl"), ("Content-Length", str(size))])
    except BaseException:
        f.close()
        raise
    exchange.bytes_out = size
    exchange.close()
    return FilePieces(f)


class FilePieces:
    """A file sent a piece at a time; closed at the end, or by gunicorn's
    ``close()`` of the answer when the client goes away (PEP 3333)."""

    PIECE = 256 * 1024

    def __init__(self, f):
        self.f = f

    def __iter__(self):
        while True:
            piece = self.f.read(self.PIECE)
            if not piece:
                return
            yield piece

    def close(self):
        self.f.close()


# ================================================================ OpenAI: batches


def openai_batch(batch, cancel_asked):
    """The batch as ``openai.types.Batch``."""
    counts = batch.get("counts") or {"total": batch.get("total", 0), "succeeded": 0, "failed": 0, "expired": 0}
    status = shown_status(batch, cancel_asked)
    return {
        "id": batch["id"], "object": "batch", "endpoint": batch["endpoint"], "errors": batch.get("errors"),
        "input_file_id": batch["input_file_id"], "completion_window": batch["completion_window"], "status": status,
        "output_file_id": batch.get("output_file_id"), "error_file_id": batch.get("error_file_id"),
        "created_at": batch["created_at"], "in_progress_at": batch.get("in_progress_at"),
        "expires_at": batch["expires_at"], "finalizing_at": batch.get("finalizing_at"),
        "completed_at": batch.get("completed_at"), "failed_at": batch.get("failed_at"),
        "expired_at": batch.get("expired_at"), "cancelling_at": int(cancel_asked) if cancel_asked else None,
        "cancelled_at": batch.get("cancelled_at"), "metadata": batch.get("metadata"), "model": batch.get("model"),
        "request_counts": {"total": counts["total"], "completed": counts["succeeded"],
                           "failed": counts["failed"] + counts["expired"]},
    }


def window_seconds(text):
    """completion_window: OpenAI's "24h", or any shorter span in s, m or h (at most 24h)."""
    match = WINDOW_RE.fullmatch(text) if isinstance(text, str) else None
    seconds = int(match.group(1)) * WINDOW_UNITS[match.group(2)] if match else 0
    if not 0 < seconds <= 86400:
        raise GatewayError(400, "invalid_request", "completion_window must be \"24h\" (or a shorter span such "
                           "as \"1h\" or \"90m\")")
    return seconds


def new_batch(kind, owner, endpoint, input_file_id, window, window_s, metadata, total):
    created = now_s()
    return {"id": new_id("batch_" if kind == "openai" else "msgbatch_"), "kind": kind, "owner": owner,
            "endpoint": endpoint, "input_file_id": input_file_id, "completion_window": window,
            "metadata": metadata, "created_at": created, "expires_at": created + window_s, "status": "validating",
            "counts": {"total": total, "succeeded": 0, "failed": 0, "expired": 0, "cancelled": 0}}


def create_batch(gateway, exchange):
    """POST /v1/batches: a batch of an uploaded file's lines."""
    document = read_json_body(exchange.environ, gateway.bodies, gateway.config.max_body_bytes)
    endpoint = document.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise GatewayError(400, "invalid_request", "endpoint must be one of %s" % ", ".join(ENDPOINTS))
    window = document.get("completion_window", "24h")
    window_s = window_seconds(window)
    metadata = document.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items())):
        raise GatewayError(400, "invalid_request", "metadata must be at most 16 string keys (64 characters) "
                           "with string values (512 characters)")
    file_id = document.get("input_file_id")
    meta = known_file(gateway, exchange, file_id if isinstance(file_id, str) else "")
    if meta["purpose"] != "batch":
        raise GatewayError(400, "invalid_request", "input_file_id must name a file uploaded with purpose 'batch'")
    batch = new_batch("openai", owner_of(exchange), endpoint, meta["id"], window, window_s, metadata,
                      meta.get("lines", 0))
    gateway.batches.store.save(batch)
    gateway.batches.runner.wake()
    return exchange.answer(200, openai_batch(batch, None))


def known_batch(gateway, exchange, batch_id, kind):
    batch = gateway.batches.store.load(batch_id) if batch_id else None
    if batch is None or batch["kind"] != kind or not visible(exchange, batch["owner"]):
        raise GatewayError(404, "not_found", "no batch %s" % printable(batch_id or ""))
    return batch


def get_batch(gateway, exchange, batch_id):
    batch = known_batch(gateway, exchange, batch_id, "openai")
    return exchange.answer(200, openai_batch(batch, gateway.batches.store.cancel_asked(batch_id)))


def list_batches(gateway, exchange):
    query = _query(exchange)
    store = gateway.batches.store
    found = [b for b in store.all() if b["kind"] == "openai" and visible(exchange, b["owner"])]
    page = _page(found, query.get("after", [None])[-1], _limit(query, 20, 100),
                 lambda b: openai_batch(b, store.cancel_asked(b["id"])))
    return exchange.answer(200, page)


def cancel_batch(gateway, exchange, batch_id):
    batch = known_batch(gateway, exchange, batch_id, "openai")
    store = gateway.batches.store
    if batch["status"] in ENDED:
        raise GatewayError(409, "invalid_request", "batch %s has already ended (%s)" % (batch_id, batch["status"]))
    store.ask_cancel(batch_id, time.time())
    gateway.batches.runner.wake()
    return exchange.answer(200, openai_batch(store.load(batch_id), store.cancel_asked(batch_id)))


def _page(items, after, limit, shape):
    """OpenAI's cursor page: the items after the one named ``after``, at most ``limit``."""
    ids = [item["id"] for item in items]
    start = ids.index(after) + 1 if after in ids else 0
    chosen = items[start:start + limit]
    data = [shape(item) for item in chosen]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + limit < len(items)}


# ================================================================ Anthropic: Message Batches


def rfc3339(seconds):
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def message_batch(exchange, batch, cancel_asked):
    """The batch as ``anthropic.types.messages.MessageBatch``."""
    counts = batch["counts"]
    ended = batch["status"] in ENDED
    status = "ended" if ended else ("canceling" if cancel_asked is not None else "in_progress")
    done = counts["succeeded"] + counts["failed"] + counts["expired"] + counts["cancelled"]
    results_url = None
    if ended:
        host = exchange.environ.get("HTTP_HOST") or exchange.environ.get("SERVER_NAME", "localhost")
        results_url = "%s://%s/v1/messages/batches/%s/results" % (
            exchange.environ.get("wsgi.url_scheme", "http"), host, batch["id"])
    return {
        "id": batch["id"], "type": "message_batch", "processing_status": status,
        "request_counts": {"processing": counts["total"] - done, "succeeded": counts["succeeded"],
                           "errored": counts["failed"], "canceled": counts["cancelled"],
                           "expired": counts["expired"]},
        "created_at": rfc3339(batch["created_at"]), "expires_at": rfc3339(batch["expires_at"]),
        "ended_at": rfc3339(batch.get("ended_at")), "archived_at": None,
        "cancel_initiated_at": rfc3339(cancel_asked), "results_url": results_url,
    }


def create_message_batch(gateway, exchange):
    """POST /v1/messages/batches: the requests become the batch's input file, one a line."""
    config = gateway.config
    document = read_json_body(exchange.environ, gateway.bodies, config.batch_max_file_bytes, "BATCH_MAX_FILE_BYTES")
    requests = document.get("requests")
    if not isinstance(requests, list) or not requests:
        raise GatewayError(400, "invalid_request", "requests must be a non-empty list of "
                           "{\"custom_id\": ..., \"params\": {...}}")
    if len(requests) > MAX_LINES:
        raise GatewayError(400, "invalid_request", "a batch holds at most %d requests" % MAX_LINES)
    lines = (json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in requests)
    meta = gateway.batches.files.add(lines, owner_of(exchange), "anthropic_batch", "message_batch.jsonl",
                                     lines=len(requests))
    batch = new_batch("anthropic", owner_of(exchange), ANTHROPIC_ENDPOINT, meta["id"], "24h", 86400, None,
                      len(requests))
    gateway.batches.store.save(batch)
    gateway.batches.runner.wake()
    return exchange.answer(200, message_batch(exchange, batch, None))


def get_message_batch(gateway, exchange, batch_id):
    batch = known_batch(gateway, exchange, batch_id, "anthropic")
    return exchange.answer(200, message_batch(exchange, batch, gateway.batches.store.cancel_asked(batch_id)))


def list_message_batches(gateway, exchange):
    query = _query(exchange)
    store = gateway.batches.store
    found = [b for b in store.all() if b["kind"] == "anthropic" and visible(exchange, b["owner"])]
    ids = [b["id"] for b in found]
    limit = _limit(query, 20, 1000)
    after, before = query.get("after_id", [None])[-1], query.get("before_id", [None])[-1]
    if before in ids:
        end = ids.index(before)
        chosen, more = found[max(0, end - limit):end], end - limit > 0
    else:
        start = ids.index(after) + 1 if after in ids else 0
        chosen, more = found[start:start + limit], start + limit < len(found)
    data = [message_batch(exchange, b, store.cancel_asked(b["id"])) for b in chosen]
    return exchange.answer(200, {"data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
                                 "last_id": data[-1]["id"] if data else None})


def message_batch_results(gateway, exchange, batch_id):
    batch = known_batch(gateway, exchange, batch_id, "anthropic")
    if batch["status"] not in ENDED or not batch.get("results_file_id"):
        raise GatewayError(404, "not_found", "batch %s has not ended yet: its results come when "
                           "processing_status is \"ended\"" % batch_id)
    return send_file(exchange, gateway.batches.files.path(batch["results_file_id"]))


def cancel_message_batch(gateway, exchange, batch_id):
    batch = known_batch(gateway, exchange, batch_id, "anthropic")
    store = gateway.batches.store
    if batch["status"] not in ENDED:
        store.ask_cancel(batch_id, time.time())
        gateway.batches.runner.wake()
    return exchange.answer(200, message_batch(exchange, store.load(batch_id), store.cancel_asked(batch_id)))


def delete_message_batch(gateway, exchange, batch_id):
    batch = known_batch(gateway, exchange, batch_id, "anthropic")
    if batch["status"] not in ENDED:
        raise GatewayError(400, "invalid_request", "batch %s is still in progress: cancel it first, and delete it "
                           "once it has ended" % batch_id)
    for file_id in (batch["input_file_id"], batch.get("results_file_id")):
        if file_id:
            gateway.batches.files.delete(file_id)
    gateway.batches.store.forget(batch_id)
    return exchange.answer(200, {"id": batch_id, "type": "message_batch_deleted"})


# (method, resource, path parts, last part) -> handler; the id, when there is one, is its argument.
ROUTES = {
    ("POST", "files", 1, None): upload_file,
    ("GET", "files", 1, None): list_files,
    ("GET", "files", 2, None): get_file,
    ("DELETE", "files", 2, None): delete_file,
    ("GET", "files", 3, "content"): file_content,
    ("POST", "batches", 1, None): create_batch,
    ("GET", "batches", 1, None): list_batches,
    ("GET", "batches", 2, None): get_batch,
    ("POST", "batches", 3, "cancel"): cancel_batch,
    ("POST", "message_batches", 1, None): create_message_batch,
    ("GET", "message_batches", 1, None): list_message_batches,
    ("GET", "message_batches", 2, None): get_message_batch,
    ("DELETE", "message_batches", 2, None): delete_message_batch,
    ("GET", "message_batches", 3, "results"): message_batch_results,
    ("POST", "message_batches", 3, "cancel"): cancel_message_batch,
}
