"""Where one edgegate worker spends its CPU on small POSTs.

    python bench/profile_edgegate.py                  # 15 s per profiler under wrk, concurrency 8
    python bench/profile_edgegate.py --path /api/chat --seconds 30 --top 15
    python bench/profile_edgegate.py --app empty_app:app   # the same view of the empty app (bench/)

Starts the stub upstream and edgegate as bench/run.py does, but with one
worker (``WORKERS=1``), loads it with the benchmark's small non-streamed
POST (wrk, else Python client threads) and looks at the worker twice, one
window after the other under the same load:

1. **py-spy** (``pip install py-spy``; root may ptrace) samples the Python
   stacks of the thread holding the GIL (``--gil``: a gthread worker has 64
   pool threads mostly waiting on a queue, which py-spy's idle filter does
   not always recognise). Functions are shown as % of the worker's CPU time
   over the window (utime + stime from /proc): each sample stands for
   1/rate s of Python running.
2. **perf** (when installed; ``-e cpu-clock``, no hardware counters needed)
   samples the worker on CPU, so it also sees what runs without the GIL: the
   kernel's side of the sockets and files, SQLite, the json C accelerator.

Prints markdown tables: the top functions by self and by inclusive time, the
same grouped by module, and perf's split by shared object and its top
symbols. Rerun it after any change to the gateway's modules: it needs only the checkout,
py-spy and (optionally) perf.
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (bench/run.py: the same processes and requests as the benchmark)

FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# Modules by where their file lives, for the grouped view (py-spy shows paths below site-packages or the stdlib).
AREAS = [
    ("edgegate: gateway.py and edgegate_*.py", r"(^|/)(gateway|edgegate_\w+)\.py$"),
    ("edgegate: status.py (task store)", r"(^|/)status\.py$"),
    ("the app under test", r"(^|/)empty_app\.py$"),
    ("gunicorn", r"(^|/)gunicorn/"),
    ("requests", r"(^|/)requests/"),
    ("urllib3", r"(^|/)urllib3/"),
    ("http.client, email (header parsing)", r"(^|/)(http/client|email/.*)\.py$"),
    ("sqlite3", r"(^|/)sqlite3/"),
    ("redis", r"(^|/)redis/"),
    ("json", r"(^|/)json/"),
    ("logging", r"(^|/)logging/"),
    ("socket, selectors", r"(^|/)(socket|selectors|ssl)\.py$"),
    ("threading, queue, concurrent.futures", r"(^|/)(threading|queue|concurrent/.*)\.py$"),
    ("uuid", r"(^|/)uuid\.py$"),
    ("prometheus_client", r"(^|/)prometheus_client/"),
]


# Frames on nearly every stack that say only "a thread" or "gunicorn started a worker": left out of
# the inclusive table (ThreadWorker.run stays: it is the worker's main thread, accepting and polling).
PLUMBING = re.compile(r"^(Thread\._bootstrap(_inner)?|Thread\.run|_worker|_WorkItem\.run|_run_module_as_main|_run_code"
                      r"|<module>|run|Application\.run|BaseApplication\.run|Arbiter\.\w+|Worker\.init_process"
                      r"|ThreadWorker\.init_process) \(")


def find_tool(option, name, variable):
    for candidate in (option, os.environ.get(variable), shutil.which(name),
                      os.path.join(os.path.dirname(sys.executable), name)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class Load:
    """The benchmark's small POST at ``concurrency`` for ``seconds``: wrk,
    else Python client threads. ``rate`` (requests per second) once done."""

    def __init__(self, target, path, seconds, concurrency, tmp):
        self.rate = None
        if shutil.which("wrk"):
            script = os.path.join(tmp, "wrk.lua")
            with open(script, "w") as f:
                f.write(run.WRK_SCRIPT % ("POST", run.SMALL_CHAT.decode(), ""))
            self.wrk = subprocess.Popen(["wrk", "-t2", "-c%d" % concurrency, "-d%ds" % seconds, "-s", script,
                                         target.url + path], stdout=subprocess.PIPE, text=True)
            self.how = "wrk -t2 -c%d" % concurrency
            return
        self.wrk, self.done, started = None, [], time.monotonic()
        stop = started + seconds

        def client():
            while time.monotonic() < stop:
                self.done.append(len(run.sequential_latency(target, 10, path)))

        self.threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
        for thread in self.threads:
            thread.start()
        self.how = "%d Python client threads" % concurrency
        self.started = started

    def finish(self):
        if self.wrk is not None:
            out = self.wrk.communicate()[0]
            self.rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        else:
            for thread in self.threads:
                thread.join()
            self.rate = sum(self.done) / (time.monotonic() - self.started)


class Window:
    """The worker's CPU seconds while a profiler ran, and per request at the
    load's rate."""

    def __init__(self, worker):
        self.worker = worker

    def __enter__(self):
        self.cpu = run.cpu_seconds([self.worker])
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.cpu = run.cpu_seconds([self.worker]) - self.cpu
        self.wall = time.monotonic() - self.started

    def describe(self, rate):
        requests = rate * self.wall
        return "%.2f s CPU in %.1f s (%.0f%% of a core) at %.0f requests/s: %.3f ms CPU per request" % (
            self.cpu, self.wall, 100 * self.cpu / self.wall, rate, 1000 * self.cpu / max(requests, 1))


