"""Prometheus metrics, summed over all worker processes (README, "Metrics").

One named method per event the gateway counts; without the optional
``prometheus_client`` each does nothing and /metrics answers 404.
"""

import os

from edgegate_body import INFERENCE_ROUTES


class Metrics:
    """Prometheus metrics, summed over all workers (README, "Metrics").

    ``prometheus_client`` is an optional extra (``pip install
    'edgegate[metrics]'``); without it every method here does nothing and
    ``/metrics`` answers 404 saying what to install. Its multiprocess mode
    keeps each worker's values in files under ``STATE_DIR/metrics``, which
    gunicorn.conf.py empties when the server starts and names in
    PROMETHEUS_MULTIPROC_DIR for the workers (the library reads the
    directory from there); ``directory`` is where /metrics reads them.
    Every event is one named method.
    """

    ROUTE_CLASSES = (("/v1/", "proxy"), ("/api/", "proxy"), ("/tasks/", "tasks"), ("/slots", "slots"),
                     ("/metrics", "metrics"), ("/healthz", "health"), ("/readyz", "health"), ("/ui", "ui"))

    def __init__(self, directory, slots, enabled=True):
        self.slots = slots
        self.batch_counts = None  # () -> {status: batches}, set by the gateway (edgegate_batch.Batches)
        self.directory = directory
        self.enabled = False
        self.missing = "metrics need prometheus_client: pip install 'edgegate[metrics]'"
        if not enabled:  # counts nothing: a process that has not started its own yet
            return
        try:
            import prometheus_client as prom
            from prometheus_client import multiprocess, values
            from prometheus_client.core import GaugeMetricFamily
        except ImportError:
            return
        if values.ValueClass is values.MutexValue or not os.path.isdir(directory):
            # Not in multiprocess mode: each worker would count alone and /metrics read nothing.
            self.missing = "metrics are summed over the workers only when started with gunicorn -c gunicorn.conf.py"
            return
        self.prom, self.multiprocess, self.GaugeMetricFamily = prom, multiprocess, GaugeMetricFamily
        seconds = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
        own = {"registry": None}  # the values live in the multiprocess files, read at scrape time
        self.requests = prom.Counter("edgegate_requests_total",
                                     "Requests answered, by route class, status and API key name",
                                     ["route", "status", "key"], **own)
        self.gpu_busy = prom.Counter("edgegate_gpu_busy_total", "Inference requests refused with 503 gpu_busy",
                                     **own)
        self.slot_wait = prom.Histogram("edgegate_slot_wait_seconds", "Time spent waiting for a GPU slot",
                                        buckets=seconds, **own)
        self.slot_hold = prom.Histogram("edgegate_slot_hold_seconds", "Time a GPU slot was held, by slot",
                                        ["slot"], buckets=seconds, **own)
        self.ttft = prom.Histogram("edgegate_time_to_first_token_seconds",
                                   "From a request's arrival to the upstream's first body byte", buckets=seconds,
                                   **own)
        self.upstream_errors = prom.Counter("edgegate_upstream_errors_total", "Failed upstream calls, by kind",
                                            ["kind"], **own)
        self.store_errors = prom.Counter("edgegate_store_errors_total", "Failed task store calls", **own)
        self.load_calls = prom.Counter("edgegate_keep_alive_load_calls_total",
                                       "keep_alive load calls sent before /v1 requests", **own)
        self.queue_wait = prom.Histogram("edgegate_queue_wait_seconds", "Time spent waiting in the GPU line",
                                         buckets=seconds, **own)
        self.gpu_refusals = prom.Counter("edgegate_gpu_refusals_total",
                                         "Inference requests refused for the GPU, by reason (busy, queue_full)",
                                         ["reason"], **own)
        # model: a name Ollama lists in /api/tags, else "other" (edgegate_usage.KnownModels): bounded series
        self.tokens = prom.Counter("edgegate_tokens_total", "Tokens of finished inference requests, by API key "
                                   "name, model and kind (prompt, completion)", ["key", "model", "kind"], **own)
        self.gpu_seconds = prom.Counter("edgegate_gpu_seconds_total", "Seconds a GPU slot was held by inference "
                                        "requests, by API key name and model", ["key", "model"], **own)
        self._usage_counters = {}  # (key name, model) -> the three counters above, labelled
        self.open_streams = prom.Gauge("edgegate_open_streams", "Responses being relayed now",
                                       multiprocess_mode="livesum", **own)
        self.batch_items = prom.Counter("edgegate_batch_items_total", "Batch items ended, by endpoint and outcome "
                                        "(succeeded, failed, invalid, expired, cancelled)", ["endpoint", "outcome"],
                                        **own)
        self.enabled = True

    def request_answered(self, path, status_code, key=None):
        if self.enabled:
            route = next((name for prefix, name in self.ROUTE_CLASSES if path.startswith(prefix)), "other")
            if path in INFERENCE_ROUTES:
                route = "inference"
            self.requests.labels(route, str(status_code or "-"), key.name if key else "-").inc()

    def gpu_refused(self, reason):
        """An inference request refused for the GPU: ``busy`` or ``queue_full``."""
        if self.enabled:
            self.gpu_busy.inc()
            self.gpu_refusals.labels(reason).inc()

    def slot_waited(self, seconds):
        if self.enabled:
            self.slot_wait.observe(seconds)

    def queue_waited(self, seconds):
        if self.enabled:
            self.queue_wait.observe(seconds)

    def slot_held(self, seconds, slot_index):
        if self.enabled:
            self.slot_hold.labels(str(slot_index)).observe(seconds)

    def first_byte(self, seconds):
        if self.enabled:
            self.ttft.observe(seconds)

    def upstream_failed(self, kind):
        if self.enabled:
            self.upstream_errors.labels(kind).inc()

    def store_failed(self):
        if self.enabled:
            self.store_errors.inc()

    def load_call_sent(self):
        if self.enabled:
            self.load_calls.inc()

    def inference_counted(self, key_name, model, prompt_tokens, completion_tokens, gpu_seconds):
        """A finished inference request's usage (README, "Usage and quotas")."""
        if self.enabled:
            counters = self._usage_counters.get((key_name, model))
            if counters is None:  # a few keys times the models Ollama lists: kept, not looked up each time
                counters = self._usage_counters[(key_name, model)] = (
                    self.tokens.labels(key_name, model, "prompt"), self.tokens.labels(key_name, model, "completion"),
                    self.gpu_seconds.labels(key_name, model))
            if prompt_tokens:
                counters[0].inc(prompt_tokens)
            if completion_tokens:
                counters[1].inc(completion_tokens)
            if gpu_seconds:
                counters[2].inc(gpu_seconds)

    def batch_item(self, endpoint, outcome):
        if self.enabled:
            self.batch_items.labels(endpoint, outcome).inc()

    def stream_opened(self):
        if self.enabled:
            self.open_streams.inc()

    def stream_closed(self):
        if self.enabled:
            self.open_streams.dec()

    def exposition(self):
        """The text of /metrics: every worker's values, and the slots now."""
        registry = self.prom.CollectorRegistry()
        self.multiprocess.MultiProcessCollector(registry, path=self.directory)
        held = sum(1 for slot in self.slots.describe() if slot["state"] == "held")
        slots = self.GaugeMetricFamily("edgegate_gpu_slots", "GPU slots by state", labels=["state"])
        slots.add_metric(["held"], held)
        slots.add_metric(["free"], len(self.slots.paths) - held)
        waiting = self.GaugeMetricFamily("edgegate_queue_length", "Waiters in the GPU line now (all workers, "
                                         "and python -m gateway hold)", value=len(self.slots.line.describe()))
        families = [slots, waiting]
        if self.batch_counts is not None:
            batches = self.GaugeMetricFamily("edgegate_batches", "Batches by status (OpenAI's statuses; Anthropic's "
                                             "batches as the same)", labels=["status"])
            for status, count in sorted(self.batch_counts().items()):
                batches.add_metric([status], count)
            families.append(batches)
        registry.register(ScrapeTimeFamilies(families))
        return self.prom.generate_latest(registry)


class ScrapeTimeFamilies:
    """A Prometheus collector of metric families made at scrape time (the slots and the line now)."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families
