"""What taking a free GPU slot costs a request, and what the line adds
(issue #22): the hot path of every inference request that finds the GPU free.

    python bench/slot_take.py           # 3,000 takes per case, a few seconds
    python bench/slot_take.py --quick   # 500

Three ways to take a free slot and let it go, in this process, on lock
files in a new temporary directory:

- ``try_take``: ``GpuSlots.try_take`` alone, what a request does with
  ``SLOT_WAIT_S=0`` (no line);
- ``join``: ``SlotLine.join`` with nobody waiting, what a request does by
  default: the line's lock, a look at the line, the take, and the key's
  turn recorded (``ServedRecord.mark``);

each with no keys, one key, and two keys taking turns (the case where every
take must write ``served.json``). Prints the median and p99 in microseconds.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgegate_slots import GpuSlots  # noqa: E402

KEYS = {"no keys": lambda n: None, "one key": lambda n: "key-a", "two keys taking turns": lambda n: "key-ab"[n % 2]}


def measure(take, rounds):
    times = []
    for n in range(rounds):
        started = time.perf_counter()
        slot = take(n)
        slot.release()
        times.append(time.perf_counter() - started)
    times.sort()
    return statistics.median(times) * 1e6, times[int(len(times) * 0.99)] * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    rounds = 500 if parser.parse_args().quick else 3000
    slots = GpuSlots(tempfile.mkdtemp(prefix="edgegate-bench-"), 1)
    owned = []
    for name, key in KEYS.items():
        def try_take(n):
            return slots.try_take({"task_id": "t%d" % n, "key": key(n)}, {}, owned.append)

        def join(n):
            place = {"task_id": "t%d" % n, "key": key(n), "model": "m"}
            return slots.line.join(place, place, slots, owned.append, bound=32)[0]

        for way, take in (("try_take", try_take), ("join", join)):
            measure(take, rounds // 10)  # warm up
            median, p99 = measure(take, rounds)
            print("%-22s %-8s median %7.1f us   p99 %7.1f us" % (name, way, median, p99))
            owned.clear()


if __name__ == "__main__":
    main()
