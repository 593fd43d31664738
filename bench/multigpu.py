"""Several GPUs (issue #15): what a second Ollama buys, and what the routing costs.

    python bench/multigpu.py

1. Two clients each stream one paced answer (20 pieces, 50 ms apart: about
   a second of generation) through edgegate under gunicorn (2 workers,
   SLOT_WAIT_S=30), with one stub upstream and then with two
   (tests/stub_upstream.py, in this process). With one GPU slot the second
   client waits for the first; with two they run at once, so both finish in
   about the time of one.
2. The routing choice itself, in this process: ``Upstreams.choose`` (which
   slot to try first: the model's loaded GPU, else the one idle longest;
   one ``stat`` per slot) and ``GpuSlots.try_take`` with and without it,
   in microseconds per call.
"""

import os
import statistics
import sys
import tempfile
import threading
import time

import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "bench")]
STATE_DIR = tempfile.mkdtemp(prefix="edgegate-bench-multigpu-")
os.environ["STATE_DIR"] = STATE_DIR  # for the gateways this script starts

import edgegate_config  # noqa: E402
import edgegate_slots  # noqa: E402
import edgegate_upstream  # noqa: E402
from run import Processes, start_queueing_edgegate  # noqa: E402  (the benchmark's own process helpers)
from stub_upstream import StubServer  # noqa: E402

PACED = {"X-Stub": "chunks=20,chunk_delay=0.05"}
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def two_clients(url):
    """Seconds until both paced streams have ended."""
    def ask():
        answer = requests.post(url + "/api/chat", json=CHAT, headers=PACED, timeout=30)
        assert answer.status_code == 200, answer.text

    started = time.monotonic()
    clients = [threading.Thread(target=ask) for _ in range(2)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    return time.monotonic() - started


def wall_clock(upstream_base, label):
    procs = Processes()
    try:
        url = start_queueing_edgegate(procs, upstream_base).url
        two_clients(url)  # warm the connections
        rounds = [two_clients(url) for _ in range(3)]
    finally:
        procs.stop_all()
    print("%-22s two paced clients: %.2f s (median of 3)" % (label, statistics.median(rounds)))


def per_call_us(call, n=20000):
    started = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - started) / n * 1e6


def routing_cost():
    two = edgegate_config.Config.from_environ(dict(os.environ, UPSTREAM_BASE="http://127.0.0.1:1,http://127.0.0.1:2",
                                                   GPU_LOCK_DIR=tempfile.mkdtemp(dir=STATE_DIR)))
    choice = edgegate_upstream.Upstreams(two).choice
    choice.gpus[1].loaded = frozenset({"llama3.2:latest"})
    place = {"model": "llama3.2", "since": time.time()}
    choose = per_call_us(lambda: choice.choose(range(2), place))
    routed = edgegate_slots.GpuSlots(two.gpu_lock_dir, 2, choice.choose)
    plain = edgegate_slots.GpuSlots(tempfile.mkdtemp(dir=STATE_DIR), 2)
    holder = {"pid": os.getpid(), "task_id": "bench", "path": "/api/chat", "since": time.time()}
    take_routed = per_call_us(lambda: routed.try_take(holder, place).release(), 5000)
    take_plain = per_call_us(lambda: plain.try_take(holder, place).release(), 5000)
    print("routing choice (GpuChoice.choose, 2 slots):      %.1f us per request" % choose)
    print("take and free a slot, routed / one upstream:     %.1f us / %.1f us (+%.1f us)"
          % (take_routed, take_plain, take_routed - take_plain))


def main():
    gpus = [StubServer().start(), StubServer().start()]
    try:
        wall_clock(gpus[0].url, "one upstream:")
        wall_clock("%s,%s" % (gpus[0].url, gpus[1].url), "two upstreams:")
    finally:
        for stub in gpus:
            stub.stop()
    routing_cost()


if __name__ == "__main__":
    main()
