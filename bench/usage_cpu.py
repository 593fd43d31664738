"""CPU per small POST before and after a change, side by side: edgegate at
another commit (``--before``, default: the commit before usage and quotas
came in) against the working tree, each on SQLite and on Redis, and the
working tree with an API key that has quotas (one store read a second per
worker, README "Usage and quotas") against the same key without them.

    python bench/usage_cpu.py                      # 8 rounds: about 40 s on 2 cores
    python bench/usage_cpu.py --before fbf1d22 --rounds 40 --requests 400

The same small non-streamed POST /v1/chat/completions as bench/run.py's
"CPU per request", one after another on one kept-alive connection; rounds
interleaved in a shuffled order, so machine noise hits every target alike;
CPU is utime + stime of the gunicorn master, its workers (and Redis, for
the Redis rows), summed over all rounds and divided by the requests. The
last pair is nearly the same code path (a key with quotas reads the store
once a second per worker), so its difference shows the noise of the run.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import io

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (bench/run.py: processes, targets, the request, the CPU reading)

BEFORE = "fbf1d22"  # the commit before usage and quotas (issue 23)


def export(commit, into):
    """The files of ``commit`` in the directory ``into`` (git archive), to run them as they were."""
    tar = subprocess.run(["git", "archive", commit], cwd=run.ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into)
    return into


def start(procs, name, tree, upstream, extra_pids=(), **env):
    """edgegate from the source tree ``tree`` under its own gunicorn.conf.py, as bench/run.py starts it."""
    port = run.free_port()
    full_env = run.gunicorn_env(procs, port, upstream, **env)
    log = open(os.path.join(procs.tmp, "%s.log" % name.replace(" ", "_")), "wb")
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "gateway:app"],
                               cwd=tree, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    procs.running.append(process)
    target = run.Target(name, "http://127.0.0.1:%d" % port, process, extra_pids=extra_pids)
    run.wait_http(target.url + "/healthz", process=process)
    return target


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=BEFORE, help="the commit to compare with (default %s)" % BEFORE)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400, help="requests per target and round")
    args = parser.parse_args()
    procs = run.Processes()
    try:
        before = export(args.before, os.path.join(procs.tmp, "before"))
        key_file = os.path.join(procs.tmp, "keys")
        with open(key_file, "w") as f:  # limits far above what the run uses: checked, never reached
            f.write("sk-plain plain\nsk-limited limited tokens_per_day=1000000000 gpu_seconds_per_day=1000000000\n")
        stub = run.start_stub(procs)
        redis_url, redis_process = run.start_redis(procs)
        keyed = {"GATEWAY_API_KEYS": "@" + key_file}
        targets = {
            "before": start(procs, "before", before, stub.url),
            "after": start(procs, "after", run.ROOT, stub.url),
            "before+redis": start(procs, "before+redis", before, stub.url, [redis_process.pid], REDIS_URL=redis_url),
            "after+redis": start(procs, "after+redis", run.ROOT, stub.url, [redis_process.pid], REDIS_URL=redis_url),
            "after, key without quotas": start(procs, "after plain key", run.ROOT, stub.url, **keyed),
            "after, key with quotas": start(procs, "after limited key", run.ROOT, stub.url, **keyed),
        }
        targets["after, key without quotas"].headers = {"Authorization": "Bearer sk-plain"}
        targets["after, key with quotas"].headers = {"Authorization": "Bearer sk-limited"}
        for target in targets.values():
            run.sequential_latency(target, 50)  # warm up connections and the load-call cache
        rounds = run.interleaved(targets, args.rounds, lambda t: run.with_cpu(
            t, lambda: run.sequential_latency(t, args.requests)))
    finally:
        procs.stop_all()
    print("CPU per small POST %s, %d rounds of %d (ms; server processes, utime+stime):"
          % (run.CHAT, args.rounds, args.requests))
    cpu = {}
    for name, results in rounds.items():
        cpu[name] = sum(r[1] for r in results) / sum(len(r[0]) for r in results) * 1000
        per_round = [r[1] / len(r[0]) * 1000 for r in results]
        print("  %-28s %.3f  (rounds: median %.3f, min %.3f, max %.3f)" % (
            name, cpu[name], statistics.median(per_round), min(per_round), max(per_round)))
    print("change (all rounds summed; median of the per-round ratios, each round's targets run back to back):")
    for after, before in (("after", "before"), ("after+redis", "before+redis"),
                          ("after, key with quotas", "after, key without quotas")):
        ratios = [a[1] / b[1] for a, b in zip(rounds[after], rounds[before]) if b[1]]
        print("  %-28s vs %-26s %+.1f%%  (median ratio %+.1f%%)" % (
            after, before, (cpu[after] / cpu[before] - 1) * 100, (statistics.median(ratios) - 1) * 100))


if __name__ == "__main__":
    main()
