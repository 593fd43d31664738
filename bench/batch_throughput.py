"""Items per second through a local batch (README, "Batches") against the
same requests sent one after another by a client.

    python bench/batch_throughput.py                  # 200 items, generation 0 s and 0.05 s
    python bench/batch_throughput.py --items 50 --quick

It starts the stub upstream (tests/stub_upstream.py) in this process and
edgegate under gunicorn (2 workers, SLOT_WAIT_S=30, SQLite store). For each
generation time (the stub's ``delay``: silent that long before it answers,
as a model that thinks) it measures:

- **one after another**: the openai SDK sends the N chat completions, each
  after the last one's answer, on one kept-alive connection;
- **as a batch**: the same N lines uploaded as one file, from
  ``batches.create`` to ``status == "completed"`` as a client polling every
  0.2 s sees it (the upload is timed apart).

Items per second are N over each time, the median of ``--rounds`` rounds
(the machine is shared: one round can be slowed by anything else on it).
"""

import argparse
import io
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "bench")]

import openai  # noqa: E402

from run import Processes, start_queueing_edgegate  # noqa: E402  (the benchmark's own process helpers)
from stub_upstream import StubServer  # noqa: E402


def lines(count):
    return [{"custom_id": "item-%d" % n, "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "llama3.2", "messages": [{"role": "user", "content": "item %d" % n}]}}
            for n in range(count)]


def one_after_another(client, items):
    started = time.monotonic()
    for item in items:
        client.chat.completions.create(**item["body"])
    return time.monotonic() - started


def as_a_batch(client, items):
    """(seconds from create to completed, seconds of the upload)."""
    body = "".join(json.dumps(item) + "\n" for item in items).encode()
    started = time.monotonic()
    uploaded = client.files.create(file=("items.jsonl", io.BytesIO(body)), purpose="batch")
    upload_s = time.monotonic() - started
    started = time.monotonic()
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == len(items), batch
    return time.monotonic() - started, upload_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="only generation 0 s")
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    stub = StubServer().start()
    procs = Processes()
    rows = []
    try:
        url = start_queueing_edgegate(procs, stub.url).url
        client = openai.OpenAI(base_url=url + "/v1/", api_key="unused", max_retries=0)
        items = lines(arguments.items)
        one_after_another(client, items[:5])  # warm the workers' connections
        for delay in ([0.0] if arguments.quick else [0.0, 0.05]):
            stub.defaults = {"delay": str(delay)}
            measured = [(one_after_another(client, items),) + as_a_batch(client, items)
                        for _ in range(arguments.rounds)]
            rows.append((delay,) + tuple(statistics.median(column) for column in zip(*measured)))
    finally:
        procs.stop_all()
        stub.stop()
    print("| stub delay per call | items | one after another (items/s) | as a batch (items/s) | upload (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for delay, direct_s, batch_s, upload_s in rows:
        print("| %.2f s | %d | %.1f | %.1f | %.0f |" % (delay, arguments.items, arguments.items / direct_s,
                                                        arguments.items / batch_s, upload_s * 1000))


if __name__ == "__main__":
    main()
