"""Drop-in with the defaults (issue #22): what a client does against Ollama
works unchanged through the gateway, also when it sends several requests at
once. Ollama queues what its GPU cannot run yet (OLLAMA_MAX_QUEUE 512,
server/sched.go); so, by default, does the gateway: a batch of 8 from one
client waits its turn, request by request, and every one is answered.

Each client is the real package, run first straight against the stub (which
answers requests side by side), then through a gateway with its defaults,
where the one GPU slot serves them one after another. ``X-Stub: delay``
makes each take long enough that they really overlap. ``max_retries=0`` for
the openai SDK: a retry must not hide a 503.

Also here: a new store's first requests, all at once, on both workers; a
worker that fails to start answers in the envelope; a streamed request that
waited briefly keeps the upstream's own status; a stream cut mid-way names
its task, and the task says why it ended.
"""

import concurrent.futures
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time

import ollama
import openai
import pytest
import requests
from langchain_ollama import ChatOllama

from conftest import REPO, GatewayProcess, gateway_error, gateways, wait_until

DELAY = 0.2  # seconds each stubbed answer takes
KNOBS = "delay=%s" % DELAY
CHAT = [{"role": "user", "content": "hi"}]
JS_DIR = os.path.join(REPO, "tests", "js")


def arrivals(stub, path):
    return sorted(r.arrived_at for r in stub.requests_to(path))


def ran_side_by_side(stub, path):
    """Straight to the stub: some of the requests were there at once."""
    times = arrivals(stub, path)
    return len(times) == 8 and any(b - a < DELAY for a, b in zip(times, times[1:]))


def ran_one_after_another(stub, path):
    """Through the gateway: the one GPU slot let one at a time reach the stub."""
    times = arrivals(stub, path)
    return len(times) == 8 and all(b - a >= DELAY * 0.9 for a, b in zip(times, times[1:]))


def at_once(call, n=8):
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: call(), range(n)))


@pytest.fixture
def drop_in(defaults_gateway, stub):
    assert defaults_gateway.wait_slot_free()
    return defaults_gateway


# ---------------------------------------------------------------- clients, 8 at once


def test_openai_sdk_eight_concurrent_chats_all_answered(drop_in, stub):
    def eight(base_url):
        client = openai.OpenAI(base_url=base_url + "/v1/", api_key="unused", max_retries=0, timeout=30,
                               default_headers={"X-Stub": KNOBS})
        return at_once(lambda: client.chat.completions.create(model="llama3.2", messages=CHAT))

    direct = eight(stub.url)
    assert [a.choices[0].message.content for a in direct] == ["Hello from the"] * 8
    assert ran_side_by_side(stub, "/v1/chat/completions")
    stub.reset()
    through = eight(drop_in.url)  # a 503 would raise openai.InternalServerError here
    assert [a.choices[0].message.content for a in through] == ["Hello from the"] * 8
    assert ran_one_after_another(stub, "/v1/chat/completions")


def test_ollama_python_eight_threads_all_answered(drop_in, stub):
    def eight(host):
        client = ollama.Client(host=host, headers={"X-Stub": KNOBS}, timeout=30, trust_env=False)
        return at_once(lambda: client.chat(model="llama3.2", messages=CHAT))

    assert [a.message.content for a in eight(stub.url)] == ["Hello from the"] * 8
    assert ran_side_by_side(stub, "/api/chat")
    stub.reset()
    assert [a.message.content for a in eight(drop_in.url)] == ["Hello from the"] * 8
    assert ran_one_after_another(stub, "/api/chat")


def test_langchain_chat_ollama_batch_of_eight_all_answered(drop_in, stub):
    def batch(host):
        model = ChatOllama(model="llama3.2", base_url=host, client_kwargs={"headers": {"X-Stub": KNOBS}})
        return model.batch(["hi"] * 8, config={"max_concurrency": 8})

    assert [m.content for m in batch(stub.url)] == ["Hello from the"] * 8
    assert ran_side_by_side(stub, "/api/chat")
    stub.reset()
    assert [m.content for m in batch(drop_in.url)] == ["Hello from the"] * 8
    assert ran_one_after_another(stub, "/api/chat")


