"""Large request bodies against edgegate (issue 21, item 19): does a worker's
peak memory grow with the number of clients sending them?

    python bench/body_memory.py               # about 2 minutes on 2 cores
    python bench/body_memory.py --limit 8000000 --modes gzip

For each MAX_BODY_BYTES (the default 64 MiB, and 8000000) and each way of
sending (``plain``: Content-Length; ``chunked``; ``gzip``: a few kB that
decode to the limit), a fresh gateway (2 workers, 32 threads, every other
setting the default; GPU_SLOTS 64 so that the GPU slot refuses nobody) gets
32 concurrent chat bodies just under the limit. It reads each worker's peak
resident memory (``VmHWM`` in /proc/<pid>/status) before and after, and
prints its growth per worker, the answers (200, or 503 body_memory_busy for
a body that waited BODY_WAIT_S for the worker's budget) and the time taken.
The upstream is a sink in this process that reads each body and answers a
small chat (tests/stub_upstream.py keeps every body it gets, which would
measure the stub, not the gateway). Writes bench/results-body-memory.json.
"""

import argparse
import concurrent.futures
import gzip
import http.server
import json
import os
import sys
import threading
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import Processes, proc_status_kib, start_edgegate  # noqa: E402  (the benchmark's own process helpers)

CLIENTS = 32
DEFAULT_LIMIT = 64 * 1024 * 1024
ANSWER = json.dumps({"model": "llama3.2", "created_at": "2026-01-01T00:00:00Z", "done": True,
                     "message": {"role": "assistant", "content": "ok"}}).encode()


class Sink(http.server.BaseHTTPRequestHandler):
    """Ollama as far as this bench needs: reads a body, answers a short chat."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            left -= len(self.rfile.read(min(left, 1 << 20)) or b"x" * left)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)

    def do_GET(self):  # /api/ps, /api/version: nothing loaded
        body = b'{"models": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start_sink():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, "http://127.0.0.1:%d" % server.server_address[1]


def worker_pids(process):
    pids = []
    for tid in os.listdir("/proc/%d/task" % process.pid):
        with open("/proc/%d/task/%s/children" % (process.pid, tid)) as f:
            pids += [int(p) for p in f.read().split()]
    return sorted(pids)


def vm_hwm_kib(pid):
    peak = proc_status_kib(pid, "VmHWM")
    if peak is None:
        raise RuntimeError("no VmHWM for %d" % pid)
    return peak


def near_limit_body(limit):
    """A chat whose JSON is 100 bytes under ``limit``."""
    start = b'{"model": "llama3.2", "stream": false, "messages": [{"role": "user", "content": "'
    end = b'"}]}'
    return start + b"x" * (limit - 100 - len(start) - len(end)) + end


def pieces(body, size=1 << 20):
    view = memoryview(body)
    for at in range(0, len(body), size):
        yield view[at:at + size]


def send_all(url, mode, body):
    """CLIENTS concurrent uploads of ``body``; their statuses and the wall time."""
    headers = {"Content-Type": "application/json"}
    if mode == "gzip":
        body = gzip.compress(body, compresslevel=6)
        headers["Content-Encoding"] = "gzip"

    def send(_):
        data = pieces(body) if mode == "chunked" else body  # a generator: requests sends it chunked
        try:
            return requests.post(url + "/api/chat", data=data, headers=headers, timeout=300).status_code
        except requests.RequestException as error:
            return type(error).__name__

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        statuses = list(pool.map(send, range(CLIENTS)))
    return statuses, time.monotonic() - started


def measure(procs, upstream, limit, mode, body):
    env = {} if limit == DEFAULT_LIMIT else {"MAX_BODY_BYTES": str(limit)}
    gateway = start_edgegate(procs, upstream, WORKERS="2", THREADS="32", **env)
    try:
        for _ in range(8):  # every worker has served a small chat: its baseline is warm
            requests.post(gateway.url + "/api/chat", json={"model": "llama3.2", "messages": []}, timeout=10)
        pids = worker_pids(gateway.process)
        before = {pid: vm_hwm_kib(pid) for pid in pids}
        statuses, seconds = send_all(gateway.url, mode, body)
        after = {pid: vm_hwm_kib(pid) for pid in pids}
        alive = worker_pids(gateway.process) == pids
    finally:
        procs.running.remove(gateway.process)
        gateway.process.terminate()
        gateway.process.wait(30)
    counts = {}
    for status in statuses:
        counts[str(status)] = counts.get(str(status), 0) + 1
    growth_mb = [(after[pid] - before[pid]) * 1024 / 1e6 for pid in pids]
    return {"max_body_bytes": limit, "mode": mode, "clients": CLIENTS, "answers": counts, "seconds": seconds,
            "peak_growth_mb_per_worker": growth_mb, "baseline_mb": [before[pid] * 1024 / 1e6 for pid in pids],
            "workers_unchanged": alive}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, action="append", help="MAX_BODY_BYTES to try (repeatable)")
    parser.add_argument("--modes", default="plain,chunked,gzip")
    args = parser.parse_args()
    limits = args.limit or [8000000, DEFAULT_LIMIT]
    procs = Processes()
    server, upstream = start_sink()
    results = []
    try:
        for limit in limits:
            body = near_limit_body(limit)
            for mode in args.modes.split(","):
                result = measure(procs, upstream, limit, mode, body)
                results.append(result)
                print_row(result, flush=True)
    finally:
        procs.stop_all()
        server.shutdown()
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results-body-memory.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


def print_row(result, flush=False):
    if not hasattr(print_row, "header"):
        print_row.header = True
        print("%d concurrent chat bodies just under MAX_BODY_BYTES; peak RSS (VmHWM) growth of each of "
              "2 workers\n" % CLIENTS)
        print("| MAX_BODY_BYTES | sent as | peak growth per worker (MB) | target (MB) | answers | seconds |")
        print("| --- | --- | --- | --- | --- | --- |")
    limit = result["max_body_bytes"]
    target = 64 if limit <= 8000000 else 3 * limit / 1e6
    print("| %d | %s | %s | < %.0f | %s | %.1f |" % (
        limit, result["mode"], ", ".join("%.0f" % g for g in result["peak_growth_mb_per_worker"]), target,
        ", ".join("%s x%d" % item for item in sorted(result["answers"].items())), result["seconds"]), flush=flush)


if __name__ == "__main__":
    main()