def parse_collapsed(path):
    """[(frames, outermost first; samples)] from py-spy's raw output."""
    stacks = []
    with open(path) as f:
        for line in f:
            frames, _, count = line.rstrip("\n").rpartition(" ")
            if frames:
                stacks.append(([frame for frame in frames.split(";") if frame], int(count)))
    return stacks


def name_of(frame):
    match = FRAME.match(frame)
    if not match:
        return frame, ""
    path = match.group("file")
    short = path.split("site-packages/")[-1]
    short = re.sub(r"^.*/lib/python3\.\d+/", "", short)
    return "%s (%s)" % (match.group("function"), short), path


def area_of(path):
    for area, pattern in AREAS:
        if re.search(pattern, path):
            return area
    return "other: " + (os.path.basename(path) or "?")


def python_report(stacks, seconds_per_sample, cpu, top):
    """Tables of the py-spy samples, each as % of the worker's CPU time."""
    own, under, areas = collections.Counter(), collections.Counter(), collections.Counter()
    for frames, count in stacks:
        names = [name_of(frame) for frame in frames]
        own[names[-1][0]] += count
        areas[area_of(names[-1][1])] += count
        for name in {name for name, _ in names}:
            under[name] += count

    def pct(count):
        return 100 * count * seconds_per_sample / cpu

    held = sum(count for _, count in stacks)
    lines = ["Python holding the GIL: %.0f%% of the worker's CPU time." % pct(held), "",
             "Self time (the function running), % of the worker's CPU time:", "",
             "| % | function (file) |", "| ---: | --- |"]
    lines += ["| %.1f | `%s` |" % (pct(c), name) for name, c in own.most_common(top)]
    lines += ["", "Inclusive time (the function or what it calls), % of the worker's CPU time:", "",
              "| % | function (file) |", "| ---: | --- |"]
    lines += ["| %.1f | `%s` |" % (pct(c), name)
              for name, c in [(n, c) for n, c in under.most_common() if not PLUMBING.match(n)][:top * 3]]
    lines += ["", "Self time by module, % of the worker's CPU time:", "", "| % | module |", "| ---: | --- |"]
    lines += ["| %.1f | %s |" % (pct(c), area) for area, c in areas.most_common() if pct(c) >= 0.5]
    lines += ["", "By the app's own call path (its first %d frames from %s, everything below them included), "
              "%% of the worker's CPU time:" % (APP_DEPTH, "/".join(APP_FILES)), "",
              "| % | call path |", "| ---: | --- |"]
    lines += ["| %.1f | %s |" % (pct(c), path) for path, c in by_app_path(stacks).most_common() if pct(c) >= 0.5]
    return lines


APP_FILES = ("gateway.py", "status.py", "empty_app.py", "edgegate_body.py", "edgegate_cloud.py",
             "edgegate_config.py", "edgegate_errors.py", "edgegate_hold.py", "edgegate_metrics.py", "edgegate_relay.py",
             "edgegate_slots.py", "edgegate_upstream.py", "edgegate_worker.py")
APP_DEPTH = 4


def by_app_path(stacks):
    """Samples by the chain of the app's own frames they run under (the
    first APP_DEPTH of them): what each step of a request costs, whatever
    the functions are called after a refactor. Samples with no app frame
    are gunicorn's and the standard library's alone."""
    paths = collections.Counter()
    for frames, count in stacks:
        own = [name_of(frame)[0].split(" (")[0] for frame in frames
               if os.path.basename(name_of(frame)[1]) in APP_FILES]
        paths[" › ".join(own[:APP_DEPTH]) if own else "(no app frame: gunicorn, threads, the poller)"] += count
    return paths


def perf_report(data, top):
    def report(sort):
        out = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none", "--sort", sort,
                              "-q", "--percent-limit", "0.5"], capture_output=True, text=True).stdout
        return [line.split(None, 1) for line in out.splitlines() if re.match(r"\s*[\d.]+%\s", line)]

    lines = ["On-CPU samples by shared object (perf, cpu-clock), % of the worker's CPU time:", "",
             "| % | shared object |", "| ---: | --- |"]
    lines += ["| %s | %s |" % (pct.rstrip("%"), rest.strip()) for pct, rest in report("dso")]
    lines += ["", "Top symbols:", "", "| % | shared object, symbol |", "| ---: | --- |"]
    lines += ["| %s | `%s` |" % (pct.rstrip("%"), " ".join(rest.split())) for pct, rest in report("dso,sym")[:top * 2]]
    return lines


