"""gunicorn.conf.py as the README runs it, with each worker's first two
starts failing: building its watcher raises, as a worker out of threads
would ("can't start new thread"). The first is the start at boot
(``post_worker_init``): the worker must boot all the same. The second is
its first request's: that request must get the gateway's envelope, never
gunicorn's bare 500, and the next request must start the worker. Used by
test_concurrent_clients.py."""

import os

import gateway as _gateway

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gunicorn.conf.py"), encoding="utf-8") as f:
    exec(compile(f.read(), "gunicorn.conf.py", "exec"))

_Watcher = _gateway.Watcher
_failures = {}  # pid -> starts failed


class _WatcherFailingTwice(_Watcher):
    def __init__(self, *args, **kwargs):
        if _failures.get(os.getpid(), 0) < 2:
            _failures[os.getpid()] = _failures.get(os.getpid(), 0) + 1
            raise RuntimeError("can't start new thread (injected by tests/failing_start.conf.py)")
        super().__init__(*args, **kwargs)


_gateway.Watcher = _WatcherFailingTwice
