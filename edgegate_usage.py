"""Usage per API key and model, by UTC day, and the quotas per key (README,
"Usage and quotas").

Every inference request that was forwarded adds, when it ends, to its key's
and its model's figures of the day: requests, prompt and completion tokens (as the answer reported
them: Ollama's ``prompt_eval_count``/``eval_count``, OpenAI's or
Anthropic's ``usage``), GPU-seconds (how long the slot was held) and queue
seconds. They are kept beside the task documents, in the same store, so that
every worker -- and with Redis every box -- adds to the same figures:

* ``RedisUsage``  -- one hash per day, ``<prefix>_usage:<YYYY-MM-DD>``, its
  fields ``<key>\\t<figure>\\t<model>`` and, for the quotas, each key's day
  totals ``<key>\\tquota_tokens`` and ``<key>\\tquota_gpu_seconds``; the hash
  expires USAGE_DAYS after its day began.
* ``SqliteUsage`` -- a table ``usage`` (day, key, model, the figures) in the
  task store's SQLite file; days older than USAGE_DAYS are deleted.

The addition rides on the request's final task write (``status.Task.finish``
with ``then``): one Lua EVAL in the same Redis pipeline, one statement in the
same SQLite transaction, so a request costs no store round trip more than it did.

``Quotas`` checks a key's ``tokens_per_day`` and ``gpu_seconds_per_day``
before its request takes a place in the GPU line, against figures each
worker reads at most once a second per limited key (and adds its own
requests to at once). ``KnownModels`` is the list of models Ollama has
(``/api/tags``), which bounds the metrics' ``model`` label.
"""

import abc
import calendar
import dataclasses
import functools
import json
import logging
import math
import os
import sqlite3
import threading
import time
import urllib.request

from status import STORE_COOLDOWN_S, STORE_TIMEOUT_S, StoreUnavailable

log = logging.getLogger("edgegate.usage")

DAY_S = 86400
FIGURES = ("requests", "prompt_tokens", "completion_tokens", "gpu_seconds", "queue_seconds")
NO_KEY = "-"  # the key name when GATEWAY_API_KEYS is not set
OTHER_MODEL = "other"  # a model Ollama does not list (a typo, a name made up to grow the series)


