"""Local batches: files on disk, batch state in a store, and the runner that
feeds a batch's items through the gateway one at a time (README, "Batches").

No HTTP routes here (edgegate_batch_api.py answers them). What an auditor
checks here:

- a file is written to a temporary name, fsynced and renamed (``BatchFiles``):
  a crash leaves the old file or the new one, never half of one;
- each item's outcome is written once (``BatchStore.record``: SQLite's
  ``INSERT OR IGNORE``, Redis's ``HSETNX``) and the output and error files
  are made from those outcomes when the batch ends, so each ``custom_id``
  appears in them exactly once, however often a worker died mid-item;
- one runner in the whole server (``BatchRunner``: an flock on
  ``STATE_DIR/batch/runner.lock``, which the kernel frees when its worker
  dies, even on SIGKILL; another worker's runner then takes over);
- an item goes through the gateway's own WSGI app (``run_item``): the same
  key, task, fair line, slot, keep_alive default and refusals as any
  request, marked as a batch item so that it waits behind every interactive
  request (edgegate_slots.line_order).

Sections: files -> the store -> reading an upload -> checking lines ->
result lines -> the runner.
"""

import abc
import codecs
import collections
import fcntl
import gzip
import io
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid

import redis

from edgegate_body import refuse_ollama_cloud
from edgegate_config import BATCH_FORM_BYTES
from edgegate_errors import GatewayError, printable
from edgegate_usage import seconds_to_midnight
from status import redis_client, use_wal

log = logging.getLogger("edgegate")

MAX_LINES = 50000  # OpenAI's limit on a batch input file; the same for Anthropic's requests
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
ANTHROPIC_ENDPOINT = "/v1/messages"
ENDED = ("completed", "failed", "expired", "cancelled")  # a batch in one of these runs no more
BATCH_ITEM = "edgegate.batch_item"  # the environ key that marks a batch item (no client can send a dotted key)


def new_id(prefix):
    return prefix + uuid.uuid4().hex[:24]


def now_s():
    return int(time.time())


class BatchItemMark:
    """What the runner puts in an item's environ (``BATCH_ITEM``): its batch,
    line, and the key that owns the batch, so that the item runs as its
    owner's request would (gateway.Gateway.route)."""

    def __init__(self, batch_id, line, key):
        self.batch_id, self.line, self.key = batch_id, line, key


# ================================================================ files


