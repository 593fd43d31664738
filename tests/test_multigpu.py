"""Several GPUs on one box (issue #15): one Ollama per GPU, one slot each,
and each inference request sent to the GPU that already holds its model.
Two stub upstreams stand for the two Ollamas."""

import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, free_port, gateway_error, wait_until
from stub_upstream import StubServer

LONG = {"X-Stub": "chunks=5,chunk_delay=0.2"}  # about a second of streaming


def chat(model="llama3.2", stream=False):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


@pytest.fixture
def two_gpus(start_gateway):
    """A gateway (one worker, so that what it knows is one worker's) in front of two fresh stubs."""
    def start(**env):
        gpus = [StubServer().start(), StubServer().start()]
        started.extend(gpus)
        env.setdefault("WORKERS", "1")
        gateway = start_gateway(UPSTREAM_BASE="%s,%s" % (gpus[0].url, gpus[1].url), **env)
        return gateway, gpus

    started = []
    yield start
    for stub in started:
        try:
            stub.stop()
        except OSError:
            pass


def served_by(gpus, task_id, path="/api/chat"):
    """Which stub got the request with this X-Task-Id (None: neither)."""
    for index, stub in enumerate(gpus):
        if any(r.headers.get("x-task-id") == task_id for r in stub.received if r.path == path):
            return index
    return None


def test_two_long_requests_run_at_once_on_the_two_gpus(two_gpus):
    gateway, gpus = two_gpus()
    answers = {}

    def ask(name):
        answers[name] = gateway.post("/api/chat", json=chat(stream=True), headers=dict(LONG, **{"X-Task-Id": name}))

    started = time.monotonic()
    clients = [threading.Thread(target=ask, args=(name,)) for name in ("both-1", "both-2")]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    took = time.monotonic() - started
    assert [answers[n].status_code for n in ("both-1", "both-2")] == [200, 200]
    assert 0.9 < took < 1.7, "the two ran one after the other (%.2f s)" % took
    assert {served_by(gpus, "both-1"), served_by(gpus, "both-2")} == {0, 1}
    documents = [gateway.status(n).json()["extensions"] for n in ("both-1", "both-2")]
    assert sorted(d["slot"] for d in documents) == [0, 1]
    assert {d["upstream"] for d in documents} == {gpus[0].url, gpus[1].url}
    log = gateway.read_log()
    assert "task=both-1" in log and " slot=" in log


def test_a_model_goes_back_to_the_gpu_that_has_it_loaded_and_a_new_one_to_the_idle_gpu(two_gpus):
    gateway, gpus = two_gpus()
    gpus[1].load("llama3.2")  # GPU 1 has it, though GPU 0 is the one taken longest ago
    for n in range(3):
        assert gateway.post("/api/chat", json=chat(), headers={"X-Task-Id": "back-%d" % n}).status_code == 200
        assert served_by(gpus, "back-%d" % n) == 1
    # A model loaded nowhere goes to the GPU taken longest ago: GPU 0, never used.
    assert gateway.post("/api/chat", json=chat("qwen3"), headers={"X-Task-Id": "new-1"}).status_code == 200
    assert served_by(gpus, "new-1") == 0
    # What the gateway sent counts at once: qwen3 now goes back to GPU 0, llama3.2 to GPU 1.
    assert gateway.post("/api/chat", json=chat("qwen3"), headers={"X-Task-Id": "new-2"}).status_code == 200
    assert served_by(gpus, "new-2") == 0
    # keep_alive 0 unloads it there: a third model now goes to the GPU taken longest ago (GPU 1).
    unload = {"model": "qwen3", "prompt": "x", "keep_alive": 0, "stream": False}
    assert gateway.post("/api/generate", json=unload, headers={"X-Task-Id": "unload-1"}).status_code == 200
    assert served_by(gpus, "unload-1", "/api/generate") == 0
    slots = gateway.slots()
    assert [s["upstream"] for s in slots] == [gpus[0].url, gpus[1].url]
    assert (slots[0]["loaded"], slots[1]["loaded"]) == ([], ["llama3.2:latest"])
    # Everything else goes to the first healthy upstream.
    assert gateway.get("/api/tags").status_code == 200
    assert any(r.path == "/api/tags" for r in gpus[0].received)
    assert not any(r.path == "/api/tags" for r in gpus[1].received)


def test_a_gpu_whose_ollama_dies_is_skipped_and_its_running_request_fails_cleanly(two_gpus):
    gateway, gpus = two_gpus(UPSTREAM_DOWN_S="30")
    gpus[1].load("llama3.2")
    answer = gateway.post("/api/chat", json=chat(stream=True), stream=True,
                          headers={"X-Task-Id": "dying-1", "X-Stub": "chunks=10,chunk_delay=0.1,reset_after=3"})
    assert answer.status_code == 200
    gpus[1].stop()  # the Ollama on GPU 1 dies: its listener is gone, and (reset_after) its connection
    last = answer.content.splitlines()[-1]  # the running stream ends with an error, never resent elsewhere
    assert b'"error"' in last, last
    document = gateway.wait_state("dying-1", ("FAILED",))
    assert document["stage"] == "upstream_error" and document["extensions"]["slot"] == 1
    assert wait_until(lambda: gateway.slots()[1]["state"] == "free", 5)
    for n in range(3):  # llama3.2 is loaded on GPU 1 only, yet every request now goes to GPU 0
        ok = gateway.post("/api/chat", json=chat(), headers={"X-Task-Id": "after-%d" % n})
        assert ok.status_code == 200, ok.text
        assert served_by(gpus, "after-%d" % n) == 0
    ready = gateway.get("/readyz")
    assert ready.status_code == 200
    assert [u["state"] for u in ready.json()["upstreams"]] == ["up", "down"]
    slot = gateway.slots()[1]
    assert (slot["state"], slot["upstream"], slot["upstream_state"]) == ("free", gpus[1].url, "down")


