"""Task status: where every request through edgegate stands, kept in Redis or
in an embedded SQLite file.

A task is one proxied request. Its document (README, "Task status") goes through

    PENDING (waiting for the GPU slot)
      -> RUNNING (stage "forwarding", then "streaming"; refreshed as a heartbeat)
      -> SUCCESS | FAILED (stage says why)

Two stores keep the documents with the same contract:

* ``RedisStore``  -- key ``<prefix><task_id>`` (a JSON string) with a TTL, and a
  sorted set ``<prefix>_index`` (score = creation time) for listing, so that
  listing never scans the keyspace.
* ``SqliteStore`` -- one table in ``STATE_DIR/tasks.sqlite3``, shared by every
  worker process through SQLite's own file locking, expiring on the same TTLs.

``TaskBoard`` sits between the gateway and a store. It never lets the store
hold up inference: every call has a short timeout, a failure is logged once
and starts a cool-down during which the store is not asked at all, and status
queries get ``StoreUnavailable`` (503 ``store_unavailable``) meanwhile.

A worker that dies (SIGKILL after ``graceful_timeout``) cannot write its task's
last state. Such a task stops being refreshed, and once its heartbeat is older
than ``stale_after`` seconds every reader sees it as FAILED, stage ``timeout``;
its id can then be used again. The TTL removes it in the end.
"""

import abc
import json
import logging
import os
import sqlite3
import threading
import time
import uuid

import redis

PENDING, RUNNING, SUCCESS, FAILED = "PENDING", "RUNNING", "SUCCESS", "FAILED"
LIVE_STATES = (PENDING, RUNNING)
# A streaming task's progress (README, "Live page"); its final document has the exact token counts instead.
LIVE_ONLY_EXTENSIONS = ("tokens_so_far", "tokens_per_second")
STATES = (PENDING, RUNNING, SUCCESS, FAILED)

# The Redis store's own keys start with "_" after the prefix, which no task id
# can (a task id starts with a letter or digit): a task id never names anything
# but a task, so "index" is a task id like any other.
INDEX_SUFFIX, CANCELS_SUFFIX = "_index", "_cancels"

# How many tasks the list index remembers at most; older entries are trimmed.
INDEX_MAX = 10000

# How long the store is left alone after a failure before it is tried again.
STORE_COOLDOWN_S = 5.0

# Redis and SQLite calls must answer within this, or the store counts as down.
STORE_TIMEOUT_S = 0.25

log = logging.getLogger("edgegate.status")


class StoreUnavailable(Exception):
    """The task store did not answer; ``provider`` is "redis" or "sqlite"."""

    def __init__(self, provider, detail):
        super().__init__(detail)
        self.provider = provider


def store_id(task_id, owner=None):
    """Where a task is kept: its id, or ``<key name>/<id>`` when API keys are
    on, so that each key has its own ids (neither part can hold a "/")."""
    return task_id if owner is None else owner + "/" + task_id


def _store_id_of(document):
    return store_id(document["task_id"], document["extensions"].get("key"))


def seen_now(document, stale_after, now=None):
    """The document as a reader should see it: a live task whose heartbeat is
    older than ``stale_after`` lost its worker and is reported FAILED."""
    if document is None or document.get("state") not in LIVE_STATES:
        return document
    now = time.time() if now is None else now
    if now - document.get("timestamp", now) <= stale_after:
        return document
    document = dict(document)
    document.update(
        state=FAILED,
        stage="timeout",
        message="no heartbeat for %.0f s: the worker serving this task is gone" % (now - document["timestamp"]),
    )
    return document


def _pick_recent(pages, limit, state, stale_after, owner=None, newest=None):
    """Newest-first documents from ``pages`` (an iterator of lists of
    documents, newest first), filtered by ``state`` and by the key that made
    them (``owner``, when given), at most ``limit``, among the ``newest``
    documents only (when given: a page that polls must not read the whole
    list for a key that has few tasks)."""
    items = []
    now = time.time()
    looked_at = 0
    for page in pages:
        for document in page:
            looked_at += 1
            if newest is not None and looked_at > newest:
                return items
            document = seen_now(document, stale_after, now)
            if owner is not None and document["extensions"].get("key") != owner:
                continue
            if state is None or document["state"] == state:
                items.append(document)
                if len(items) >= limit:
                    return items
    return items


