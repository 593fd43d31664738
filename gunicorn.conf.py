"""gunicorn settings for edgegate: ``gunicorn -c gunicorn.conf.py gateway:app``.

Every value comes from the gateway's one configuration (``gateway.Config``),
so a bad environment variable stops the start with one line, before any
worker is forked.
"""

from gateway import load_config

edgegate = load_config()  # not "config": that name is a gunicorn setting

bind = edgegate.bind  # GATEWAY_BIND, default 0.0.0.0:11535
workers = edgegate.workers  # WORKERS: processes; the GPU slot is shared by all of them
threads = edgegate.threads  # THREADS: one per open request, so long streams never starve short calls

# gthread: one thread per request, which the gateway needs to block on the
# upstream while its watcher thread listens to the client socket.
worker_class = "gthread"

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

# Access log: one line per request on stdout (SPEC 10).
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(B)s task=%({x-task-id}o)s %(M)sms'