def write_durably(path, pieces):
    """``pieces`` (bytes) into ``path``: a temporary name, fsync, rename,
    fsync of the directory. Returns the size."""
    temporary = "%s.%s.new" % (path, uuid.uuid4().hex[:8])
    size = 0
    try:
        with private_file(temporary) as f:
            for piece in pieces:
                f.write(piece)
                size += len(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        _remove(temporary)
        raise
    _fsync_directory(os.path.dirname(path))
    return size


def private_file(path):
    """``path``, new, open for writing, readable by the gateway's user alone:
    batch files hold prompts and answers."""
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb")


def private_directory(path):
    """``path`` made, the gateway user's alone (0700), also when an earlier
    release made it open."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def _fsync_directory(directory):
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class BatchFiles:
    """Files under ``STATE_DIR/batch/files``: ``<id>`` holds the bytes,
    ``<id>.json`` what OpenAI's file object says of it plus its owner (the
    key's name). A file is visible once its ``.json`` is there, written last."""

    def __init__(self, state_dir):
        self.dir = os.path.join(state_dir, "batch", "files")

    def path(self, file_id):
        return os.path.join(self.dir, file_id)

    def _ready(self):
        private_directory(os.path.dirname(self.dir))  # STATE_DIR/batch: its runner.lock too
        private_directory(self.dir)

    def add(self, pieces, owner, purpose, filename, file_id=None, lines=None):
        """A new file of ``pieces``; its description (OpenAI's file object, with ``owner``)."""
        self._ready()
        file_id = file_id or new_id("file-")
        size = write_durably(self.path(file_id), pieces)
        return self._describe(file_id, size, owner, purpose, filename, lines)

    def adopt(self, temporary, owner, purpose, filename, lines):
        """A new file from ``temporary`` (already written and fsynced in this directory)."""
        file_id = new_id("file-")
        os.replace(temporary, self.path(file_id))
        _fsync_directory(self.dir)
        return self._describe(file_id, os.path.getsize(self.path(file_id)), owner, purpose, filename, lines)

    def _describe(self, file_id, size, owner, purpose, filename, lines):
        """Its description, written last: from now on the file is there. ``owner`` and ``lines`` are ours."""
        meta = {"id": file_id, "object": "file", "bytes": size, "created_at": now_s(), "filename": filename,
                "purpose": purpose, "status": "processed", "expires_at": None, "status_details": None,
                "owner": owner, "lines": lines}
        write_durably(self.path(file_id) + ".json", [json.dumps(meta).encode()])
        return meta

    def get(self, file_id):
        """The file's description, or None."""
        if not re.fullmatch(r"file-[0-9a-f]{24}", file_id or ""):
            return None
        try:
            with open(self.path(file_id) + ".json", encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def all(self):
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        found = [self.get(n[:-5]) for n in names if n.endswith(".json")]
        return sorted((m for m in found if m), key=lambda m: (m["created_at"], m["id"]), reverse=True)

    def delete(self, file_id):
        _remove(self.path(file_id) + ".json")  # first: a half-deleted file is invisible, never half there
        _remove(self.path(file_id))

    def discard(self, temporary):
        _remove(temporary)

    def temporary(self):
        """An open temporary file in this directory, for an upload; rename with ``adopt``."""
        self._ready()
        path = os.path.join(self.dir, "upload-%s.new" % uuid.uuid4().hex)
        return path, private_file(path)


# ================================================================ the store


class BatchStore(abc.ABC):
    """Where batches and their items' outcomes are kept; ``SqliteBatchStore``
    and ``RedisBatchStore`` keep the same contract. A batch is a JSON
    document (its ``id``, ``owner``, ``status``...); an outcome is one JSON
    text per line of its input, written once. Any method may raise."""

    provider = None

    @abc.abstractmethod
    def save(self, batch):
        """Write the batch's document (new or changed)."""

    @abc.abstractmethod
    def load(self, batch_id):
        """The batch's document, or None."""

    @abc.abstractmethod
    def all(self):
        """Every batch's document, newest first."""

    @abc.abstractmethod
    def ask_cancel(self, batch_id, when):
        """Note that a cancel was asked (the first time counts)."""

    @abc.abstractmethod
    def cancel_asked(self, batch_id):
        """When a cancel was asked, or None."""

    @abc.abstractmethod
    def record(self, batch, line, outcome):
        """Keep line ``line``'s outcome (JSON text) and, in the same
        transaction, the batch's document (its counts with this outcome);
        neither, and False, when the line has an outcome already."""

    @abc.abstractmethod
    def outcomes(self, batch_id):
        """{line: outcome text} of every line with an outcome."""

    @abc.abstractmethod
    def forget(self, batch_id):
        """Remove the batch and its outcomes."""


class SqliteBatchStore(BatchStore):
    """``STATE_DIR/batches.sqlite3``. ``synchronous=FULL``: an outcome, once
    recorded, survives a crash of the machine, not only of the worker."""

    provider = "sqlite"
    SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, created REAL NOT NULL, cancel REAL, document TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outcomes (batch TEXT NOT NULL, line INTEGER NOT NULL, outcome TEXT NOT NULL,
                                     PRIMARY KEY (batch, line));
"""

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._db, self._pid = None, None

    def _connection(self):
        """This process's one connection (opened anew after a fork), used under ``self._lock``."""
        if self._db is None or self._pid != os.getpid():
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))  # answers: the gateway user's
            for made in (self.path, self.path + "-wal", self.path + "-shm"):  # also when an earlier release made them
                if os.path.exists(made):
                    os.chmod(made, 0o600)
            self._db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            use_wal(self._db)  # SQLite gives its -wal and -shm files the database file's mode
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(self.SCHEMA)
            self._pid = os.getpid()
        return self._db

    def _run(self, statement, arguments=()):
        with self._lock:
            return self._connection().execute(statement, arguments).fetchall()

    def save(self, batch):
        self._run("INSERT INTO batches (id, created, document) VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE"
                  " SET document = excluded.document", (batch["id"], batch["created_at"], json.dumps(batch)))

    def load(self, batch_id):
        rows = self._run("SELECT document FROM batches WHERE id = ?", (batch_id,))
        return json.loads(rows[0][0]) if rows else None

    def all(self):
        return [json.loads(r[0]) for r in self._run("SELECT document FROM batches ORDER BY created DESC, id DESC")]

    def ask_cancel(self, batch_id, when):
        self._run("UPDATE batches SET cancel = ? WHERE id = ? AND cancel IS NULL", (when, batch_id))

    def cancel_asked(self, batch_id):
        rows = self._run("SELECT cancel FROM batches WHERE id = ?", (batch_id,))
        return rows[0][0] if rows else None

    def record(self, batch, line, outcome):
        with self._lock:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")  # one commit, one fsync, for the outcome and the counts
            try:
                kept = db.execute("INSERT OR IGNORE INTO outcomes (batch, line, outcome) VALUES (?, ?, ?)",
                                  (batch["id"], line, outcome)).rowcount == 1
                if kept:
                    db.execute("UPDATE batches SET document = ? WHERE id = ?", (json.dumps(batch), batch["id"]))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return kept

    def outcomes(self, batch_id):
        return dict(self._run("SELECT line, outcome FROM outcomes WHERE batch = ?", (batch_id,)))

    def forget(self, batch_id):
        self._run("DELETE FROM outcomes WHERE batch = ?", (batch_id,))
        self._run("DELETE FROM batches WHERE id = ?", (batch_id,))