def test_readyz_names_every_upstream_when_none_answers(start_gateway):
    dead = ["http://127.0.0.1:%d" % free_port() for _ in range(2)]
    gateway = start_gateway(UPSTREAM_BASE=",".join(dead), WORKERS="1")
    ready = gateway.get("/readyz")
    assert ready.status_code == 503
    message = gateway_error(ready)["message"]
    assert dead[0] in message and dead[1] in message


def test_the_line_is_served_in_arrival_order_by_whichever_gpu_frees_first(two_gpus):
    gateway, gpus = two_gpus(SLOT_WAIT_S="10")
    holders = [threading.Thread(target=gateway.post, args=("/api/chat",), kwargs={
                   "json": chat(stream=True), "headers": {"X-Stub": "chunks=4,chunk_delay=%s" % delay}})
               for delay in (0.2, 0.4)]  # GPU slots busy for about 0.6 and 1.2 s
    for holder in holders:
        holder.start()
    assert wait_until(lambda: all(s["state"] == "held" for s in gateway.slots()), 5)
    began, answers = {}, {}

    def wait_in_line(name):
        answers[name] = gateway.post("/api/chat", json=chat(stream=True), stream=True, timeout=20,
                                     headers={"X-Task-Id": name, "X-Stub": "chunks=3,chunk_delay=0.1"})
        began[name] = time.monotonic()  # its headers: it has just been forwarded
        answers[name].content

    names = ["line-%d" % n for n in range(4)]
    waiters = []
    for name in names:
        waiters.append(threading.Thread(target=wait_in_line, args=(name,)))
        waiters[-1].start()
        assert wait_until(lambda: name in [w["task_id"] for w in gateway.get("/slots").json()["queue"]]
                          or name in began, 5)
    for thread in waiters + holders:
        thread.join(20)
    assert all(answers[n].status_code == 200 for n in names)
    assert sorted(names, key=began.get) == names
    assert {served_by(gpus, n) for n in names} == {0, 1}  # both GPUs took from the one line


def test_several_upstreams_mean_one_slot_each():
    import edgegate_config
    two = {"UPSTREAM_BASE": "http://127.0.0.1:11434, http://127.0.0.1:11435"}
    config = edgegate_config.Config.from_environ(two)
    assert (config.upstream_bases, config.gpu_slots) == (("http://127.0.0.1:11434", "http://127.0.0.1:11435"), 2)
    with pytest.raises(edgegate_config.ConfigError, match="GPU_SLOTS='3': with 2 upstreams in UPSTREAM_BASE"):
        edgegate_config.Config.from_environ(dict(two, GPU_SLOTS="3"))
    with pytest.raises(edgegate_config.ConfigError, match="without /v1"):
        edgegate_config.Config.from_environ({"UPSTREAM_BASE": "http://127.0.0.1:11434,http://127.0.0.1:11435/v1"})


def test_with_prefer_loaded_wait_the_head_of_the_line_waits_for_the_gpu_that_has_its_model(two_gpus):
    gateway, gpus = two_gpus(SLOT_WAIT_S="10", PREFER_LOADED_WAIT_S="5")
    gpus[1].load("llama3.2")
    running = threading.Thread(target=gateway.post, args=("/api/chat",), kwargs={
        "json": chat(stream=True), "headers": dict(LONG, **{"X-Task-Id": "loaded-1"})})
    running.start()
    assert wait_until(lambda: gateway.slots()[1]["state"] == "held", 5)
    started = time.monotonic()
    answer = gateway.post("/api/chat", json=chat(), headers={"X-Task-Id": "patient-1"})
    running.join()
    assert answer.status_code == 200
    assert served_by(gpus, "patient-1") == 1, "it loaded the model a second time, on GPU 0"
    assert 0.5 < time.monotonic() - started < 4
    assert not [r for r in gpus[0].received if r.path == "/api/chat"]


def test_hold_takes_one_slot_or_all_and_unloads_only_their_ollamas(two_gpus):
    gateway, gpus = two_gpus()

    def hold(*args):
        return subprocess.run([sys.executable, "-m", "gateway", "hold"] + list(args) + ["--", "true"],
                              cwd=REPO, env=dict(gateway.env), timeout=30).returncode

    for stub in gpus:
        stub.load("llama3.2", 300)
    assert hold("--slot", "1") == 0
    assert (gpus[0].loaded_models(), gpus[1].loaded_models()) == (["llama3.2:latest"], [])
    gpus[1].load("qwen3", 300)
    assert hold("--all") == 0
    assert (gpus[0].loaded_models(), gpus[1].loaded_models()) == ([], [])
    assert gateway.wait_slot_free()