# ---------------------------------------------------------------- the store's interface


class TaskStore(abc.ABC):
    """What a task store does; ``RedisStore`` and ``SqliteStore`` each do all
    of it, with the same contract (README, "Task status"). Any method may
    raise (a redis, sqlite3 or socket error): ``TaskBoard`` handles that."""

    provider = None  # named in errors: "redis" or "sqlite"

    @abc.abstractmethod
    def claim(self, document):
        """Write a task's first document; False when its id is live already."""

    @abc.abstractmethod
    def put(self, documents, then=None):
        """Write these documents (heartbeats, changes, final states). ``then``:
        a step of the same round trip (a request's usage, edgegate_usage.py),
        given the Redis pipeline, or the SQLite connection inside the write's
        transaction."""

    @abc.abstractmethod
    def get(self, task_id):
        """The document kept as ``task_id`` (a store id), or None."""

    @abc.abstractmethod
    def recent(self, limit, state=None, owner=None, newest=None):
        """Up to ``limit`` documents, newest first; of ``state`` and ``owner`` (a key name) if given;
        among the ``newest`` documents only, if given."""

    @abc.abstractmethod
    def request_cancel(self, task_id):
        """Ask whichever worker runs ``task_id`` to cancel it (DELETE /tasks/<id>)."""

    @abc.abstractmethod
    def cancels_among(self, task_ids):
        """Which of ``task_ids`` have a cancel asked for (read by each worker's watcher)."""

    @abc.abstractmethod
    def ping(self):
        """Raise unless the store answers."""

    def tidy(self):
        """Set aside what an earlier release left in the store; nothing by default."""


# ---------------------------------------------------------------- Redis store