class RedisBatchStore(BatchStore):
    """Keys under STATUS_PREFIX, beside the tasks and apart from them (a task
    id cannot start with "_"), and apart from other boxes' batches: a
    batch's files are on the disk of the box that made it, so one Redis
    shared by several boxes keeps each box's batches under its own ``box``
    id (``box_id``). Under ``<prefix>_<box>:``: ``batch:<id>`` (the
    document), ``batches`` (a sorted set by creation), ``batch_cancel`` (a
    hash of cancel times), ``batch_out:<id>`` (a hash line -> outcome,
    ``HSETNX``). No TTL: a batch is kept until it is deleted."""

    provider = "redis"

    def __init__(self, client, prefix, box):
        self.client = client
        self.prefix = "%s_%s:" % (prefix, box)

    def _key(self, *parts):
        return self.prefix + ":".join(parts)

    def save(self, batch):
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._key("batch", batch["id"]), json.dumps(batch))
        pipe.zadd(self._key("batches"), {batch["id"]: batch["created_at"]})
        pipe.execute()

    def load(self, batch_id):
        raw = self.client.get(self._key("batch", batch_id))
        return json.loads(raw) if raw else None

    def all(self):
        ids = [i.decode() for i in self.client.zrevrange(self._key("batches"), 0, -1)]
        raws = self.client.mget([self._key("batch", i) for i in ids]) if ids else []
        return [json.loads(raw) for raw in raws if raw]

    def ask_cancel(self, batch_id, when):
        self.client.hsetnx(self._key("batch_cancel"), batch_id, repr(when))

    def cancel_asked(self, batch_id):
        raw = self.client.hget(self._key("batch_cancel"), batch_id)
        return float(raw) if raw else None

    # KEYS: outcomes hash, document key. ARGV: line, outcome, document.
    RECORD_SCRIPT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('SET', KEYS[2], ARGV[3])
  return 1
end
return 0
"""

    def record(self, batch, line, outcome):
        return bool(self.client.eval(self.RECORD_SCRIPT, 2, self._key("batch_out", batch["id"]),
                                     self._key("batch", batch["id"]), str(line), outcome, json.dumps(batch)))

    def outcomes(self, batch_id):
        return {int(k): v.decode() for k, v in self.client.hgetall(self._key("batch_out", batch_id)).items()}

    def forget(self, batch_id):
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._key("batch", batch_id), self._key("batch_out", batch_id))
        pipe.zrem(self._key("batches"), batch_id)
        pipe.hdel(self._key("batch_cancel"), batch_id)
        pipe.execute()


def open_batch_store(config):
    """Redis when the configuration names one (as for tasks), else SQLite.
    Longer timeouts than the task store's: an outcome is worth a wait."""
    if not (config.redis_url or config.redis_host):
        return SqliteBatchStore(os.path.join(config.state_dir, "batches.sqlite3"))
    return RedisBatchStore(redis_client(config, socket_timeout=5, socket_connect_timeout=2), config.status_prefix,
                           box_id(config.state_dir))


def box_id(state_dir):
    """This box's batch namespace in a shared Redis: a random id kept in
    ``STATE_DIR/batch/box-id``, beside the files it goes with. Made once:
    written whole under another name, then linked to its own (which fails
    if another worker's is there first: that one is read)."""
    path = os.path.join(state_dir, "batch", "box-id")
    private_directory(os.path.dirname(path))
    if not os.path.exists(path):
        temporary = "%s.%s.new" % (path, uuid.uuid4().hex[:8])
        with private_file(temporary) as f:
            f.write(uuid.uuid4().hex[:16].encode())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            _remove(temporary)
        _fsync_directory(os.path.dirname(path))
    with open(path, encoding="ascii", errors="replace") as f:
        box = f.read().strip()
    if not BOX_ID_RE.fullmatch(box):
        raise RuntimeError("%s does not hold a box id (16 hex digits); with the gateway stopped, delete it only if "
                           "this box has no batches in Redis to keep" % path)
    return box


BOX_ID_RE = re.compile(r"[0-9a-f]{16}")


# ================================================================ reading an upload


def body_pieces(environ, limit, size=65536):
    """The request body in pieces of at most ``size`` bytes, never held
    whole; 413 once it passes ``limit`` (by its Content-Length before any
    read, else as it arrives)."""
    length = environ.get("CONTENT_LENGTH") or ""
    left = None
    if length:
        if not length.isdigit():
            raise GatewayError(400, "invalid_request", "Content-Length is not a number")
        left = int(length)
        if left > limit + BATCH_FORM_BYTES:
            raise GatewayError(413, "file_too_large", "the upload of %d bytes is over BATCH_MAX_FILE_BYTES (%d)"
                               % (left, limit))
    stream, seen = environ["wsgi.input"], 0
    while left is None or left > 0:
        piece = stream.read(size if left is None else min(size, left))
        if not piece:
            return
        seen += len(piece)
        if seen > limit + BATCH_FORM_BYTES:
            raise GatewayError(413, "file_too_large", "the upload is over BATCH_MAX_FILE_BYTES (%d)" % limit)
        if left is not None:
            left -= len(piece)
        yield piece


