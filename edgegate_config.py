"""edgegate's configuration: every setting, read once from the environment.

``Config.from_environ()`` reads and checks each variable (README,
"Configuration"); a bad value is a ``ConfigError`` whose message is the one
line printed at start. ``load_config()`` is what the entry points call:
gunicorn.conf.py when gunicorn starts, ``python -m gateway check|hold``.
Nothing here runs at import.
"""

import dataclasses
import functools
import hashlib
import os
import re
import sys
import urllib.parse


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
    in task documents, the access log and metrics, and its role: ``admin``
    (every task, management routes, /metrics), ``metrics`` (a scraper's
    token: /metrics and /readyz, nothing else) or none."""

    secret: bytes = dataclasses.field(repr=False)
    name: str
    admin: bool
    scraper: bool = False
    tokens_per_day: int = None  # quotas (README, "Usage and quotas"); None: no limit
    gpu_seconds_per_day: float = None

    @property
    def limited(self):
        return not self.admin and (self.tokens_per_day is not None or self.gpu_seconds_per_day is not None)


KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a whole value: always fullmatch
KEY_ROLES = ("", "admin", "metrics")


def _api_keys(env):
    """``key1,key2`` (bare keys), or ``@/path/file`` with one ``KEY [NAME [ROLE]]``
    a line. A bare key is named by a short fingerprint of it and has no role.
    Whatever could start the gateway open, or with a key other than the one
    meant, stops the start: a value with no key in it, a key twice."""
    raw = _text(env, "GATEWAY_API_KEYS")
    if raw.startswith("@"):
        lines = _key_file_lines(raw)
    else:
        lines = [(n, [k.strip()]) for n, k in enumerate(raw.split(","), 1) if k.strip()]
        if env.get("GATEWAY_API_KEYS") and not lines:  # "," or " ": set, yet no key -- never start open
            raise ConfigError("GATEWAY_API_KEYS=%r: no key in it; leave it unset to run without keys" % raw)
    keys, lines_of = [], {}
    for number, fields in lines:
        fields, limits = _key_limits(fields, raw, number)
        secret = fields[0]
        name = fields[1] if len(fields) > 1 else "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]
        role = fields[2] if len(fields) > 2 else ""
        if not KEY_NAME_RE.fullmatch(name) or role not in KEY_ROLES or len(fields) > 3:
            raise ConfigError("GATEWAY_API_KEYS=%r: line %d: expected KEY [NAME [admin|metrics]], NAME of letters, "
                              "digits, '.', '_' or '-'" % (raw, number))
        if limits and role == "admin":
            raise ConfigError("GATEWAY_API_KEYS=%r: line %d: an admin key is never limited; "
                              "remove its quota words" % (raw, number))
        if secret in lines_of:
            raise ConfigError("GATEWAY_API_KEYS=%r: line %d: the same key as line %d; give each key one line"
                              % (raw, number, lines_of[secret]))
        lines_of[secret] = number
        keys.append(ApiKey(secret.encode(), name, role == "admin", role == "metrics", **limits))
    if len({k.name for k in keys}) != len(keys):
        raise ConfigError("GATEWAY_API_KEYS=%r: two keys have the same name" % raw)
    return tuple(keys)


def _key_file_lines(raw):
    """[(line number, fields)] of a key file: blank lines and comments
    (``#`` after any indentation) left out. UTF-8 only."""
    try:
        with open(raw[1:], encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("GATEWAY_API_KEYS=%r: cannot read the key file (%s)" % (raw, e.strerror))
    except UnicodeDecodeError as e:
        raise ConfigError("GATEWAY_API_KEYS=%r: the key file is not UTF-8 text (byte %d)" % (raw, e.start))
    lines = [(n, line.split()) for n, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise ConfigError("GATEWAY_API_KEYS=%r: the key file holds no key" % raw)
    return lines


# The quota words a key line may carry after its name and role (README,
# "Usage and quotas"), and the type of each one's value.
KEY_LIMITS = {"tokens_per_day": int, "gpu_seconds_per_day": float}


def _key_limits(fields, raw, number):
    """A key line's words without its ``name=value`` quota words, and those
    words as ApiKey fields. The key itself (the first word) may hold "="."""
    kept, limits = fields[:1], {}
    for word in fields[1:]:
        if "=" not in word:
            kept.append(word)
            continue
        name, _, text = word.partition("=")
        kind = KEY_LIMITS.get(name)
        if kind is None or name in limits:
            raise ConfigError("GATEWAY_API_KEYS=%r: line %d: %s word %r; a key line takes tokens_per_day=N "
                              "and gpu_seconds_per_day=N, each once" % (raw, number, "a repeated" if kind else
                                                                         "unknown", word[:60]))
        try:
            value = kind(text)
        except ValueError:
            value = -1
        if not value >= 0 or value == float("inf"):
            raise ConfigError("GATEWAY_API_KEYS=%r: line %d: %s=%r: expected %s, 0 or more"
                              % (raw, number, name, text, "a whole number" if kind is int else "a number"))
        limits[name] = value
    return kept, limits


KEEP_ALIVE_RE = re.compile(r"-?\d+(\.\d+)?(ns|us|µs|ms|s|m|h)?|(-?\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")  # fullmatch


def _keep_alive_default(env):
    raw = _text(env, "KEEP_ALIVE_DEFAULT", "30s")
    if raw == "":
        return ""
    if not KEEP_ALIVE_RE.fullmatch(raw):
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


# A batch upload is a multipart form: its body may be this much over
# BATCH_MAX_FILE_BYTES (the boundaries and the purpose field around the file).
BATCH_FORM_BYTES = 64 * 1024

UNIX_SOCKET_PATH_MAX = 107  # bytes of sun_path on Linux, less its closing NUL (unix(7))


def _lock_directory(env, state_dir):
    """GPU_LOCK_DIR, short enough for the GPU line's unix sockets, which live
    in it as ``queue/<20 digits>.sock`` (README, "Sharing the GPU slot"), and
    the gateway user's alone: the slots' holder records and the queue's
    tickets name tasks, models and keys, and a ticket another user could
    write would jump the line. Made (or made again) 0700, with its queue."""
    path = _directory(env, "GPU_LOCK_DIR", os.path.join(state_dir, "locks"))
    longest = len(os.fsencode(os.path.join(path, "queue", "%020d.sock" % 0)))
    if longest > UNIX_SOCKET_PATH_MAX:
        raise ConfigError("GPU_LOCK_DIR=%r: too long for the GPU queue's unix sockets (%d bytes with their names; "
                          "at most %d): set a shorter GPU_LOCK_DIR or STATE_DIR" % (path, longest, UNIX_SOCKET_PATH_MAX))
    for directory in (path, os.path.join(path, "queue")):
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            if os.stat(directory).st_uid != os.geteuid():
                raise ConfigError("GPU_LOCK_DIR=%r: %s belongs to another user; it must be this user's alone "
                                  "(README, \"Sharing the GPU slot\")" % (path, directory))
            os.chmod(directory, 0o700)
        except OSError as e:
            raise ConfigError("GPU_LOCK_DIR=%r: cannot make %s this user's alone (%s)" % (path, directory, e.strerror))
    return path


def _redis_url(env):
    redis_url = _text(env, "REDIS_URL")
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("REDIS_URL=%r: expected a redis://, rediss:// or unix:// URL" % redis_url)
    return redis_url


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of the gateway, read once from the environment (README, "Configuration")."""

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
    # Ollama queues what its GPU cannot run yet (OLLAMA_MAX_QUEUE 512, server/sched.go), so by default a
    # request waits its turn as long as a silent upstream may take (README, "Sharing the GPU slot"); 0
    # answers 503 gpu_busy at once. Each waiter holds a thread: by default half of them at most may wait,
    # the rest serve status polls, /api/tags and the answer being streamed.
    slot_wait_s: float  # default: read_timeout_s
    queue_max: int  # default: workers * threads // 2
    retry_after_s: int
    keep_alive_default: str
    default_model: str
    model_aliases: tuple
    max_body_bytes: int
    client_body_buffer_bytes: int
    body_memory_bytes: int
    body_wait_s: float
    batch_max_file_bytes: int
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
    usage_days: int

    @classmethod
    def from_environ(cls, env=None):
        env = os.environ if env is None else env
        redis_url = _redis_url(env)  # checked before STATE_DIR is made
        state_dir = _directory(env, "STATE_DIR", "~/.local/state/edgegate")
        upstream_bases = _upstream_bases(env)
        read_timeout_s = _number(env, "UPSTREAM_READ_TIMEOUT_S", 300.0, float, 0.01, alias="PROVIDER_TIMEOUT_SECONDS")
        workers, threads = _number(env, "WORKERS", 2, int, 1, 64), _number(env, "THREADS", 32, int, 1, 1024)
        max_body_bytes = _number(env, "MAX_BODY_BYTES", 64 * 1024 * 1024, int, 1)
        return cls(
            upstream_bases=upstream_bases,
            upstream_down_s=_number(env, "UPSTREAM_DOWN_S", 10.0, float, 0),  # a refusing upstream is skipped
            prefer_loaded_wait_s=_number(env, "PREFER_LOADED_WAIT_S", 0.0, float, 0),  # the head waits for its model
            connect_timeout_s=_number(env, "UPSTREAM_CONNECT_TIMEOUT_S", 2.0, float, 0.01),
            read_timeout_s=read_timeout_s,
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
            slot_wait_s=_number(env, "SLOT_WAIT_S", read_timeout_s, float, 0),
            queue_max=_number(env, "QUEUE_MAX", max(1, workers * threads // 2), int, 0),
            retry_after_s=_number(env, "RETRY_AFTER_S", 2, int, 0),
            keep_alive_default=_keep_alive_default(env),
            default_model=_text(env, "DEFAULT_MODEL"),
            model_aliases=tuple(a.strip() for a in _text(env, "MODEL_ALIASES", "ollama,local").split(",") if a.strip()),
            max_body_bytes=max_body_bytes,
            # README, "Large request bodies": what of a body stays in memory, and what one worker parses at once
            client_body_buffer_bytes=_number(env, "CLIENT_BODY_BUFFER_BYTES", 64 * 1024, int, 1024),
            body_memory_bytes=_number(env, "BODY_MEMORY_BYTES", max_body_bytes, int, 1),
            body_wait_s=_number(env, "BODY_WAIT_S", 5.0, float, 0),
            batch_max_file_bytes=_number(env, "BATCH_MAX_FILE_BYTES", 200 * 1000 * 1000, int, 1),  # an upload
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
            workers=workers,
            threads=threads,
            usage_days=_number(env, "USAGE_DAYS", 35, int, 1, 3660),  # days of usage kept (README, "Usage and quotas")
        )


def load_config():
    """The configuration, or one line on stderr and exit 2."""
    try:
        return Config.from_environ()
    except ConfigError as error:
        print("edgegate: configuration error: %s" % error, file=sys.stderr)
        raise SystemExit(2)


# ---------------------------------------------------------------- Ollama durations
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
