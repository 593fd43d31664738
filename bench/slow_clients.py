"""Slow and silent clients against edgegate (issue #13): do normal requests
still answer, and do running streams keep their pace?

    python bench/slow_clients.py            # about 1 minute on 2 cores
    python bench/slow_clients.py --quick    # a shorter hold, for a smoke test

On the gateway's defaults (2 workers, 32 threads, CLIENT_HEADER_TIMEOUT_S
10 s, CLIENT_BODY_TIMEOUT_S 30 s, MAX_CONNECTIONS_PER_CLIENT 256; GPU_SLOTS
is 3 so that the two streams and a chat each find a slot) it opens, at
once, 100 connections sending a request head at 1 byte/s, 40 sending a body
at 1 byte/s and 300 that say nothing, spread over 40 source addresses
(127.0.0.2-41, so the per-address cap is not what saves the gateway); two
SSE streams are already running. Meanwhile it times /healthz, /api/tags and
a small chat, one after another, with a 5 s timeout, and the gaps between
the streams' events. The same runs against gunicorn's stock gthread worker
(``-k gthread``) for comparison. Then 600 connections from one address
show the per-address cap. Prints a markdown table; writes
bench/results-slow-clients.json.
"""

import argparse
import json
import os
import selectors
import socket
import statistics
import sys
import threading
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import Processes, start_edgegate, start_stub  # noqa: E402  (the benchmark's own process helpers)

SMALL_CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
STREAM = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True}
STREAM_PACE_S = 0.1


def connect(port, source):
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