def multipart_boundary(content_type):
    match = re.search(r'boundary="?([^";]{1,200})"?', content_type or "")
    if not content_type.lower().startswith("multipart/form-data") or not match:
        raise GatewayError(400, "invalid_request", "POST /v1/files takes a multipart/form-data body "
                           "with the fields 'purpose' and 'file'")
    return match.group(1).encode("latin-1")


class Multipart:
    """A multipart/form-data body read as it arrives: each part's bytes go
    to the sink ``open_part(name, filename)`` returns (``write``), so that a
    file of 200 MB passes through in pieces. ``feed`` each piece, then ``end``."""

    HEAD_MAX = 16 * 1024

    def __init__(self, boundary, open_part):
        self.delimiter = b"\r\n--" + boundary
        self.open_part = open_part
        self.buffer = b"\r\n"  # the first delimiter has no CRLF before it
        self.state = "preamble"
        self.sink = None

    def feed(self, piece):
        self.buffer += piece
        while self._step():
            pass

    def _step(self):
        if self.state == "preamble":
            at = self.buffer.find(self.delimiter)
            if at < 0:
                self.buffer = self.buffer[-len(self.delimiter):]
                return False
            self.buffer, self.state = self.buffer[at + len(self.delimiter):], "after_delimiter"
            return True
        if self.state == "after_delimiter":
            if len(self.buffer) < 2:
                return False
            if self.buffer.startswith(b"--"):
                self.state = "end"
                return False
            self.state = "head"
            return True
        if self.state == "head":
            return self._head()
        if self.state == "data":
            return self._data()
        return False

    def _head(self):
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > self.HEAD_MAX:
                raise GatewayError(400, "invalid_request", "a multipart part's head is too long")
            return False
        head = self.buffer[:end].decode("utf-8", "replace")
        self.buffer = self.buffer[end + 4:]
        disposition = next((line for line in head.split("\r\n") if line.lower().startswith("content-disposition")),
                           "")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        self.sink = self.open_part(name.group(1) if name else "", filename.group(1) if filename else None)
        self.state = "data"
        return True

    def _data(self):
        at = self.buffer.find(self.delimiter)
        if at < 0:
            keep = len(self.delimiter) - 1
            if len(self.buffer) > keep:
                self.sink.write(self.buffer[:-keep])
                self.buffer = self.buffer[-keep:]
            return False
        self.sink.write(self.buffer[:at])
        self.buffer, self.state = self.buffer[at + len(self.delimiter):], "after_delimiter"
        return True

    def end(self):
        if self.state != "end":
            raise GatewayError(400, "invalid_request", "the multipart/form-data body ends before its last boundary")