class RedisStore(TaskStore):
    """Task documents in Redis (README, "Task status").

    One request costs two round trips on its own thread: the claim (a Lua
    script: refuse a live id, else write the document and index it) and the
    final document. Intermediate states and heartbeats of all the tasks of a
    worker are written together, in one pipeline, by the worker's watcher.
    """

    provider = "redis"

    # KEYS: document key, index key, cancels key. ARGV: document, ttl, score, task id, stale-before.
    CLAIM_SCRIPT = """
local read, current = pcall(redis.call, 'GET', KEYS[1])
if read and current then
  local ok, doc = pcall(cjson.decode, current)
  if ok and type(doc) == 'table' and (doc.state == 'PENDING' or doc.state == 'RUNNING')
     and (tonumber(doc.timestamp) or 0) > tonumber(ARGV[5]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[4])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(%d + 1))
return 1
""" % INDEX_MAX

    def __init__(self, client, prefix, ttl_running, ttl_done, stale_after):
        self.client = client
        self.prefix = prefix
        self.index_key = prefix + INDEX_SUFFIX
        self.cancels_key = prefix + CANCELS_SUFFIX
        self.ttl_running = ttl_running
        self.ttl_done = ttl_done
        self.stale_after = stale_after
        self._claim = client.register_script(self.CLAIM_SCRIPT)

    @classmethod
    def from_config(cls, config, stale_after):
        no_retry = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
        client = redis_client(config, socket_timeout=STORE_TIMEOUT_S, socket_connect_timeout=STORE_TIMEOUT_S,
                              retry=no_retry, health_check_interval=0)
        return cls(client, config.status_prefix, config.ttl_running, config.ttl_done, stale_after)

    def _ttl(self, document):
        return self.ttl_running if document["state"] in LIVE_STATES else self.ttl_done

    def claim(self, document):
        stale_before = time.time() - self.stale_after
        done = self._claim(
            keys=[self.prefix + _store_id_of(document), self.index_key, self.cancels_key],
            args=[json.dumps(document), self._ttl(document), document["timestamp"], _store_id_of(document),
                  stale_before],
        )
        return bool(done)

    def put(self, documents, then=None):
        pipe = self.client.pipeline(transaction=False)
        for document in documents:
            pipe.set(self.prefix + _store_id_of(document), json.dumps(document), ex=self._ttl(document))
        if then is not None:
            then(pipe)
        pipe.execute()

    def get(self, task_id):
        """None for no task -- and for a key under the prefix that holds no
        task document (another type, as the first release's bookkeeping
        keys, or text that is not one): logged, and never taken as the
        store being down."""
        try:
            raw = self.client.get(self.prefix + task_id)
        except redis.ResponseError as error:
            if "WRONGTYPE" not in str(error):
                raise
            log.warning("task store (redis): %s%s is not a task document (%s); answered as no task",
                        self.prefix, task_id[:200], error)
            return None
        document = _task_document(raw, self.prefix + task_id) if raw else None
        return seen_now(document, self.stale_after) if document else None

    # The first release kept its bookkeeping at <prefix>index and <prefix>cancels,
    # names that are task ids now (README, "Task status", upgrading).
    FIRST_RELEASE_KEYS = ("index", "cancels")

    def tidy(self):
        """The first release's bookkeeping keys, if still there, are moved to
        ``<prefix>_first_release_<name>`` (no task id can start with "_"), so
        that ``index`` and ``cancels`` are task ids like any other. With an
        empty STATUS_PREFIX those names may be another program's: left alone."""
        for name in self.FIRST_RELEASE_KEYS if self.prefix else ():
            old = self.prefix + name
            if self.client.type(old) in (b"none", b"string"):
                continue
            try:
                self.client.rename(old, self.prefix + "_first_release_" + name)
            except redis.ResponseError:  # another worker moved it first
                continue
            log.warning("task store (redis): moved the first release's %s to %s_first_release_%s",
                        old, self.prefix, name)

    def recent(self, limit, state=None, owner=None, newest=None):
        def pages(page_size=max(limit, 100)):
            start = 0
            while True:
                ids = self.client.zrevrange(self.index_key, start, start + page_size - 1)
                if not ids:
                    return
                raws = self.client.mget([self.prefix + i.decode() for i in ids])
                gone = [i for i, raw in zip(ids, raws) if raw is None]
                if gone:  # expired documents leave the index as they are met
                    self.client.zrem(self.index_key, *gone)
                documents = (_task_document(raw, i) for i, raw in zip(ids, raws) if raw is not None)
                yield [document for document in documents if document is not None]
                start += page_size - len(gone)

        return _pick_recent(pages(), limit, state, self.stale_after, owner, newest)

    def request_cancel(self, task_id):
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.cancels_key, {task_id: now})
        pipe.zremrangebyscore(self.cancels_key, "-inf", now - self.ttl_running)
        pipe.execute()

    def cancels_among(self, task_ids):
        task_ids = list(task_ids)
        scores = self.client.zmscore(self.cancels_key, task_ids)
        return {t for t, score in zip(task_ids, scores) if score is not None}

    def ping(self):
        self.client.ping()


def _task_document(raw, where):
    """A stored task document, or None (logged) when the value is not one."""
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("extensions"), dict) and "state" in document \
            and isinstance(document.get("timestamp"), (int, float)):
        return document
    log.warning("task store (redis): %r is not a task document; left out", where[:200])
    return None


# ---------------------------------------------------------------- SQLite store


def _one_at_a_time(method):
    def locked(self, *args):
        with self._lock:
            return method(self, *args)
    locked.__name__ = method.__name__
    locked.__doc__ = method.__doc__
    return locked


class SqliteStore(TaskStore):
    """Task documents in one SQLite file, for a box without Redis.

    Every worker process opens the same file; SQLite's locking makes a claim
    in one worker visible to the others. WAL mode lets readers run beside the
    single writer, and ``synchronous=NORMAL`` skips an fsync per commit (a
    power cut may lose the last statuses, never corrupt the file).
    """

    provider = "sqlite"

    SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id   TEXT PRIMARY KEY,
    state     TEXT NOT NULL,
    created   REAL NOT NULL,
    updated   REAL NOT NULL,
    expires   REAL NOT NULL,
    cancel    INTEGER NOT NULL DEFAULT 0,
    document  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_created ON tasks (created);