SYSCALL = re.compile(r"\b__(?:x64|ia32)_sys_(\w+)")


def kernel_by_syscall(data):
    """% of the on-CPU samples in the kernel, by the system call they were
    made in (from perf's call chains); kernel time outside any system call
    is the scheduler and interrupts on the way back to user space."""
    out = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,dso"], capture_output=True, text=True).stdout
    counts, total = collections.Counter(), 0
    for sample in out.split("\n\n"):
        frames = [line.strip() for line in sample.strip().splitlines()]
        if not frames:
            continue
        total += 1
        if "[kernel.kallsyms]" not in frames[0]:
            continue
        match = next((SYSCALL.search(frame) for frame in frames if SYSCALL.search(frame)), None)
        counts[match.group(1) if match else "(not in a system call: preemption, interrupts)"] += 1
    lines = ["Kernel time by system call (perf call chains), % of the worker's CPU time:", "",
             "| % | system call |", "| ---: | --- |"]
    lines += ["| %.1f | %s |" % (100 * c / total, name) for name, c in counts.most_common() if 100 * c / total >= 0.3]
    return lines


def main():
    parser = argparse.ArgumentParser(description="profile one edgegate worker under the benchmark's small POST")
    parser.add_argument("--seconds", type=int, default=15, help="window of each profiler")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--path", default=run.CHAT, help="POST target (default %(default)s; /api/chat works too)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--app", default="gateway:app", help="WSGI app (default %(default)s; bench/ is on the path)")
    parser.add_argument("--py-spy", dest="py_spy", help="py-spy executable")
    parser.add_argument("--no-perf", action="store_true", help="skip the perf window")
    parser.add_argument("--keep", metavar="DIR", help="keep the raw profiles (py-spy stacks, perf.data) in DIR")
    args = parser.parse_args()
    py_spy = find_tool(args.py_spy, "py-spy", "PY_SPY")
    if py_spy is None:
        raise SystemExit("profile: py-spy not found (pip install py-spy, or --py-spy PATH)")
    perf = None if args.no_perf else shutil.which("perf")

    procs = run.Processes()
    keep = args.keep or procs.tmp
    os.makedirs(keep, exist_ok=True)
    stacks_file, perf_file = os.path.join(keep, "py-spy-stacks.txt"), os.path.join(keep, "perf.data")
    try:
        stub = run.start_stub(procs)
        target = run.start_gunicorn(procs, "edgegate", ["--pythonpath", "bench", args.app], stub.url,
                                    gunicorn_access_log=args.app != "gateway:app", WORKERS="1")
        worker = run.descendants(target.process.pid)[1]
        run.sequential_latency(target, 200, args.path)  # warm up: connections, load-call cache, store

        def loaded(profile):
            """Run ``profile`` in a window under the load; (window, load)."""
            load = Load(target, args.path, args.seconds + 4, args.concurrency, procs.tmp)
            time.sleep(2)  # the load has settled
            with Window(worker) as window:
                profile()
            load.finish()
            return window, load

        def py_spy_record():
            done = subprocess.run([py_spy, "record", "-p", str(worker), "-d", str(args.seconds), "-r", str(args.rate),
                                   "--gil", "--nonblocking", "-f", "raw", "-F", "-o", stacks_file],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit("py-spy failed:\n" + done.stderr[-2000:])

        def perf_record():
            done = subprocess.run([perf, "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(worker),
                                   "-o", perf_file, "--", "sleep", str(args.seconds)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError("perf failed:\n" + done.stderr[-1000:])

        spy_window, load = loaded(py_spy_record)
        perf_window = None
        if perf:
            try:
                perf_window, perf_load = loaded(perf_record)
            except RuntimeError as failure:
                print("%s\nits window is left out" % failure, file=sys.stderr)

        version = subprocess.run([py_spy, "--version"], capture_output=True, text=True).stdout.strip()
        print("%s, one worker (THREADS=64), POST %s under %s; %s; edgegate at %s\n" % (
            args.app, args.path, load.how, run.machine(), run.checkout()))
        print("%s (--gil --nonblocking) at %d Hz for %d s: %s\n" % (version, args.rate, args.seconds,
                                                                    spy_window.describe(load.rate)))
        print("\n".join(python_report(parse_collapsed(stacks_file), 1 / args.rate, spy_window.cpu, args.top)))
        if perf_window:
            print("\nperf record -e cpu-clock -F 999 -g for %d s: %s\n" % (args.seconds,
                                                                          perf_window.describe(perf_load.rate)))
            print("\n".join(perf_report(perf_file, args.top)))
            print()
            print("\n".join(kernel_by_syscall(perf_file)))
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