def day_of(unix_time):
    """The UTC day of a unix time, ``YYYY-MM-DD``."""
    return _day_name(int(unix_time // DAY_S))


@functools.lru_cache(maxsize=64)  # once per request: the same day nearly always
def _day_name(day_number):
    """A day's name, from its number (days since 1970-01-01: unix time counts every UTC day as 86400 s)."""
    return time.strftime("%Y-%m-%d", time.gmtime(day_number * DAY_S))


def day_start(day):
    """The unix time at which a UTC day (``YYYY-MM-DD``) begins; ValueError if it is no date."""
    return calendar.timegm(time.strptime(day, "%Y-%m-%d"))


def seconds_to_midnight(unix_time):
    """Whole seconds until the next UTC midnight, when every daily quota starts again (at least 1)."""
    return max(1, math.ceil(DAY_S - unix_time % DAY_S))


@dataclasses.dataclass
class Usage:
    """What one finished inference request adds to its key's and model's day."""

    key: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    gpu_seconds: float
    queue_seconds: float
    at: float  # unix time it finished: its day

    @property
    def day(self):
        return day_of(self.at)

    @property
    def day_began(self):
        """The unix time its UTC day began."""
        return int(self.at // DAY_S) * DAY_S

    @property
    def tokens(self):
        return self.prompt_tokens + self.completion_tokens


def empty_figures():
    return {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "gpu_seconds": 0.0, "queue_seconds": 0.0}


def add_figures(into, figures):
    """Add one ``{key: {model: figures}}`` to another, in place."""
    for key, models in figures.items():
        for model, numbers in models.items():
            kept = into.setdefault(key, {}).setdefault(model, empty_figures())
            for name in FIGURES:
                kept[name] += numbers.get(name, 0)
    return into


def rounded(figures):
    """``{key: {model: figures}}`` with the seconds rounded to milliseconds, for an answer."""
    for models in figures.values():
        for numbers in models.values():
            numbers["gpu_seconds"] = round(numbers["gpu_seconds"], 3)
            numbers["queue_seconds"] = round(numbers["queue_seconds"], 3)
    return figures


# ---------------------------------------------------------------- the store's interface


class UsageStore(abc.ABC):
    """What a usage store does; ``RedisUsage`` and ``SqliteUsage`` each do all
    of it, with the same contract. Reads raise on a store failure."""

    provider = None  # named in errors: "redis" or "sqlite"

    @abc.abstractmethod
    def adding(self, usage):
        """A step that adds ``usage`` to its day, for the final task write's
        own round trip (``status.TaskStore.put``'s ``then``)."""

    @abc.abstractmethod
    def days(self, first, last, key=None):
        """``{day: {key: {model: figures}}}`` of the days ``first`` to ``last``
        (``YYYY-MM-DD``), of ``key`` (a key name) alone when given."""

    @abc.abstractmethod
    def spent(self, key, day):
        """(tokens, GPU-seconds) of ``key`` on ``day``: what its quotas are checked against."""


# ---------------------------------------------------------------- Redis


class RedisUsage(UsageStore):
    """Usage in Redis, one hash a day (module docstring)."""

    provider = "redis"

    def __init__(self, client, prefix, usage_days):
        self.client = client
        self.prefix = prefix + "_usage:"  # "_": the store's own keys, which no task id can name (status.py)
        self.keep_s = usage_days * DAY_S

    # One command in the final write's pipeline, not eight: each command
    # costs the gateway about 8 us to pack and read back, the script's text
    # about as much as one (EVAL, not EVALSHA: a restarted Redis has no
    # script cache, and a NOSCRIPT error would fail the task's write too).
    # KEYS: the day's hash. ARGV: key name + tab, model, prompt tokens,
    # completion tokens, GPU-seconds, queue seconds, unix time it expires.
    ADD_SCRIPT = b"""
local day, key, model = KEYS[1], ARGV[1], ARGV[2]
local tokens = tonumber(ARGV[3]) + tonumber(ARGV[4])
redis.call('HINCRBY', day, key .. 'requests\t' .. model, 1)
redis.call('HINCRBY', day, key .. 'prompt_tokens\t' .. model, ARGV[3])
redis.call('HINCRBY', day, key .. 'completion_tokens\t' .. model, ARGV[4])
redis.call('HINCRBYFLOAT', day, key .. 'gpu_seconds\t' .. model, ARGV[5])
redis.call('HINCRBYFLOAT', day, key .. 'queue_seconds\t' .. model, ARGV[6])
redis.call('HINCRBY', day, key .. 'quota_tokens', tokens)
redis.call('HINCRBYFLOAT', day, key .. 'quota_gpu_seconds', ARGV[5])
redis.call('EXPIREAT', day, ARGV[7])
return 1
"""

    def adding(self, usage):
        args = (usage.key + "\t", usage.model, usage.prompt_tokens, usage.completion_tokens,
                repr(float(usage.gpu_seconds)), repr(float(usage.queue_seconds)), usage.day_began + self.keep_s)

        def add(pipe):
            pipe.eval(self.ADD_SCRIPT, 1, self.prefix + usage.day, *args)
        return add

    def days(self, first, last, key=None):
        names = _days_between(first, last)
        pipe = self.client.pipeline(transaction=False)
        for day in names:
            pipe.hgetall(self.prefix + day)
        found = {}
        for day, fields in zip(names, pipe.execute()):
            figures = {}
            for field, value in fields.items():
                parts = field.decode("utf-8", "replace").split("\t", 2)
                if len(parts) != 3 or parts[1] not in FIGURES or (key is not None and parts[0] != key):
                    continue  # a quota total, or another key's
                numbers = figures.setdefault(parts[0], {}).setdefault(parts[2], empty_figures())
                numbers[parts[1]] = float(value) if parts[1].endswith("seconds") else int(value)
            if figures:
                found[day] = figures
        return found

    def spent(self, key, day):
        tokens, gpu_seconds = self.client.hmget(self.prefix + day, [key + "\tquota_tokens",
                                                                    key + "\tquota_gpu_seconds"])
        return int(tokens or 0), float(gpu_seconds or 0)


def _days_between(first, last):
    start, end = day_start(first), day_start(last)
    return [day_of(t) for t in range(start, end + 1, DAY_S)]


# ---------------------------------------------------------------- SQLite


class SqliteUsage(UsageStore):
    """Usage in a table of the task store's SQLite file (module docstring).
    The additions are made on the task store's connection, in the
    transaction of the final task write; reads use a connection of their own."""

    provider = "sqlite"

    SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day               TEXT NOT NULL,
    key               TEXT NOT NULL,
    model             TEXT NOT NULL,
    requests          INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    gpu_seconds       REAL NOT NULL,
    queue_seconds     REAL NOT NULL,
    PRIMARY KEY (day, key, model)
) WITHOUT ROWID;
"""
    ADD = ("INSERT INTO usage VALUES (?, ?, ?, 1, ?, ?, ?, ?) ON CONFLICT (day, key, model) DO UPDATE SET"
           " requests = requests + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
           " completion_tokens = completion_tokens + excluded.completion_tokens,"
           " gpu_seconds = gpu_seconds + excluded.gpu_seconds, queue_seconds = queue_seconds + excluded.queue_seconds")
    PURGE_EVERY_S = 3600.0

    def __init__(self, path, usage_days):
        self.path = path
        self.usage_days = usage_days
        self._lock = threading.Lock()
        self._db, self._pid = None, None
        self._next_purge = 0.0
        with self._lock:
            self._connection().executescript(self.SCHEMA)

    def _connection(self):
        if self._db is None or self._pid != os.getpid():
            self._db = sqlite3.connect(self.path, timeout=STORE_TIMEOUT_S, isolation_level=None,
                                       check_same_thread=False)
            self._pid = os.getpid()
        return self._db

    def adding(self, usage):
        row = (usage.day, usage.key, usage.model, usage.prompt_tokens, usage.completion_tokens,
               usage.gpu_seconds, usage.queue_seconds)

        def add(db):
            db.execute(self.ADD, row)
            if usage.at >= self._next_purge:
                self._next_purge = usage.at + self.PURGE_EVERY_S
                db.execute("DELETE FROM usage WHERE day < ?", (day_of(usage.at - (self.usage_days - 1) * DAY_S),))
        return add

    def days(self, first, last, key=None):
        query = "SELECT day, key, model, %s FROM usage WHERE day BETWEEN ? AND ?" % ", ".join(FIGURES)
        args = (first, last)
        if key is not None:
            query, args = query + " AND key = ?", args + (key,)
        with self._lock:
            rows = self._connection().execute(query, args).fetchall()
        found = {}
        for day, key_name, model, *numbers in rows:
            found.setdefault(day, {}).setdefault(key_name, {})[model] = dict(zip(FIGURES, numbers))
        return found

    def spent(self, key, day):
        with self._lock:
            tokens, gpu_seconds = self._connection().execute(
                "SELECT SUM(prompt_tokens + completion_tokens), SUM(gpu_seconds) FROM usage WHERE day = ? AND key = ?",
                (day, key)).fetchone()
        return int(tokens or 0), float(gpu_seconds or 0)


def open_usage(config, task_store):
    """The usage store beside ``task_store`` (status.open_store): in its Redis, or in its SQLite file."""
    if task_store.provider == "redis":
        return RedisUsage(task_store.client, config.status_prefix, config.usage_days)
    return SqliteUsage(task_store.path, config.usage_days)


def usage_report(store, now, key=None, first=None, last=None, usage_days=35):
    """GET /usage's answer (README, "Usage and quotas"): today, the last 7
    and the last 30 days; or the days ``first`` to ``last`` (``YYYY-MM-DD``,
    checked by the caller; only the days still kept are read). ``key``: a
    key name to see alone. Raises StoreUnavailable when the store does not answer."""
    today, oldest = day_of(now), day_of(now - (usage_days - 1) * DAY_S)
    asked = (first, last) if first is not None else (day_of(now - 29 * DAY_S), today)
    try:
        read_from, read_to = max(asked[0], oldest), min(asked[1], today)
        days = store.days(read_from, read_to, key) if read_from <= read_to else {}
    except Exception as error:  # redis, sqlite3 and socket errors alike
        raise StoreUnavailable(store.provider, "usage store (%s) is unavailable: %s" % (store.provider, error))
    if first is not None:
        return {"from": first, "to": last, "range": rounded(_summed(days.values()))}
    week_from = day_of(now - 6 * DAY_S)
    return {"from": asked[0], "to": today, "days": {
        "today": rounded(_summed([days.get(today, {})])),
        "last_7_days": rounded(_summed(v for d, v in days.items() if d >= week_from)),
        "last_30_days": rounded(_summed(days.values()))}}


def _summed(day_figures):
    total = {}
    for figures in day_figures:
        add_figures(total, figures)
    return total


# ---------------------------------------------------------------- quotas


class Quotas:
    """Each key's daily quotas (``tokens_per_day``, ``gpu_seconds_per_day``
    on its key file line), checked before a request takes a place in line.

    The hot path reads no store for a key without quotas (and none for the
    admin, who is never limited). For a limited key each worker reads the
    key's day totals at most once every FRESH_S and adds what its own
    requests used as they end, so a key is stopped at once on the worker
    that saw it go over and within FRESH_S on the others. A store that does
    not answer stops no one (it is asked again after STORE_COOLDOWN_S)."""

    FRESH_S = 1.0

    def __init__(self, store):
        self.store = store
        self._seen = {}  # key name -> [day, tokens, gpu_seconds, monotonic time to read again]
        self._lock = threading.Lock()
        self._failing = False

    def refusal(self, key, now):
        """Why ``key`` (an ApiKey, or None) may not run a request now, or None."""
        if key is None or not key.limited:
            return None
        tokens, gpu_seconds = self._today(key.name, now)
        if key.tokens_per_day is not None and tokens >= key.tokens_per_day:
            return "key %s has used %d of its %d tokens today (tokens_per_day)" % (key.name, tokens,
                                                                                   key.tokens_per_day)
        if key.gpu_seconds_per_day is not None and gpu_seconds >= key.gpu_seconds_per_day:
            return "key %s has used %.1f of its %g GPU-seconds today (gpu_seconds_per_day)" % (
                key.name, gpu_seconds, key.gpu_seconds_per_day)
        return None

    def counted(self, usage):
        """A request of this worker ended: its key's figures grow now, not at the next read."""
        with self._lock:
            seen = self._seen.get(usage.key)
            if seen is not None and seen[0] == usage.day:
                seen[1] += usage.tokens
                seen[2] += usage.gpu_seconds

    def _today(self, name, now):
        day, clock = day_of(now), time.monotonic()
        with self._lock:
            seen = self._seen.get(name)
            if seen is not None and seen[0] == day and clock < seen[3]:
                return seen[1], seen[2]
        try:
            tokens, gpu_seconds = self.store.spent(name, day)
            again = clock + self.FRESH_S
            if self._failing:
                self._failing = False
                log.warning("usage store (%s) answers again; quotas are checked", self.store.provider)
        except Exception as error:  # redis, sqlite3 and socket errors alike: nobody is stopped for them
            tokens, gpu_seconds = (seen[1], seen[2]) if seen is not None and seen[0] == day else (0, 0.0)
            again = clock + STORE_COOLDOWN_S
            if not self._failing:
                self._failing = True
                log.warning("usage store (%s) unavailable: %s; quotas are not checked until it answers",
                            self.store.provider, error)
        with self._lock:
            self._seen[name] = [day, tokens, gpu_seconds, again]
        return tokens, gpu_seconds


# ---------------------------------------------------------------- the models Ollama has


class KnownModels:
    """The model names every upstream lists in ``GET /api/tags``, looked at
    by one thread per worker every EVERY_S, off the requests' path. The
    metrics' ``model`` label takes only these names (as Ollama writes
    them: ``llama3.2`` is ``llama3.2:latest``), everything else is
    ``other``, so no client can grow the series without bound."""

    EVERY_S = 60.0

    def __init__(self, upstreams):
        self.upstreams = upstreams
        self.names = frozenset()
        self.thread = threading.Thread(target=self._run, name="edgegate-models", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def _run(self):
        while True:
            try:
                self.refresh()
            except Exception:  # the thread must outlive any one failure
                log.exception("reading the upstreams' model lists failed")
            time.sleep(self.EVERY_S)

    def refresh(self):
        # Its own connection, closed after each look: a once-a-minute look keeps nothing open, and an
        # opener without proxies, as the requests' own connections have none (edgegate_upstream.Upstream).
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        names, answered = set(), False
        for upstream in self.upstreams.all:
            look = urllib.request.Request(upstream.base + "/api/tags", headers={"User-Agent": "edgegate-models"})
            try:
                with opener.open(look, timeout=5.0) as answer:
                    models = json.loads(answer.read(16 * 1024 * 1024)).get("models")
            except Exception:  # down, or not Ollama: its models stay unknown until the next look
                continue
            for model in models if isinstance(models, list) else ():
                if isinstance(model, dict):
                    names.update(n for n in (model.get("name"), model.get("model")) if isinstance(n, str))
            answered = True
        if answered:
            self.names = frozenset(names)

    def known(self, model):
        """``model`` as Ollama lists it, or None when it does not."""
        if not isinstance(model, str):
            return None
        names = self.names
        if model in names:
            return model
        if ":" not in model.rpartition("/")[2] and model + ":latest" in names:  # Ollama's default tag
            return model + ":latest"
        return None

    def label(self, model):
        """The metrics' ``model`` label: a listed name, or ``other``."""
        return self.known(model) or OTHER_MODEL

    def kept_as(self, model, answered):
        """The model a request's usage is kept under: the listed name; else
        the name it gave when an upstream answered it (so it exists: a model
        pulled since the last look, a cloud route model); else ``other``."""
        known = self.known(model)
        if known:
            return known
        if answered and isinstance(model, str) and 0 < len(model) <= 200:
            return model
        return OTHER_MODEL
