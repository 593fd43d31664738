"""What a change costs: edgegate from this checkout against edgegate from
another (the code before the change), on the benchmark's own measures, in
interleaved rounds so that machine noise hits both alike.

    git archive main | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python bench/compare.py /tmp/before             # about a minute
    python bench/compare.py /tmp/before --rounds 10

Prints, for each, the server's CPU per small non-streamed POST
/v1/chat/completions and per 1,000 SSE stream chunks (utime + stime of
gunicorn's master and workers, as bench/run.py measures them) over all
rounds, and the change in percent. Run it twice with the same checkout
(``python /tmp/before/bench/compare.py /tmp/before``, with this file copied
there) to see what the machine's noise alone gives.
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (bench/run.py: the same processes and requests)


def start_edgegate_from(procs, checkout, name, upstream):
    """edgegate as bench/run.py starts it, from ``checkout``'s own modules and gunicorn.conf.py."""
    port = run.free_port()
    env = run.gunicorn_env(procs, port, upstream)
    env["PYTHONPATH"] = checkout
    log = open(os.path.join(procs.tmp, "%s.log" % name), "wb")
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "gateway:app"],
                               env=env, cwd=checkout, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    procs.running.append(process)
    target = run.Target(name, "http://127.0.0.1:%d" % port, process)
    run.wait_http(target.url + "/healthz", process=process)
    deadline = time.monotonic() + 15
    while len(run.descendants(process.pid)) - 1 < int(env["WORKERS"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return target


def main():
    parser = argparse.ArgumentParser(description="edgegate here against edgegate in another checkout")
    parser.add_argument("before", help="a checkout of the code before the change (git archive ... | tar -x)")
    parser.add_argument("--rounds", type=int, default=8)
    # CPU is counted in clock ticks (10 ms): enough work per round that one tick is about 1% of it
    parser.add_argument("--requests", type=int, default=1000, help="small POSTs per round")
    parser.add_argument("--chunks", type=int, default=50000, help="chunks of the stream per round")
    args = parser.parse_args()
    procs = run.Processes()
    try:
        stub = run.start_stub(procs)
        targets = {"before": start_edgegate_from(procs, os.path.abspath(args.before), "before", stub.url),
                   "after": start_edgegate_from(procs, run.ROOT, "after", stub.url)}
        for target in targets.values():
            run.sequential_latency(target, 50)  # warm up
        posts = run.interleaved(targets, args.rounds, lambda t: run.with_cpu(
            t, lambda: run.sequential_latency(t, args.requests)))
        streams = run.interleaved(targets, args.rounds, lambda t: run.stream_chunks(t, args.chunks))
    finally:
        procs.stop_all()
    print("| edgegate | CPU per small POST (ms) | CPU per 1,000 stream chunks (ms) |")
    print("| --- | --- | --- |")
    figures = {}
    for name in targets:
        per_post = sum(cpu for _, cpu in posts[name]) / sum(len(times) for times, _ in posts[name]) * 1000
        per_chunks = sum(cpu for _, _, cpu in streams[name]) / sum(chunks for chunks, _, _ in streams[name]) * 1e6
        figures[name] = (per_post, per_chunks)
        print("| %s | %.3f | %.1f |" % (name, per_post, per_chunks))
    before, after = figures["before"], figures["after"]
    print("| change | %+.1f%% | %+.1f%% |" % (100 * (after[0] / before[0] - 1), 100 * (after[1] / before[1] - 1)))
    print("(all of %d interleaved rounds; load average now %s)" % (
        args.rounds, "/".join("%.2f" % x for x in os.getloadavg())))


if __name__ == "__main__":
    main()