@pytest.fixture(scope="module")
def node():
    """node, with the ollama npm package of tests/js (``npm ci --prefix tests/js`` when missing)."""
    found = shutil.which("node")
    if found is None:
        pytest.skip("node is not installed: the ollama-js cases need Node.js 18 or newer")
    if not os.path.isdir(os.path.join(JS_DIR, "node_modules", "ollama")):
        done = subprocess.run(["npm", "ci", "--prefix", JS_DIR, "--no-audit", "--no-fund"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    return found


def test_ollama_js_promise_all_of_eight_all_answered(drop_in, stub, node):
    def eight(host):
        done = subprocess.run([node, os.path.join(JS_DIR, "ollama_concurrent.mjs"), host, "8", KNOBS],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert eight(stub.url) == {"answered": 8, "errors": []}
    assert ran_side_by_side(stub, "/api/chat")
    stub.reset()
    assert eight(drop_in.url) == {"answered": 8, "errors": []}
    assert ran_one_after_another(stub, "/api/chat")


# ---------------------------------------------------------------- the first requests after a fresh start


class ColdGateway(GatewayProcess):
    """A gateway whose workers have served nothing yet: ready once gunicorn
    listens (no /healthz first: the test's own requests are the first its
    workers serve)."""

    def _healthy(self):
        if self.process.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False


@pytest.fixture
def cold_start(stub_server):
    with gateways(stub_server, ColdGateway) as start:
        yield start


def test_sixteen_first_requests_on_a_fresh_store_are_all_answered(cold_start, stub):
    """A new STATE_DIR and two workers that have served nothing: their
    first requests all come at once. Each is answered by Ollama's stand-in,
    and each has its task document; none gets gunicorn's HTML page."""
    gateway = cold_start()
    store = sqlite3.connect(os.path.join(gateway.state_dir, "tasks.sqlite3"))
    assert store.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # made ready before the workers were forked
    store.close()
    go = threading.Barrier(16)

    def first(n):
        go.wait()
        return requests.post(gateway.url + "/api/chat", json={"model": "llama3.2", "messages": CHAT, "stream": False},
                             headers={"X-Task-Id": "first-%d" % n, "X-Stub": "delay=0.02"}, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(first, range(16)))
    assert [a.status_code for a in answers] == [200] * 16, [a.text[:200] for a in answers]
    assert all(a.json()["message"]["content"] == "Hello from the" for a in answers)
    for n in range(16):
        assert gateway.wait_state("first-%d" % n, ("SUCCESS",))
    assert "Traceback" not in gateway.read_log()


def test_a_worker_that_fails_to_start_answers_in_the_envelope_and_tries_again(cold_start, stub):
    """tests/failing_start.conf.py makes each worker's start at boot and its
    first request's start fail: the worker boots all the same, the request
    that met the failure gets the gateway's envelope and one access line,
    never gunicorn's bare 500; the next request starts the worker."""
    gateway = cold_start(conf=os.path.join(REPO, "tests", "failing_start.conf.py"), WORKERS="1")
    failed = gateway.post("/api/chat", json={"model": "llama3.2", "messages": CHAT, "stream": False})
    assert failed.status_code == 500 and failed.headers["Content-Type"] == "application/json"
    assert gateway_error(failed)["code"] == "internal_error"
    answered = gateway.post("/api/chat", json={"model": "llama3.2", "messages": CHAT, "stream": False})
    assert answered.status_code == 200
    log = gateway.read_log()
    assert log.count("RuntimeError: can't start new thread (injected") == 2  # one traceback each
    assert "could not start its services; its first request tries again" in log
    assert log.count('"POST /api/chat" 500') == 1 and log.count('"POST /api/chat" 200') == 1


# ---------------------------------------------------------------- a short wait keeps the upstream's status


@pytest.fixture(scope="module")
def patient_gateway(start_gateway):
    """Defaults, but SSE keep-alives every 3 s (the tests' gateways send them every 0.5 s)."""
    return start_gateway(HEARTBEAT_SEC="3", WORKERS="1")


def test_a_stream_that_waited_briefly_gets_the_upstreams_404_as_not_found(patient_gateway, stub):
    gateway = patient_gateway
    holder = threading.Thread(target=gateway.post, args=("/api/chat",), daemon=True,
                              kwargs={"json": {"model": "llama3.2", "messages": CHAT}, "headers": {"X-Stub": "delay=0.8"}})
    holder.start()
    assert wait_until(lambda: gateway.slots()[0]["state"] == "held", 5)
    client = openai.OpenAI(base_url=gateway.url + "/v1/", api_key="unused", max_retries=0, timeout=10)
    started = time.monotonic()
    with pytest.raises(openai.NotFoundError) as raised:
        list(client.chat.completions.create(model="missing", messages=CHAT, stream=True))
    assert time.monotonic() - started > 0.3  # it waited its turn behind the holder
    assert "not found" in raised.value.message
    holder.join(5)


# ---------------------------------------------------------------- a stream cut mid-way says why


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_stream_cut_mid_way_names_its_task_and_the_task_says_why(drop_in, stub, path):
    task_id = "cut-" + path.split("/")[1]
    answer = drop_in.post(path, json={"model": "llama3.2", "messages": CHAT, "stream": True},
                          headers={"X-Task-Id": task_id, "X-Stub": "chunks=5,chunk_delay=0.05,reset_after=2"})
    assert answer.status_code == 200
    last = answer.text.strip().splitlines()[-1]
    error = json.loads(last[len("data: "):] if path.startswith("/v1/") else last)["error"]
    error_task = error["task_id"] if isinstance(error, dict) else json.loads(last)["task_id"]
    assert error_task == task_id == answer.headers["X-Task-Id"]
    document = drop_in.wait_state(task_id, ("FAILED",))
    assert document["stage"] == "upstream_error"
    assert "ollama at http://127.0.0.1" in document["message"].lower()  # who failed, in words


def test_langchain_chat_ollama_shows_a_stream_cut_mid_way_as_text(drop_in, stub):
    """ChatOllama reads through the ollama package, whose stream raises
    ResponseError with the error line's text; LangChain lets it through."""
    model = ChatOllama(model="llama3.2", base_url=drop_in.url,
                       client_kwargs={"headers": {"X-Stub": "chunks=5,chunk_delay=0.05,reset_after=2",
                                                  "X-Task-Id": "cut-langchain"}})
    with pytest.raises(ollama.ResponseError) as raised:
        list(model.stream("hi"))
    assert "ollama at http://127.0.0.1" in raised.value.error.lower()
    assert drop_in.wait_state("cut-langchain", ("FAILED",))["stage"] == "upstream_error"