class JsonlCheck:
    """An uploaded batch file, checked as it is written: its size, its line
    count (MAX_LINES), UTF-8 throughout, and at least one line that is a
    JSON object -- a file without one is not JSONL (a CSV, one JSON array)
    and is refused whole; any other bad line is that line's error later."""

    def __init__(self, out, limit):
        self.out, self.limit = out, limit
        self.size = self.lines = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.partial = b""
        self.has_object = False

    def write(self, data):
        self.size += len(data)
        if self.size > self.limit:
            raise GatewayError(413, "file_too_large", "the file is over BATCH_MAX_FILE_BYTES (%d bytes)" % self.limit)
        try:
            self.decoder.decode(data)
        except UnicodeDecodeError:
            raise GatewayError(400, "invalid_file", "the file is not JSONL: it is not UTF-8 text")
        self.out.write(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > self.limit:
            self.partial = b""
        for line in lines:
            self._line(line)

    def _line(self, line):
        if not line.strip():
            return
        self.lines += 1
        if self.lines > MAX_LINES:
            raise GatewayError(400, "too_many_lines", "the file has more than %d lines (requests)" % MAX_LINES)
        if not self.has_object and line.lstrip().startswith(b"{"):
            try:
                self.has_object = isinstance(json.loads(line), dict)
            except ValueError:
                pass

    def finish(self):
        try:
            self.decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise GatewayError(400, "invalid_file", "the file is not JSONL: it ends inside a UTF-8 character")
        self._line(self.partial)
        if not self.has_object:
            raise GatewayError(400, "invalid_file", "the file is not JSONL: no line is a JSON object "
                               "({\"custom_id\": ..., \"method\": \"POST\", \"url\": ..., \"body\": {...}})")


class SmallField:
    """A form field kept in memory, at most 1 KiB."""

    def __init__(self):
        self.value = b""

    def write(self, data):
        self.value = (self.value + data)[:1024]


def read_upload(environ, files, limit):
    """POST /v1/files: (purpose, filename, path of the written temporary
    file, its number of lines). The body streams to disk as it is read."""
    fields = {}
    temporary, out = files.temporary()
    check = None

    def open_part(name, filename):
        nonlocal check
        if name == "file" and filename is not None and check is None:
            check = JsonlCheck(out, limit)
            fields["filename"] = filename
            return check
        fields[name] = SmallField()
        return fields[name]

    try:
        parser = Multipart(multipart_boundary(environ.get("CONTENT_TYPE", "")), open_part)
        for piece in body_pieces(environ, limit):
            parser.feed(piece)
        parser.end()
        if check is None:
            raise GatewayError(400, "invalid_request", "the form has no 'file' part")
        check.finish()
        out.flush()
        os.fsync(out.fileno())
        out.close()
    except BaseException:
        out.close()
        _remove(temporary)
        raise
    purpose = fields.get("purpose").value.decode("utf-8", "replace") if "purpose" in fields else None
    return purpose, fields["filename"], temporary, check.lines


# ================================================================ checking lines


class LineError(Exception):
    """One input line that cannot run: its code and why."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


CUSTOM_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # Anthropic's rule for custom_id


def item_request(batch, raw, seen, config):
    """(custom_id, endpoint path, body bytes) of one input line, or LineError
    naming why it cannot run (the line's own ``custom_id`` as second value
    of the error's args when it has one)."""
    if len(raw) > config.max_body_bytes:
        raise LineError("line_too_large", "the line is %d bytes, over MAX_BODY_BYTES (%d)"
                        % (len(raw), config.max_body_bytes))
    try:
        line = json.loads(raw)
    except ValueError as error:
        raise LineError("invalid_json", "the line is not JSON: %s" % str(error)[:200])
    if not isinstance(line, dict):
        raise LineError("invalid_request", "the line must be a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("missing_custom_id", "the line has no custom_id (a non-empty string)")
    if custom_id in seen:
        raise LineError("duplicate_custom_id", "custom_id %s appears on an earlier line" % printable(custom_id))
    seen.add(custom_id)
    if batch["kind"] == "anthropic":
        body = _anthropic_body(line, custom_id)
    else:
        body = _openai_body(batch, line)
    try:  # refused at once, as the request itself would be (edgegate_body.py)
        refuse_ollama_cloud(config, body.get("model"))
    except GatewayError as error:
        raise LineError(error.code, error.message)
    if body.get("stream"):
        raise LineError("invalid_request", "stream is not supported in a batch: the result is written to a file")
    return custom_id, batch["endpoint"], json.dumps(body).encode()


def _openai_body(batch, line):
    if line.get("method", "POST") != "POST":
        raise LineError("invalid_method", "method must be POST")
    if line.get("url") != batch["endpoint"]:
        raise LineError("invalid_url", "url %s is not this batch's endpoint %s"
                        % (printable(str(line.get("url"))), batch["endpoint"]))
    if not isinstance(line.get("body"), dict):
        raise LineError("invalid_body", "body must be a JSON object (the request for %s)" % batch["endpoint"])
    return line["body"]


def _anthropic_body(line, custom_id):
    if not CUSTOM_ID_RE.fullmatch(custom_id):
        raise LineError("invalid_request", "custom_id must be 1 to 64 letters, digits, '_' or '-'")
    if not isinstance(line.get("params"), dict):
        raise LineError("invalid_request", "params must be a JSON object (a Messages API request)")
    return line["params"]


# ================================================================ result lines


def openai_line(outcome):
    """One line of an OpenAI output or error file, from a kept outcome."""
    line = {"id": "batch_req_" + uuid.uuid5(uuid.NAMESPACE_URL, outcome["item_id"]).hex[:24],
            "custom_id": outcome.get("custom_id"), "response": None, "error": None}
    if "status_code" in outcome:
        line["response"] = {"status_code": outcome["status_code"], "request_id": outcome["request_id"],
                            "body": outcome["body"]}
    else:
        line["error"] = {"code": outcome["code"], "message": outcome["message"]}
    return line


def anthropic_line(outcome):
    """One line of an Anthropic results file, from a kept outcome."""
    if outcome.get("status_code", 0) // 100 == 2:
        result = {"type": "succeeded", "message": outcome["body"]}
    elif outcome.get("code") in ("batch_expired", "batch_cancelled"):
        result = {"type": "expired" if outcome["code"] == "batch_expired" else "canceled"}
    elif "status_code" in outcome:
        body = outcome["body"] if isinstance(outcome["body"], dict) and outcome["body"].get("type") == "error" else {
            "type": "error", "error": {"type": "api_error", "message": json.dumps(outcome["body"])[:500]}}
        result = {"type": "errored", "error": body}
    else:
        result = {"type": "errored", "error": {"type": "error", "error": {
            "type": "invalid_request_error", "message": outcome["message"], "code": outcome["code"]}}}
    return {"custom_id": outcome.get("custom_id"), "result": result}


def passing_failure(outcome):
    """An answer that may well be different in a while: the upstream or the
    store unreachable, a timeout -- but not a cancel by DELETE of the item's task."""
    return outcome.get("status_code") in (502, 503, 504) and _error_code(outcome) != "cancelled"


def over_quota(outcome):
    """The gateway refused the item: its key is over a daily quota (README, "Usage and quotas")."""
    return outcome.get("status_code") == 429 and _error_code(outcome) == "quota_exceeded"


def _error_code(outcome):
    """The gateway's ``code`` in an error answer (both envelopes carry it under ``error``)."""
    body = outcome.get("body")
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def succeeded(outcome):
    return outcome.get("status_code", 0) // 100 == 2


# ================================================================ the runner


class Batches:
    """Everything a worker knows of batches: the files, the store, the runner.

        batches = Batches(config, gateway, metrics)   # after the fork, in each worker
        batches.runner.start()
    """

    def __init__(self, config, gateway, metrics):
        self.config = config
        self.files = BatchFiles(config.state_dir)
        self.store = open_batch_store(config)
        self.metrics = metrics
        self.runner = BatchRunner(self, gateway)

    def owner_key(self, owner):
        """The ApiKey named ``owner`` (None when keys are off); LineError when it is gone."""
        if not self.config.api_keys:
            return None
        for key in self.config.api_keys:
            if key.name == owner:
                return key
        raise LineError("key_gone", "the API key %s that made this batch is no longer in GATEWAY_API_KEYS"
                        % printable(owner))

    def counts_by_status(self):
        """{status: number of batches}, for /metrics (``cancelling`` as
        such); nothing when the store does not answer, so that /metrics does."""
        counts = collections.Counter()
        try:
            for batch in self.store.all():
                counts[shown_status(batch, self.store.cancel_asked(batch["id"]))] += 1
        except (redis.RedisError, sqlite3.Error) as error:
            log.warning("batch store (%s) did not answer for /metrics: %s", self.store.provider, error)
            return {}
        return counts


def shown_status(batch, cancel_asked):
    """A batch's status as clients see it: ``cancelling`` once a cancel is
    asked and until the runner has ended it."""
    if cancel_asked is not None and batch["status"] not in ENDED:
        return "cancelling"
    return batch["status"]


class Work:
    """The runner's view of one batch it works on: which lines may run, in
    order, and the counts so far (rebuilt from the store on a takeover).
    A pending line is where it stands in the input file, read again when it
    runs: a batch of 200 MB is never held in memory. The file stays open
    while the batch runs, so that a DELETE of it does not stop the batch."""

    def __init__(self, batch):
        self.batch = batch
        self.input = None  # the input file, open
        self.pending = collections.deque()  # (line, custom_id, offset, length) in the input file
        self.tries = {}  # line -> tries so far

    def request_of(self, offset, length, config):
        """(path, body) of the pending line at ``offset``, checked as when it was read."""
        self.input.seek(offset)
        _, path, body = item_request(self.batch, self.input.read(length).rstrip(b"\r\n"), set(), config)
        return path, body

    def close(self):
        if self.input is not None:
            self.input.close()


POLL_S = 1.0  # how often a runner without the lock tries it, and an idle one looks for batches


class BatchRunner:
    """Runs batches in one worker of the whole server.

    Every worker has this thread; the one that holds the flock on
    ``STATE_DIR/batch/runner.lock`` runs (``BatchTurns``), the others try
    again every POLL_S. The kernel frees the lock when its holder dies (a
    restart, a ``kill -9``), so another worker's runner takes over within
    POLL_S and picks the batch up from the store: lines with an outcome are
    done, the others run (one cut off mid-run runs again)."""

    def __init__(self, batches, gateway):
        self.lock_path = os.path.join(batches.config.state_dir, "batch", "runner.lock")
        self.wakeup = threading.Event()
        self.turns = BatchTurns(batches, gateway)
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self._run, name="edgegate-batches", daemon=True)
        self.thread.start()

    def wake(self):
        self.wakeup.set()

    def _run(self):
        private_directory(os.path.dirname(self.lock_path))
        while True:
            # 0600: another user who could open it could hold its flock and stop every batch
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                time.sleep(POLL_S)
                continue
            try:
                log.info("batch runner: this worker (pid %d) runs the batches", os.getpid())
                self._hold()
            finally:
                os.close(fd)  # never reached but by a bug: the next turn tries again

    def _hold(self):
        while True:
            try:
                if not self.turns.turn():
                    self.wakeup.wait(POLL_S)
                    self.wakeup.clear()
            except Exception:  # the store down, a full disk: the work is rebuilt from the store
                log.exception("batch runner: a turn failed; trying again")
                self.turns.forget()
                time.sleep(2 * POLL_S)


class BatchTurns:
    """The holder's work: each turn advances one batch by one step (checks
    it, runs one item, or ends it), the batch whose key was served least
    recently, so that several batches take turns between keys."""

    TRIES = 3  # an item that meets a passing failure (502, 503, 504) is tried this often before it counts

    def __init__(self, batches, gateway):
        self.batches, self.gateway = batches, gateway
        self.work = {}  # batch id -> Work
        self.served = {}  # owner -> time.monotonic() of its last item
        self.resting = {}  # owner -> time.time() until which its key is over a daily quota

    def turn(self):
        """Advance the next batch by one step; False when there is none.
        The batches of a key over its daily quota rest until the quotas
        start again (midnight UTC), but for a cancel or their window's end."""
        store, now = self.batches.store, time.time()
        live = [b for b in store.all() if b["status"] not in ENDED]
        if not live:
            self.forget()
            return False
        live = [b for b in live if self.resting.get(b["owner"], 0.0) <= now or now >= b["expires_at"]
                or store.cancel_asked(b["id"]) is not None]
        if not live:
            return False
        live.sort(key=lambda b: (self.served.get(b["owner"], 0.0), b["created_at"]))
        self.advance(live[0])
        return True

    def advance(self, batch):
        store, now = self.batches.store, time.time()
        self.served[batch["owner"]] = time.monotonic()
        work = self.work.get(batch["id"])
        if work is None:
            work = self.work[batch["id"]] = self.prepare(batch)
        batch = work.batch
        if batch["status"] == "failed":
            return self.forget(batch["id"])
        if store.cancel_asked(batch["id"]) is not None:
            return self.end(work, "cancelled")
        if now >= batch["expires_at"]:
            return self.end(work, "expired")
        if not work.pending:
            return self.end(work, "completed")
        line, custom_id, offset, length = work.pending.popleft()
        path, body = work.request_of(offset, length, self.batches.config)
        outcome = run_item(self.gateway, self.batches, batch, line, custom_id, path, body)
        if over_quota(outcome):  # not the item's failure: it runs when the key's quotas start again
            log.warning("batch %s: key %s is over its daily quota; its batches wait until midnight UTC",
                        batch["id"], printable(str(batch["owner"])))
            work.pending.appendleft((line, custom_id, offset, length))
            now = time.time()
            self.resting[batch["owner"]] = now + seconds_to_midnight(now)
            return
        tries = work.tries[line] = work.tries.get(line, 0) + 1
        if passing_failure(outcome) and tries < self.TRIES:  # Ollama restarting, say: try it again in a while
            log.warning("batch %s line %d: %s (try %d of %d)", batch["id"], line, outcome["status_code"], tries,
                        self.TRIES)
            work.pending.appendleft((line, custom_id, offset, length))
            time.sleep(POLL_S * tries)
            return
        self.keep(work, line, outcome)

    def prepare(self, batch):
        """The batch's lines read and checked (again, after a takeover): a
        bad line's error kept at once, the others pending unless done."""
        work = Work(batch)
        store, config = self.batches.store, self.batches.config
        outcomes = store.outcomes(batch["id"])
        counts = batch["counts"] = {"total": batch["counts"]["total"], "succeeded": 0, "failed": 0, "expired": 0,
                                    "cancelled": 0}
        for text in outcomes.values():
            counts[_count_of(json.loads(text))] += 1
        seen, total = set(), 0
        try:
            work.input = open(self.batches.files.path(batch["input_file_id"]), "rb")
        except FileNotFoundError:
            return self.fail(work, "file_not_found", "the input file %s was deleted before the batch ran"
                             % batch["input_file_id"])
        for line, (offset, raw) in enumerate(_lines(work.input), 1):
            total += 1
            try:
                custom_id, _, body = item_request(batch, raw, seen, config)
            except LineError as error:
                if line not in outcomes:
                    outcome = {"custom_id": _custom_id_of(raw), "item_id": "%s.%d" % (batch["id"], line),
                               "code": error.code, "message": error.message}
                    self.keep(work, line, outcome)
                continue
            batch.setdefault("model", json.loads(body).get("model"))
            if line not in outcomes:
                work.pending.append((line, custom_id, offset, len(raw)))
        counts["total"] = total
        if batch["status"] == "validating":
            batch.update(status="in_progress", in_progress_at=now_s())
        store.save(batch)
        return work

    def fail(self, work, code, message):
        """The batch cannot run at all: ``failed``, saying why (OpenAI's ``errors``)."""
        batch = work.batch
        batch.update(status="failed", failed_at=now_s(), ended_at=now_s(),
                     errors={"object": "list", "data": [{"code": code, "message": message, "line": None,
                                                         "param": None}]})
        self.batches.store.save(batch)
        work.close()
        return work

    def keep(self, work, line, outcome):
        """Keep a line's outcome (once) and count it."""
        batch, kind = work.batch, _count_of(outcome)
        batch["counts"][kind] += 1
        if not self.batches.store.record(batch, line, json.dumps(outcome)):
            batch["counts"][kind] -= 1  # kept before: counted before
            return
        self.batches.metrics.batch_item(batch["endpoint"], "invalid" if "code" in outcome and
                                        kind == "failed" else kind)

    def end(self, work, status):
        """Finish the batch: lines that did not run kept as expired or
        cancelled, the result files written, its last status."""
        batch, store = work.batch, self.batches.store
        code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(status)
        for line, custom_id, _, _ in work.pending:
            if code:
                self.keep(work, line, {"custom_id": custom_id, "item_id": "%s.%d" % (batch["id"], line),
                                       "code": code, "message": "the batch %s before this request ran"
                                       % ("expired" if status == "expired" else "was cancelled")})
        work.pending.clear()
        if status == "completed" and batch["kind"] == "openai":
            batch.update(status="finalizing", finalizing_at=now_s())
            store.save(batch)
        write_results(self.batches, batch, store.outcomes(batch["id"]))
        batch.update(status=status, ended_at=now_s())
        batch[{"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[status]] = now_s()
        store.save(batch)
        self.forget(batch["id"])
        log.info("batch %s %s: %s", batch["id"], status, batch["counts"])

    def forget(self, batch_id=None):
        """Let go of one batch's work (its input file), or of all."""
        for known in [batch_id] if batch_id else list(self.work):
            work = self.work.pop(known, None)
            if work is not None:
                work.close()


def _lines(f):
    """(offset, line) of each non-blank line of an input file, one at a time."""
    offset = 0
    for raw in f:
        if raw.strip():
            yield offset, raw.rstrip(b"\r\n")
        offset += len(raw)


def _custom_id_of(raw):
    try:
        custom_id = json.loads(raw).get("custom_id")
    except (ValueError, AttributeError):
        return None
    return custom_id if isinstance(custom_id, str) else None


def _count_of(outcome):
    if succeeded(outcome):
        return "succeeded"
    return {"batch_expired": "expired", "batch_cancelled": "cancelled"}.get(outcome.get("code"), "failed")


def write_results(batches, batch, outcomes):
    """The result files of an ended batch, made from the kept outcomes in
    line order, so each line appears once; each outcome is parsed as it is
    written, never all at once. Their ids are fixed by the batch's, so that
    a runner that dies while writing them writes the same files again."""
    def lines(shape, wanted):
        for line in sorted(outcomes):
            outcome = json.loads(outcomes[line])
            if wanted(outcome):
                yield json.dumps(shape(outcome)).encode() + b"\n"

    def add(part, purpose, shape, wanted):
        file_id = "file-" + uuid.uuid5(uuid.NAMESPACE_URL, batch["id"] + "/" + part).hex[:24]
        return batches.files.add(lines(shape, wanted), batch["owner"], purpose, "%s_%s.jsonl" % (batch["id"], part),
                                 file_id)["id"]

    if batch["kind"] == "anthropic":
        batch["results_file_id"] = add("results", "anthropic_results", anthropic_line, lambda o: True)
        return
    counts = batch["counts"]
    if counts["succeeded"]:
        batch["output_file_id"] = add("output", "batch_output", openai_line, succeeded)
    if counts["failed"] + counts["expired"]:  # OpenAI's error file does not list the lines a cancel skipped
        batch["error_file_id"] = add("error", "batch_output", openai_line,
                                     lambda o: not succeeded(o) and o.get("code") != "batch_cancelled")


def run_item(gateway, batches, batch, line, custom_id, path, body):
    """One item, through the gateway's own WSGI app as its owner's request:
    the outcome to keep (status, request id = its task id, the answer)."""
    item_id = "%s.%d.%s" % (batch["id"], line, uuid.uuid4().hex[:6])
    try:
        key = batches.owner_key(batch["owner"])
    except LineError as error:
        return {"custom_id": custom_id, "item_id": item_id, "code": error.code, "message": error.message}
    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "edgegate-batch",
        "SERVER_PORT": "0", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "batch", "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)), "HTTP_X_TASK_ID": item_id, "HTTP_USER_AGENT": "edgegate-batch",
        "wsgi.input": io.BytesIO(body), "wsgi.errors": io.StringIO(), "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0), "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
        BATCH_ITEM: BatchItemMark(batch["id"], line, key),
    }
    answer, pieces = {}, []

    def start_response(status, headers, exc_info=None):
        answer.update(status=int(status.split()[0]), headers={k.lower(): v for k, v in headers})
        return pieces.append

    result = gateway(environ, start_response)
    try:
        for piece in result:
            pieces.append(piece)
    finally:
        if hasattr(result, "close"):
            result.close()
    raw = b"".join(pieces)
    if answer["headers"].get("content-encoding", "").lower() in ("gzip", "x-gzip"):
        raw = gzip.decompress(raw)
    try:
        document = json.loads(raw)
    except ValueError:
        document = {"error": {"message": raw.decode("utf-8", "replace")[:500], "type": "invalid_answer"}}
    return {"custom_id": custom_id, "item_id": item_id, "status_code": answer["status"], "request_id": item_id,
            "body": document}