"""
    PURGE_EVERY_S = 60.0

    def __init__(self, path, ttl_running, ttl_done, stale_after):
        self.path = path
        self.ttl_running = ttl_running
        self.ttl_done = ttl_done
        self.stale_after = stale_after
        self._lock = threading.Lock()
        self._db = None
        self._pid = None
        self._next_purge = 0.0

    @classmethod
    def from_config(cls, config, stale_after):
        return cls(os.path.join(config.state_dir, "tasks.sqlite3"), config.ttl_running, config.ttl_done, stale_after)

    def prepare(self):
        """Make the file ready (WAL mode, the table), from gunicorn's arbiter
        before the workers are forked (gunicorn.conf.py, ``on_starting``):
        the workers then find it ready, rather than all set it up at once."""
        with self._lock:
            self._connection()
            self._db.close()
            self._db = None

    def _connection(self):
        """This process's one connection (opened anew after a fork), used
        under ``self._lock``: SQLite runs one writer at a time anyway, and
        one connection keeps the descriptors from growing with the threads.
        Opened on first use: a store that fails then is the board's to
        handle (``TaskBoard``), never a failed start of the worker."""
        if self._db is None or self._pid != os.getpid():
            db = sqlite3.connect(self.path, timeout=STORE_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            try:
                use_wal(db)
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(self.SCHEMA)
            except BaseException:
                db.close()
                raise
            self._db, self._pid = db, os.getpid()
        return self._db

    def _expires(self, document, now):
        return now + (self.ttl_running if document["state"] in LIVE_STATES else self.ttl_done)

    @_one_at_a_time
    def claim(self, document):
        # One statement, so one atomic write: insert, or replace a task that
        # is finished, expired or stale -- never a live one.
        now = time.time()
        cursor = self._connection().execute(
            "INSERT INTO tasks (task_id, state, created, updated, expires, cancel, document)"
            " VALUES (?, ?, ?, ?, ?, 0, ?)"
            " ON CONFLICT (task_id) DO UPDATE SET state = excluded.state, created = excluded.created,"
            " updated = excluded.updated, expires = excluded.expires, cancel = 0, document = excluded.document"
            " WHERE NOT (tasks.state IN ('PENDING', 'RUNNING') AND tasks.expires > ? AND tasks.updated >= ?)",
            (_store_id_of(document), document["state"], now, document["timestamp"], self._expires(document, now),
             json.dumps(document), now, now - self.stale_after),
        )
        return cursor.rowcount == 1

    @_one_at_a_time
    def put(self, documents, then=None):
        db = self._connection()
        now = time.time()
        rows = [
            (_store_id_of(d), d["state"], now, d["timestamp"], self._expires(d, now), json.dumps(d))
            for d in documents
        ]
        upsert = ("INSERT INTO tasks (task_id, state, created, updated, expires, document) VALUES (?, ?, ?, ?, ?, ?)"
                  " ON CONFLICT (task_id) DO UPDATE SET state = excluded.state, updated = excluded.updated,"
                  " expires = excluded.expires, document = excluded.document")
        if len(rows) == 1 and then is None:
            db.execute(upsert, rows[0])  # one statement is its own transaction
        else:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(upsert, rows)
                if then is not None:
                    then(db)
            finally:
                db.execute("COMMIT")
        if now >= self._next_purge:
            self._next_purge = now + self.PURGE_EVERY_S
            db.execute("DELETE FROM tasks WHERE expires < ?", (now,))

    @_one_at_a_time
    def get(self, task_id):
        row = self._connection().execute(
            "SELECT document FROM tasks WHERE task_id = ? AND expires > ?", (task_id, time.time())
        ).fetchone()
        return seen_now(json.loads(row[0]), self.stale_after) if row else None

    @_one_at_a_time
    def recent(self, limit, state=None, owner=None, newest=None):
        db = self._connection()

        def pages(page_size=max(limit, 100)):
            offset, now = 0, time.time()
            while True:
                rows = db.execute(
                    "SELECT document FROM tasks WHERE expires > ? ORDER BY created DESC LIMIT ? OFFSET ?",
                    (now, page_size, offset),
                ).fetchall()
                if not rows:
                    return
                yield [json.loads(r[0]) for r in rows]
                offset += page_size

        return _pick_recent(pages(), limit, state, self.stale_after, owner, newest)

    @_one_at_a_time
    def request_cancel(self, task_id):
        self._connection().execute("UPDATE tasks SET cancel = 1 WHERE task_id = ?", (task_id,))

    @_one_at_a_time
    def cancels_among(self, task_ids):
        task_ids = list(task_ids)
        marks = ",".join("?" * len(task_ids))
        rows = self._connection().execute(
            "SELECT task_id FROM tasks WHERE cancel = 1 AND task_id IN (%s)" % marks, task_ids
        ).fetchall()
        return {r[0] for r in rows}

    @_one_at_a_time
    def ping(self):
        self._connection().execute("SELECT 1").fetchone()


def use_wal(db):
    """WAL mode, which the file keeps once set. Setting it needs the
    file to itself, and fails with "database is locked" when another
    process opens the file meanwhile (two workers' first requests on a
    new file did): so the mode is looked at first, and set again for up
    to a second while the file is busy."""
    deadline = time.monotonic() + 1.0
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")  # a file system without WAL keeps its mode
            return
        except sqlite3.OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


# ---------------------------------------------------------------- opening the store


def prepare_store(config):
    """Before the workers start: the SQLite file made ready (WAL mode, its
    table); a Redis store needs nothing. A failure is logged, never fatal:
    the gateway serves without a store, and each worker tries again."""
    try:
        store = open_store(config)
        if isinstance(store, SqliteStore):
            store.prepare()
    except Exception as error:
        log.warning("task store (%s) could not be prepared: %s", "redis" if config.redis_url or config.redis_host
                    else "sqlite", error)


def redis_client(config, **options):
    """A client of the Redis the configuration names (REDIS_URL, or REDIS_HOST and the rest)."""
    if config.redis_url:
        return redis.Redis.from_url(config.redis_url, **options)
    return redis.Redis(host=config.redis_host, port=config.redis_port, username=config.redis_user or None,
                       password=config.redis_password or None, db=config.redis_db, **options)


def open_store(config):
    """Redis when the configuration names one, else the SQLite file."""
    stale_after = max(3 * config.heartbeat_sec, 5.0)
    if config.redis_url or config.redis_host:
        return RedisStore.from_config(config, stale_after)
    return SqliteStore.from_config(config, stale_after)


# ---------------------------------------------------------------- the board


class TaskBoard:
    """The gateway's only way to the store.

    Writes (``claim``, ``put``) and the watcher's ``cancels_among`` never
    raise: when the store fails they log once, start a cool-down of
    ``STORE_COOLDOWN_S`` during which the store is not asked at all, and
    report that nothing was stored. Reads for the status API (``get``,
    ``recent``, ``request_cancel``, ``ping``) raise ``StoreUnavailable``
    instead, so the client gets a 503 ``store_unavailable`` rather than a
    wrong answer.
    """

    def __init__(self, store, on_failure=None):
        self.store = store
        self.provider = store.provider
        self.on_failure = on_failure or (lambda: None)
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down = False

    def _failed(self, error):
        self.on_failure()
        with self._lock:
            self._down_until = time.monotonic() + STORE_COOLDOWN_S
            if not self._down:
                self._down = True
                log.warning(
                    "task store (%s) unavailable: %s; requests are still proxied, "
                    "statuses are not recorded; retrying every %.0f s",
                    self.provider, error, STORE_COOLDOWN_S,
                )

    def _answered(self):
        if self._down:
            with self._lock:
                if self._down:
                    self._down = False
                    log.warning("task store (%s) reachable again; statuses are recorded", self.provider)

    def _cooling_down(self):
        return time.monotonic() < self._down_until

    # -- writes and the watcher's reads: never raise

    def claim(self, document):
        """False when the id is live elsewhere; with the store down the claim
        is let through (nothing to check against)."""
        return self._quietly(self.store.claim, document, default=True)

    def put(self, documents, then=None):
        self._quietly(self.store.put, documents, then)

    def cancels_among(self, task_ids):
        return self._quietly(self.store.cancels_among, task_ids, default=set())

    # -- the status API's reads: StoreUnavailable when the store is down

    def get(self, task_id):
        return self._asked(self.store.get, task_id)

    def recent(self, limit, state=None, owner=None, newest=None):
        return self._asked(self.store.recent, limit, state, owner, newest)

    def request_cancel(self, task_id):
        return self._asked(self.store.request_cancel, task_id)

    def ping(self):
        return self._asked(self.store.ping)

    def tidy(self):
        """The store's ``tidy`` (once per worker, at its start); a failure is logged, never raised."""
        self._quietly(self.store.tidy)

    def _quietly(self, step, *args, default=None):
        """``step(*args)``, or ``default`` when the store is down."""
        if self._cooling_down():
            return default
        try:
            result = step(*args)
        except Exception as error:  # redis, sqlite3 and socket errors alike
            self._failed(error)
            return default
        self._answered()
        return result

    def _asked(self, step, *args):
        """``step(*args)`` for the status API: raises StoreUnavailable."""
        if self._cooling_down():
            raise StoreUnavailable(self.provider, "task store (%s) is unavailable" % self.provider)
        try:
            result = step(*args)
        except Exception as error:
            self._failed(error)
            raise StoreUnavailable(self.provider, "task store (%s) is unavailable: %s" % (self.provider, error))
        self._answered()
        return result


