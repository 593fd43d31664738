"""How soon the next waiter in the GPU line starts once the slot is freed
(issue #12): from the moment a holder lets go of the slot to the moment the
waiting request reaches the upstream.

    python bench/queue_wakeup.py            # 200 hand-overs, about half a minute
    python bench/queue_wakeup.py --quick    # 30

It starts the stub upstream (tests/stub_upstream.py) in this process and
edgegate under gunicorn (2 workers, SLOT_WAIT_S=30). Each round this process
takes the slot itself, the way a worker does (``edgegate_slots.GpuSlots``), sends
one request, which joins the line, and once the request sleeps in the line
notes the time and releases the slot (``Slot.release``, which wakes the
line as a worker's release does). The stub notes when the request arrives;
both clocks are this process's ``time.monotonic``. A few more rounds let go
the way ``flock(1)`` does -- closing the lock without telling anyone -- and
measure the slow fallback (``SlotLine.FALLBACK_S``).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "bench")]
STATE_DIR = tempfile.mkdtemp(prefix="edgegate-bench-queue-")
os.environ["STATE_DIR"] = STATE_DIR  # for the gateways this script starts

import edgegate_slots  # noqa: E402
from conftest import wait_until  # noqa: E402
from run import Processes, start_queueing_edgegate  # noqa: E402  (the benchmark's own process helpers)
from stub_upstream import StubServer  # noqa: E402

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def one_handover(url, stub, slots, tell_the_line):
    """Seconds from the slot's release to the waiter's arrival upstream."""
    holder = {"pid": os.getpid(), "task_id": "bench-holder", "path": "bench", "since": time.time()}
    slot = slots.try_take(holder)
    assert slot is not None, "the slot is not free"
    if not tell_the_line:  # as flock(1) lets go: the lock is closed and nobody is told
        slot.on_release = lambda slot, fd: (slots.held_here.discard(slot.index), os.close(fd))
    stub.reset()
    answered = []
    waiter = threading.Thread(target=lambda: answered.append(requests.post(url + "/api/chat", json=CHAT,
                                                                            timeout=30)))
    waiter.start()
    assert wait_until(lambda: slots.line.describe(), 5, 0.002), "the request never joined the line"
    time.sleep(0.02)  # asleep on its socket by now
    freed_at = time.monotonic()
    slot.release()
    assert stub.wait_for(lambda: stub.requests_to("/api/chat"), 5)
    arrived_at = stub.requests_to("/api/chat")[0].arrived_at
    waiter.join(10)
    assert answered and answered[0].status_code == 200
    return arrived_at - freed_at


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100.0 * (len(ordered) - 1))))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    rounds = 30 if parser.parse_args().quick else 200
    stub = StubServer().start()
    procs = Processes()
    lock_dir = os.path.join(STATE_DIR, "locks")  # the gateway's and this process's: one slot, one line
    slots = edgegate_slots.GpuSlots(lock_dir, 1)
    try:
        url = start_queueing_edgegate(procs, stub.url, GPU_LOCK_DIR=lock_dir).url
        for _ in range(5):  # warm the workers' connections
            requests.post(url + "/api/chat", json=CHAT, timeout=10)
        woken = []
        for _ in range(rounds):
            woken.append(one_handover(url, stub, slots, True))
        silent = [one_handover(url, stub, slots, False) for _ in range(10)]
    finally:
        procs.stop_all()
        stub.stop()
        shutil.rmtree(STATE_DIR, ignore_errors=True)
    print("| hand-over | rounds | p50 (ms) | p99 (ms) | max (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for name, values in (("slot released by a worker (the line is woken)", woken),
                         ("slot released like flock(1) (fallback)", silent)):
        print("| %s | %d | %.2f | %.2f | %.2f |" % (name, len(values), statistics.median(values) * 1000,
                                                   percentile(values, 99) * 1000, max(values) * 1000))


if __name__ == "__main__":
    main()