class Crowd:
    """The slow and silent connections, one byte a second each for the
    slow ones; a reader thread notes when and how the gateway answers them."""

    def __init__(self, port, slow_heads, slow_bodies, silent, sources=40):
        self.opened = time.monotonic()
        self.kinds = {}
        self.selector = selectors.DefaultSelector()
        self.trickling = []
        self.outcomes = []  # (kind, seconds after opening, first status line or "closed")
        for n in range(slow_heads + slow_bodies + silent):
            sock = connect(port, "127.0.0.%d" % (2 + n % sources))
            if n < slow_heads:
                kind = "slow head"
                sock.sendall(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Pad: ")
            elif n < slow_heads + slow_bodies:
                kind = "slow body"
                sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100000\r\n\r\n{")
            else:
                kind = "silent"
            self.kinds[sock] = kind
            if kind != "silent":
                self.trickling.append(sock)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._trickle, daemon=True),
                        threading.Thread(target=self._read, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _trickle(self):
        while not self.stop.wait(1.0):
            for sock in list(self.trickling):
                try:
                    sock.send(b"a")
                except OSError:
                    self.trickling.remove(sock)

    def _read(self):
        while not self.stop.is_set():
            for key, _ in self.selector.select(0.1):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                outcome = data.split(b"\r\n", 1)[0].decode("latin-1")[9:] if data else "closed"
                self.outcomes.append((self.kinds[sock], time.monotonic() - self.opened, outcome))
                self.selector.unregister(sock)
                if sock in self.trickling:
                    self.trickling.remove(sock)

    def close(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(5)
        for sock in self.kinds:
            sock.close()

    def summary(self):
        """{kind: "answer after s" counts}: what became of the crowd."""
        found = {}
        for kind, seconds, outcome in self.outcomes:
            found.setdefault(kind, {}).setdefault(outcome, []).append(seconds)
        return {kind: {outcome: "%d after %.1f-%.1f s" % (len(times), min(times), max(times))
                       for outcome, times in outcomes.items()} for kind, outcomes in found.items()}


class Stream:
    """An SSE chat already running: the gaps between its events."""

    def __init__(self, url, events):
        self.gaps = []
        self.events = 0
        self.error = None
        self.answer = requests.post(url + "/v1/chat/completions", json=STREAM, stream=True, timeout=10,
                                    headers={"X-Stub": "chunks=%d,chunk_delay=%s" % (events, STREAM_PACE_S)})
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        last = None
        try:
            for line in self.answer.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                now = time.monotonic()
                if last is not None:
                    self.gaps.append(now - last)
                last = now
                self.events += 1
        except Exception as error:
            self.error = repr(error)


def time_normal_requests(url, seconds):
    """/healthz, /api/tags and a chat, one after another, for ``seconds``."""
    timings = {"GET /healthz": [], "GET /api/tags": [], "POST /api/chat": []}
    failures = {name: 0 for name in timings}
    calls = {"GET /healthz": lambda s: s.get(url + "/healthz", timeout=5),
             "GET /api/tags": lambda s: s.get(url + "/api/tags", timeout=5),
             "POST /api/chat": lambda s: s.post(url + "/api/chat", json=SMALL_CHAT, timeout=5)}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, call in calls.items():
            started = time.monotonic()
            try:
                with requests.Session() as session:  # a new connection each time, like a new client
                    ok = call(session).status_code == 200
            except requests.RequestException:
                ok = False
            elapsed = time.monotonic() - started
            if ok:
                timings[name].append(elapsed)
            else:
                failures[name] += 1
    return timings, failures


def percentile(values, p):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def run_target(procs, stub, worker, hold_s):
    extra = {} if worker == "edgegate" else {"GUNICORN_CMD_ARGS": "-k gthread"}
    gateway = start_edgegate(procs, stub, WORKERS="2", THREADS="32", GPU_SLOTS="3", **extra)
    port = int(gateway.url.rsplit(":", 1)[1])
    quiet, _ = time_normal_requests(gateway.url, 2)
    events = int((hold_s + 6) / STREAM_PACE_S)
    streams = [Stream(gateway.url, events) for _ in range(2)]
    time.sleep(1)
    crowd = Crowd(port, slow_heads=100, slow_bodies=40, silent=300)
    time.sleep(1)  # all accepted, trickling
    timings, failures = time_normal_requests(gateway.url, hold_s)
    for stream in streams:
        stream.thread.join(hold_s + 20)
    # Past the 10 s head deadline, to see what the crowd got (the bodies' 30 s is not waited for).
    time.sleep(max(0.0, 12 - (time.monotonic() - crowd.opened)))
    crowd.close()
    result = {"worker": worker, "hold_s": hold_s, "quiet": {}, "crowd": {}, "failures": failures,
              "stream_gaps": {}, "crowd_outcomes": crowd.summary()}
    for name, values in quiet.items():
        result["quiet"][name] = {"p50_ms": 1000 * statistics.median(values), "max_ms": 1000 * max(values)}
    for name, values in timings.items():
        result["crowd"][name] = {"n": len(values), "p50_ms": 1000 * statistics.median(values) if values else None,
                                 "p99_ms": 1000 * percentile(values, 99), "max_ms": 1000 * max(values) if values else None}
    gaps = [g for stream in streams for g in stream.gaps]
    result["stream_gaps"] = {"events": sum(s.events for s in streams), "expected": 2 * events,
                             "p50_ms": 1000 * statistics.median(gaps) if gaps else None,
                             "max_ms": 1000 * max(gaps) if gaps else None,
                             "errors": [s.error for s in streams if s.error]}
    procs.running.remove(gateway)
    gateway.terminate()
    gateway.wait(30)
    return result


def run_cap(procs, stub):
    """600 silent connections from one address; a normal client beside them."""
    gateway = start_edgegate(procs, stub, WORKERS="2", THREADS="32")
    port = int(gateway.url.rsplit(":", 1)[1])
    crowd = Crowd(port, slow_heads=0, slow_bodies=0, silent=600, sources=1)
    time.sleep(2)
    timings, failures = time_normal_requests(gateway.url, 2)
    crowd.close()
    refused = sum(1 for _, _, outcome in crowd.outcomes if outcome.startswith("429"))
    procs.running.remove(gateway)
    gateway.terminate()
    gateway.wait(30)
    healthz = timings["GET /healthz"]
    return {"connections": 600, "refused_429": refused, "healthz_max_ms": 1000 * max(healthz) if healthz else None,
            "failures": failures}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="hold the crowd 4 s instead of 8")
    parser.add_argument("--only", choices=["edgegate", "gthread"], help="one worker only")
    args = parser.parse_args()
    hold_s = 4 if args.quick else 8
    procs = Processes()
    results = {"targets": [], "cap": None}
    try:
        stub = start_stub(procs)
        for worker in ([args.only] if args.only else ["edgegate", "gthread"]):
            results["targets"].append(run_target(procs, stub, worker, hold_s))
        if args.only != "gthread":
            results["cap"] = run_cap(procs, stub)
    finally:
        procs.stop_all()
    print_table(results)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results-slow-clients.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


def fmt(value):
    return "-" if value is None or value != value else "%.0f" % value


def print_table(results):
    print("100 slow heads + 40 slow bodies (1 byte/s) + 300 silent connections, 2 SSE streams running;")
    print("normal requests one after another on new connections, 5 s timeout\n")
    print("| worker | request | quiet p50 ms | crowd n | crowd p50 ms | crowd p99 ms | crowd max ms | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for target in results["targets"]:
        for name, crowd in target["crowd"].items():
            print("| %s | %s | %s | %d | %s | %s | %s | %d |" % (
                target["worker"], name, fmt(target["quiet"].get(name, {}).get("p50_ms")), crowd["n"],
                fmt(crowd["p50_ms"]), fmt(crowd["p99_ms"]), fmt(crowd["max_ms"]), target["failures"][name]))
    print("\n| worker | SSE events seen (pieces asked of the stub) | gap p50 ms | gap max ms | errors |")
    print("| --- | --- | --- | --- | --- |")
    for target in results["targets"]:
        gaps = target["stream_gaps"]
        print("| %s | %d (%d) | %s | %s | %s |" % (target["worker"], gaps["events"], gaps["expected"],
                                                  fmt(gaps["p50_ms"]), fmt(gaps["max_ms"]), len(gaps["errors"])))
    print("\nWhat became of the crowd (answers seen while it was held):")
    for target in results["targets"]:
        print("  %s: %s" % (target["worker"], json.dumps(target["crowd_outcomes"])))
    if results["cap"]:
        cap = results["cap"]
        print("\nPer-address cap: %d silent connections from one address: %d answered 429; /healthz from "
              "another address max %s ms, %d failed" % (cap["connections"], cap["refused_429"],
                                                        fmt(cap["healthz_max_ms"]), sum(cap["failures"].values())))


if __name__ == "__main__":
    main()
