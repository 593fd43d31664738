"""gunicorn settings for edgegate: ``gunicorn -c gunicorn.conf.py gateway:app``.

Every value comes from the gateway's one configuration
(``edgegate_config.Config``), read here, once, when gunicorn starts: a bad
environment variable stops the start with one line, before any worker is
forked. The app (``gateway:app``) and the worker get it from here.
"""

import logging
import os
import shutil
import sys

import edgegate_config
import edgegate_errors
import gateway
import status

edgegate = edgegate_config.load_config()  # not "config": that name is a gunicorn setting
gateway.app.configure(edgegate)  # built here, in the arbiter; each worker starts its services after the fork

bind = edgegate.bind  # GATEWAY_BIND, default 0.0.0.0:11535
workers = edgegate.workers  # WORKERS: processes; the GPU slot is shared by all of them
threads = edgegate.threads  # THREADS: one per open request, so long streams never starve short calls

# gthread (one thread per request, which the gateway needs to block on the
# upstream while its watcher thread listens to the client socket), except that
# a request is read in, head and body, before it takes a thread: stock gthread
# gives every new connection a thread at once, so THREADS slow or silent
# clients would stall the worker (edgegate_worker.py says how, and what it
# refuses: 408 after CLIENT_HEADER_TIMEOUT_S / CLIENT_BODY_TIMEOUT_S, 429 over
# MAX_CONNECTIONS_PER_CLIENT, 400/405 for what the head alone shows is wrong).
worker_class = "edgegate_worker.BufferingWorker"

# For gthread, ``timeout`` is the worker heartbeat, not a request limit
# (gunicorn/config.py, Timeout): a 10-minute generation is not killed by it.
timeout = 30

# On HUP or max_requests, open streams get this long to finish before the
# arbiter kills the worker; statuses then go stale and read as FAILED.
graceful_timeout = 30

# Clients with connection pools (the OpenAI SDK: httpx; requests sessions)
# keep idle connections and reuse them later. gunicorn's default of 2 s
# closes them first, and a POST on a connection closed under it fails with
# "connection closed without response", which those clients do not retry.
# 75 s outlasts the usual pool idle time (httpx: 5 s, nginx upstream: 60 s).
keepalive = 75

# Connections a worker keeps: open requests plus idle kept-alive ones.
worker_connections = max(1000, 4 * threads)

# gunicorn >= 25.1 opens a control socket and creates ~/.gunicorn/ by
# default; an audited edge box gets no management socket it does not use.
control_socket_disable = True

# Access log: the gateway writes its own line per request when the request
# ends (gateway.py, Exchange.close), so that it can hold the task id, the
# model, the slot wait and the time to first byte, and escape every value
# from the request (one request is always one line). It goes to stdout;
# gunicorn's own access log is off so that a request is not logged twice.
# The line never holds a query string, a header, a prompt, a completion or a key.
accesslog = None

METRICS_DIR = os.path.join(edgegate.state_dir, "metrics")


def on_starting(server):
    """Start /metrics from zero: prometheus_client's multiprocess files of an
    earlier run would otherwise be summed in. prometheus_client's
    multiprocess mode reads its directory from the environment when a worker
    first imports it: set here, before any worker is forked, so that every
    worker writes where /metrics reads (an inherited value, or gunicorn's
    ``-e``, which replaces ``raw_env``, must not send them elsewhere). And
    make the SQLite task store ready here, once, before any worker is forked:
    workers that set up a new file all at once, on their first requests,
    lock each other out of it."""
    shutil.rmtree(METRICS_DIR, ignore_errors=True)
    os.makedirs(METRICS_DIR, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = METRICS_DIR
    status.prepare_store(edgegate)


def post_fork(server, worker):
    """The worker gets the configuration (its client limits). The gateway's
    own messages (store down, upstream without Ollama's native API, internal
    errors) go to gunicorn's error log, formatted alike; its access lines go
    to stdout, one per request."""
    worker.edgegate = edgegate
    worker.body_room = gateway.app.gateway.bodies  # one body budget for the worker's poller and its threads
    gateway_log = logging.getLogger("edgegate")
    gateway_log.handlers = server.log.error_log.handlers
    gateway_log.setLevel(logging.INFO)
    gateway_log.propagate = False
    edgegate_errors.access_log.to(sys.stdout)


def post_worker_init(worker):
    """Each worker starts its services now, not at its first request: its
    batch runner may have to take over a batch after a restart (README,
    "Batches"), with no client asking anything."""
    gateway.app.gateway.start_here()


def child_exit(server, worker):
    """A dead worker's live gauges (open streams) must not count any more."""
    try:
        from prometheus_client import multiprocess
    except ImportError:
        return
    multiprocess.mark_process_dead(worker.pid, METRICS_DIR)