# ---------------------------------------------------------------- one task


class Task:
    """One request's status document and its writes.

    ``claim`` and ``finish`` write at once, on the request's thread: the claim
    must answer 409 for a live id, and the final state must be stored before
    the client sees the end of the response. Everything in between only marks
    the task dirty; the worker's watcher writes dirty tasks and heartbeats in
    one batch (``flush_tasks``). ``lock`` keeps a heartbeat from overwriting
    the final state.
    """

    def __init__(self, board, task_id, algorithm_id, method, path, owner=None):
        self.board = board
        self.task_id = task_id
        self.store_id = store_id(task_id, owner)  # owner: the name of the API key that made it
        self.algorithm_id = algorithm_id
        self.state = PENDING
        self.stage = "queued"
        self.message = "waiting for a GPU slot"
        self.extensions = {
            "method": method, "path": path, "stream": False, "model": None, "upstream_status": None,
            "prompt_tokens": None, "completion_tokens": None, "ttft_ms": None, "duration_ms": None,
        }
        if owner is not None:
            self.extensions["key"] = owner
        self.lock = threading.Lock()
        self.dirty = False
        self.finished = False
        self.written_at = 0.0  # time.monotonic() of the last write

    def document(self):
        return {
            "version": "1.0",
            "event_type": "task.status.update",
            "event_id": str(uuid.uuid4()),
            "algorithm_id": self.algorithm_id,
            "task_id": self.task_id,
            "state": self.state,
            "stage": self.stage,
            "message": self.message,
            "extensions": dict(self.extensions),
            "timestamp": round(time.time(), 3),
        }

    def claim(self):
        """Write the first document; False when the id is live elsewhere.
        With the store down the claim is let through (nothing to check against)."""
        with self.lock:
            self.written_at = time.monotonic()
            return self.board.claim(self.document())

    def set(self, state=None, stage=None, message=None, **extensions):
        """Change the document; the watcher writes it within a tick."""
        with self.lock:
            if self.finished:
                return
            if state:
                self.state = state
            if stage:
                self.stage = stage
            if message is not None:
                self.message = message
            self.extensions.update(extensions)
            self.dirty = True

    def finish(self, state, stage, message, then=None, **extensions):
        """Write the final document now, with ``then`` in the same round trip
        (``TaskStore.put``). Only the first call counts. What only a live
        task has (a stream's tokens so far) is left out of it."""
        with self.lock:
            if self.finished:
                return
            self.finished = True
            self.state, self.stage, self.message = state, stage, message
            for live_only in LIVE_ONLY_EXTENSIONS:
                self.extensions.pop(live_only, None)
            self.extensions.update(extensions)
            self.board.put([self.document()], then)


def flush_tasks(board, tasks, heartbeat_sec):
    """Write, in one batch, the tasks that changed and those due a heartbeat."""
    now = time.monotonic()
    due, locked = [], []
    for task in tasks:
        task.lock.acquire()
        if not task.finished and (task.dirty or now - task.written_at >= heartbeat_sec):
            due.append(task)
            locked.append(task)
        else:
            task.lock.release()
    try:
        if due:
            board.put([t.document() for t in due])
            for task in due:
                task.dirty = False
                task.written_at = now
    finally:
        for task in locked:
            task.lock.release()
