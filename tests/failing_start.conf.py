"""gunicorn.conf.py as the README runs it, with each worker's first start
failing: building its watcher raises, as a worker out of threads would
("can't start new thread"). Used by test_concurrent_clients.py: the request
that met the failure must get the gateway's envelope, never gunicorn's bare
500, and the next request must start the worker."""

import os

import gateway as _gateway

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gunicorn.conf.py"), encoding="utf-8") as f:
    exec(compile(f.read(), "gunicorn.conf.py", "exec"))

_Watcher = _gateway.Watcher
_failed_in = set()


class _WatcherFailingOnce(_Watcher):
    def __init__(self, *args, **kwargs):
        if os.getpid() not in _failed_in:
            _failed_in.add(os.getpid())
            raise RuntimeError("can't start new thread (injected by tests/failing_start.conf.py)")
        super().__init__(*args, **kwargs)


_gateway.Watcher = _WatcherFailingOnce
