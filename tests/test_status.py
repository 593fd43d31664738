"""Task status: every request's lifecycle, pollable while it runs, in Redis
and in the embedded SQLite file alike (the same tests run on both)."""

import json
import os
import signal
import threading
import time

import openai
import pytest
import requests

from conftest import RedisServer, gateway_error, wait_until
from test_slot_and_cancel import CHAT, raw_request

DOCUMENT_FIELDS = {"version", "event_type", "event_id", "algorithm_id", "task_id", "state", "stage", "message",
                   "extensions", "timestamp"}
EXTENSION_FIELDS = {"method", "path", "stream", "model", "upstream_status", "prompt_tokens", "completion_tokens",
                    "ttft_ms", "duration_ms"}


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def waiting_gateway(request, start_gateway):
    """A gateway whose requests wait up to 5 s for the slot, on each store."""
    env = {"SLOT_WAIT_S": "5"}
    if request.param == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
    gateway = start_gateway(**env)
    gateway.store = request.param
    return gateway


def in_background(function, *args, **kwargs):
    result = {}

    def run():
        try:
            result["value"] = function(*args, **kwargs)
        except Exception as error:  # reported by the test that joins
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.result = result
    return thread


def test_lifecycle_pending_running_streaming_success(waiting_gateway, stub):
    gateway = waiting_gateway
    holder = raw_request(gateway, "/api/chat", dict(CHAT, stream=False), [("X-Stub", "delay=1.5")])
    assert wait_until(lambda: gateway.slots()[0]["state"] == "held", 5)
    waiting = in_background(gateway.post, "/api/chat", json=CHAT, timeout=20,
                            headers={"X-Task-Id": "demo-001", "X-Stub": "chunks=6,chunk_delay=0.4"})

    pending = gateway.wait_state("demo-001", {"PENDING"})
    assert (pending["stage"], pending["extensions"]["model"]) == ("queued", "llama3.2")

    gateway.wait_state("demo-001", {"RUNNING"}, timeout=5)
    streaming = gateway.wait_state("demo-001", {"RUNNING"}, timeout=5)
    while streaming["stage"] != "streaming":
        streaming = gateway.wait_state("demo-001", {"RUNNING"}, timeout=5)
    time.sleep(0.8)
    later = gateway.status("demo-001").json()
    assert later["state"] == "RUNNING"
    assert later["timestamp"] > streaming["timestamp"]  # the heartbeat refreshes it
    assert later["event_id"] != streaming["event_id"]

    waiting.join(10)
    assert waiting.result["value"].status_code == 200
    done = gateway.status("demo-001").json()  # final as soon as the client has the whole answer
    assert set(done) == DOCUMENT_FIELDS
    assert set(done["extensions"]) == EXTENSION_FIELDS
    assert (done["version"], done["event_type"], done["algorithm_id"]) == ("1.0", "task.status.update",
                                                                           "ollama-openai")
    assert (done["task_id"], done["state"], done["stage"]) == ("demo-001", "SUCCESS", "completed")
    ext = done["extensions"]
    assert (ext["method"], ext["path"], ext["stream"], ext["model"]) == ("POST", "/api/chat", True, "llama3.2")
    assert (ext["upstream_status"], ext["prompt_tokens"], ext["completion_tokens"]) == (200, 7, 6)
    assert 0 < ext["ttft_ms"] < ext["duration_ms"]
    assert ext["duration_ms"] > 2000  # 6 pieces 0.4 s apart
    assert abs(done["timestamp"] - time.time()) < 5
    holder.close()


def test_openai_usage_is_recorded_from_the_stream_and_the_body(any_store_gateway, stub):
    gateway = any_store_gateway
    gateway.post("/v1/chat/completions", headers={"X-Task-Id": "usage-sse", "X-Stub": "chunks=4"},
                 json=dict(CHAT, stream=True, stream_options={"include_usage": True}))
    gateway.post("/v1/chat/completions", headers={"X-Task-Id": "usage-json", "X-Stub": "chunks=5"}, json=CHAT)
    for task_id, completion in (("usage-sse", 4), ("usage-json", 5)):
        ext = gateway.status(task_id).json()["extensions"]
        assert (ext["prompt_tokens"], ext["completion_tokens"]) == (7, completion)


def test_a_client_that_leaves_after_the_end_marker_got_a_complete_answer(any_store_gateway, stub):
    """The OpenAI SDK closes its connection at data: [DONE]; an engine may
    end its chunked body a moment later. The answer was complete: SUCCESS."""
    gateway = any_store_gateway
    client = openai.OpenAI(base_url=gateway.url + "/v1/", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="llama3.2", messages=CHAT["messages"], stream=True,
                                            stream_options={"include_usage": True},
                                            extra_headers={"X-Task-Id": "done-then-gone", "X-Stub": "linger=2"})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello from the"
    document = gateway.wait_state("done-then-gone", {"SUCCESS", "FAILED"}, timeout=3)
    assert (document["state"], document["extensions"]["completion_tokens"]) == ("SUCCESS", 3)
    # and a stream cut before its end marker is still a client that went away
    sock = raw_request(gateway, "/api/chat", CHAT, [("X-Task-Id", "gone-early"),
                                                    ("X-Stub", "chunks=50,chunk_delay=0.05")])
    assert b"200 OK" in sock.recv(65536)
    time.sleep(0.3)
    sock.close()
    assert gateway.wait_state("gone-early", {"SUCCESS", "FAILED"})["stage"] == "cancelled"


@pytest.mark.parametrize("headers,body,stage", [
    ({"X-Stub": "chunks=5,reset_after=2,chunk_delay=0.05"}, CHAT, "upstream_error"),
    ({}, b'{"broken', "bad_request"),
    ({"X-Stub": "status=500"}, CHAT, "upstream_error"),
])
def test_failed_tasks_say_why(any_store_gateway, stub, headers, body, stage):
    gateway = any_store_gateway
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    gateway.post("/api/chat", headers=dict(headers, **{"X-Task-Id": "why-1"}), **kwargs)
    document = gateway.status("why-1").json()
    assert (document["state"], document["stage"]) == ("FAILED", stage)
    assert document["message"]


def test_refused_and_cancelled_tasks_say_why(any_store_gateway, stub):
    gateway = any_store_gateway
    holder = raw_request(gateway, "/api/chat", CHAT, [("X-Stub", "stall=30"), ("X-Task-Id", "goes-away")])
    assert wait_until(lambda: gateway.slots()[0]["state"] == "held", 5)
    gateway.post("/api/chat", json=CHAT, headers={"X-Task-Id": "refused-1"})
    refused = gateway.status("refused-1").json()
    assert (refused["state"], refused["stage"]) == ("FAILED", "gpu_busy")
    holder.close()
    gone = gateway.wait_state("goes-away", {"FAILED"}, timeout=2)
    assert gone["stage"] == "cancelled"


def test_timeouts_and_unreachable_upstreams_say_why(start_gateway, stub):
    slow = start_gateway(UPSTREAM_READ_TIMEOUT_S="0.3", WORKERS="1", UPSTREAM_BASE=stub.url)
    slow.post("/api/chat", json=CHAT, headers={"X-Task-Id": "slow-2", "X-Stub": "delay=2"})
    assert slow.status("slow-2").json()["stage"] == "timeout"
    down = start_gateway(UPSTREAM_BASE="http://127.0.0.1:9", WORKERS="1")
    down.post("/api/chat", json=CHAT, headers={"X-Task-Id": "down-2"})
    document = down.status("down-2").json()
    assert (document["state"], document["stage"]) == ("FAILED", "upstream_unreachable")


def test_unknown_task_is_404(any_store_gateway):
    answer = any_store_gateway.status("never-seen")
    assert answer.status_code == 404 and gateway_error(answer)["code"] == "not_found"
    assert any_store_gateway.get("/tasks/status/..%2F..%2Fetc").status_code == 404


def test_status_written_by_one_worker_is_read_by_the_other(any_store_gateway, stub):
    gateway = any_store_gateway
    ids = ["shared-%d" % n for n in range(12)]
    for task_id in ids:  # fresh connections: spread over both workers
        requests.get(gateway.url + "/api/tags", headers={"X-Task-Id": task_id, "Connection": "close"}, timeout=5)
    for task_id in ids:
        answer = requests.get(gateway.url + "/tasks/status/" + task_id, headers={"Connection": "close"}, timeout=5)
        assert answer.json()["state"] == "SUCCESS"


def test_redis_keys_and_ttls(redis_gateway, redis_server, stub):
    client = redis_server.client()
    sock = raw_request(redis_gateway, "/api/chat", CHAT, [("X-Task-Id", "ttl-1"), ("X-Stub", "stall=5")])
    redis_gateway.wait_state("ttl-1", {"RUNNING"})
    assert 3590 <= client.ttl("ts:ollama:ttl-1") <= 3600
    assert json.loads(client.get("ts:ollama:ttl-1"))["state"] == "RUNNING"
    sock.close()
    redis_gateway.wait_state("ttl-1", {"FAILED"})
    assert 86390 <= client.ttl("ts:ollama:ttl-1") <= 86400
    assert client.zscore("ts:ollama:_index", "ttl-1") is not None
    assert client.type("ts:ollama:_index") == b"zset"


# ---------------------------------------------------------------- list


def test_list_is_newest_first_with_limit_and_state(any_store_gateway, stub):
    gateway = any_store_gateway
    for task_id in ("list-a", "list-b", "list-c"):
        gateway.get("/api/tags", headers={"X-Task-Id": task_id})
        time.sleep(0.01)
    gateway.post("/api/chat", data=b"not json", headers={"X-Task-Id": "list-failed"})
    listed = gateway.get("/tasks/status?limit=3").json()
    assert [d["task_id"] for d in listed["items"]] == ["list-failed", "list-c", "list-b"]
    assert listed["count"] == 3
    succeeded = gateway.get("/tasks/status?limit=2&state=SUCCESS").json()
    assert [d["task_id"] for d in succeeded["items"]] == ["list-c", "list-b"]
    failed = gateway.get("/tasks/status?state=FAILED&limit=1000").json()
    assert failed["items"][0]["task_id"] == "list-failed"
    assert all(d["state"] == "FAILED" for d in failed["items"])
    assert gateway.get("/tasks/status").json()["count"] <= 50


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=abc", "state=DONE", "state=running"])
def test_list_refuses_bad_parameters(any_store_gateway, query):
    answer = any_store_gateway.get("/tasks/status?" + query)
    assert answer.status_code == 400 and gateway_error(answer)["code"] == "invalid_request"


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_finished_tasks_expire_after_ttl_done(start_gateway, stub, request, store):
    env = {"TTL_DONE": "1", "WORKERS": "1"}
    if store == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
        env["STATUS_PREFIX"] = "ts:short:"
    gateway = start_gateway(**env)
    gateway.get("/api/tags", headers={"X-Task-Id": "expiring-1"})
    assert gateway.status("expiring-1").status_code == 200
    assert wait_until(lambda: gateway.status("expiring-1").status_code == 404, 4, 0.2)
    assert "expiring-1" not in [d["task_id"] for d in gateway.get("/tasks/status?limit=1000").json()["items"]]


# ---------------------------------------------------------------- cancel and duplicates


def session_on_worker(gateway, pid):
    """A kept-alive connection served by worker ``pid``. Which worker
    accepts a new connection is a race, so the others are paused (SIGSTOP)
    for the moment it takes to connect: a stopped worker cannot accept."""
    others = [p for p in gateway.worker_pids() if p != pid]
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        session = requests.Session()
        assert session.get(gateway.url + "/healthz", timeout=5).json()["pid"] == pid
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)
    return session


def session_on_other_worker(gateway, pid):
    """A kept-alive connection served by a worker other than ``pid``."""
    return session_on_worker(gateway, next(p for p in gateway.worker_pids() if p != pid))


@pytest.mark.parametrize("where", ["other worker", "same worker"])
def test_delete_cancels_a_running_task_from_any_worker(any_store_gateway, stub, where):
    gateway = any_store_gateway
    client = requests.post(gateway.url + "/api/chat", json=CHAT, stream=True, timeout=10,
                           headers={"X-Task-Id": "cancel-me", "X-Stub": "stall=30"})
    [slot] = gateway.slots()
    holder_pid = slot["pid"]
    if where == "other worker":
        session = session_on_other_worker(gateway, holder_pid)
    else:
        session = session_on_worker(gateway, holder_pid)
    started = time.monotonic()
    answer = session.delete(gateway.url + "/tasks/cancel-me", timeout=5)
    assert answer.status_code == 200, answer.text
    assert (answer.json()["state"], answer.json()["stage"]) == ("FAILED", "cancelled")
    assert stub.wait_for(lambda: stub.requests_to("/api/chat")[0].hangup_at is not None, 1.0)
    assert stub.requests_to("/api/chat")[0].hangup_at - started < 1.0
    assert gateway.wait_slot_free(1.0)
    # the streaming client sees its stream end, with the reason
    lines = list(client.iter_lines())
    assert "cancelled" in json.loads(lines[-1])["error"]


def test_delete_cancels_a_pending_task(waiting_gateway, stub):
    gateway = waiting_gateway
    holder = raw_request(gateway, "/api/chat", CHAT, [("X-Stub", "stall=30")])
    assert wait_until(lambda: gateway.slots()[0]["state"] == "held", 5)
    waiting = in_background(gateway.post, "/api/chat", json=CHAT, headers={"X-Task-Id": "pending-x"}, timeout=10)
    gateway.wait_state("pending-x", {"PENDING"})
    answer = requests.delete(gateway.url + "/tasks/pending-x", timeout=5)
    assert answer.status_code == 200 and answer.json()["stage"] == "cancelled"
    waiting.join(5)
    assert gateway_error(waiting.result["value"])["code"] == "cancelled"
    assert stub.requests_to("/api/chat")[1:] == []  # it never went upstream
    holder.close()


def test_delete_unknown_is_404_and_finished_is_409(any_store_gateway, stub):
    gateway = any_store_gateway
    assert requests.delete(gateway.url + "/tasks/nobody", timeout=5).status_code == 404
    gateway.get("/api/tags", headers={"X-Task-Id": "finished-1"})
    answer = requests.delete(gateway.url + "/tasks/finished-1", timeout=5)
    assert answer.status_code == 409 and gateway_error(answer)["code"] == "task_finished"


def test_live_task_id_is_refused_and_finished_one_reused(any_store_gateway, stub):
    gateway = any_store_gateway
    sock = raw_request(gateway, "/api/chat", CHAT, [("X-Task-Id", "dup-1"), ("X-Stub", "stall=30")])
    gateway.wait_state("dup-1", {"RUNNING"})
    again = gateway.get("/api/tags", headers={"X-Task-Id": "dup-1"})
    assert again.status_code == 409
    assert gateway_error(again)["code"] == "task_id_in_use" and again.headers["X-Task-Id"] == "dup-1"
    assert gateway.status("dup-1").json()["state"] == "RUNNING"  # the refusal did not touch it
    sock.close()
    gateway.wait_state("dup-1", {"FAILED"})
    assert gateway.get("/api/tags", headers={"X-Task-Id": "dup-1"}).status_code == 200
    assert gateway.status("dup-1").json()["state"] == "SUCCESS"


# ---------------------------------------------------------------- the store never holds up inference


def test_redis_down_mid_run_does_not_hold_up_requests(start_gateway, stub):
    redis_server = RedisServer().start()
    gateway = start_gateway(REDIS_URL=redis_server.url, WORKERS="1")
    try:
        assert gateway.get("/api/tags", headers={"X-Task-Id": "before-down"}).status_code == 200
        redis_server.stop()
        for n in range(10):
            started = time.monotonic()
            answer = gateway.post("/api/chat", json=dict(CHAT, stream=False), headers={"X-Task-Id": "down-%d" % n})
            assert answer.status_code == 200
            assert time.monotonic() - started < 0.6
        status = gateway.status("before-down")
        assert status.status_code == 503
        assert (gateway_error(status)["code"], gateway_error(status)["provider"]) == ("store_unavailable", "redis")
        assert gateway.read_log().count("task store (redis) unavailable") == 1  # logged once, not per request

        redis_server.start()  # same port, empty
        assert wait_until(lambda: gateway.get("/api/tags", headers={"X-Task-Id": "after-up"}).status_code == 200
                          and gateway.status("after-up").status_code == 200, 10, 0.5)
        assert gateway.status("after-up").json()["state"] == "SUCCESS"
        assert "reachable again" in gateway.read_log()
    finally:
        redis_server.stop()


def test_redis_named_by_host_port_user_password_and_db(start_gateway, stub):
    redis_server = RedisServer("--requirepass", "s3cret", "--user", "edge", "on", ">edge-pass", "~*", "&*", "+@all")
    redis_server.password = "s3cret"
    redis_server.start()
    try:
        gateway = start_gateway(REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis_server.port), REDIS_USER="edge",
                                REDIS_PASSWORD="edge-pass", REDIS_DB="3", WORKERS="1")
        gateway.get("/api/tags", headers={"X-Task-Id": "by-host"})
        assert gateway.status("by-host").json()["state"] == "SUCCESS"
        stored = redis_server.client(db=3).get("ts:ollama:by-host")
        assert json.loads(stored)["task_id"] == "by-host"
        assert redis_server.client(db=0).get("ts:ollama:by-host") is None
    finally:
        redis_server.stop()


def test_a_hung_redis_costs_one_timeout_then_nothing(start_gateway, stub):
    """A Redis that accepts but never answers (here: stopped with SIGSTOP) is
    worse than one that is down: every call would wait for its timeout. The
    first request pays one short store timeout; then the cool-down spares
    the rest."""
    redis_server = RedisServer().start()
    gateway = start_gateway(REDIS_URL=redis_server.url, WORKERS="1")
    try:
        assert gateway.get("/api/tags").status_code == 200  # connections made
        redis_server.process.send_signal(signal.SIGSTOP)
        took = []
        for _ in range(8):
            started = time.monotonic()
            assert gateway.post("/api/chat", json=dict(CHAT, stream=False)).status_code == 200
            took.append(time.monotonic() - started)
        assert took[0] < 0.8, took  # the claim's 250 ms timeout (plus the final write's) at most
        assert max(took[1:]) < 0.1, took  # in the cool-down the store is not asked
        assert gateway_error(gateway.status("anything"))["code"] == "store_unavailable"
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
        redis_server.stop()


def test_status_writes_are_batched_not_per_chunk(redis_gateway, redis_server, stub):
    client = redis_server.client()
    client.config_resetstat()
    redis_gateway.post("/api/chat", json=dict(CHAT, stream=False), headers={"X-Task-Id": "cost-1"})
    stats = client.info("commandstats")
    # one claim (a script; EVALSHA, or EVAL the first time the server meets it) and one final write
    assert stats.get("cmdstat_evalsha", {}).get("calls", 0) + stats.get("cmdstat_eval", {}).get("calls", 0) in (1, 2)
    assert stats["cmdstat_set"]["calls"] in (2, 3)  # SET inside the script + final (+ one tick at most)

    client.config_resetstat()
    redis_gateway.post("/api/chat", json=CHAT, headers={"X-Task-Id": "cost-2", "X-Stub": "chunks=200,chunk_delay=0.01"})
    stats = client.info("commandstats")
    assert stub.requests_to("/api/chat")[-1].pieces_sent == 201
    assert stats["cmdstat_set"]["calls"] <= 12, stats  # heartbeats by time, never per chunk


def test_task_ids_never_name_the_stores_own_keys(redis_gateway, stub):
    """"index" and "cancels" are task ids like any other: asking for them
    reads no bookkeeping key, and the store stays up for everyone."""
    assert redis_gateway.status("index").status_code == 404
    assert redis_gateway.get("/tasks/status/cancels").status_code == 404
    assert requests.delete(redis_gateway.url + "/tasks/cancels", timeout=5).status_code == 404
    answer = redis_gateway.post("/api/chat", json=dict(CHAT, stream=False), headers={"X-Task-Id": "index"})
    assert answer.status_code == 200
    assert redis_gateway.wait_state("index", ["SUCCESS"])["task_id"] == "index"
    assert redis_gateway.get("/tasks/status?limit=5").status_code == 200


def test_a_key_of_the_wrong_type_is_a_404_for_its_id_never_an_outage(start_gateway, redis_server, stub):
    """The first release kept its bookkeeping at <prefix>index (a sorted set)
    and <prefix>cancels: on start they are moved aside, and any other key of
    the wrong type under the prefix is a 404 for that id and a log line; the
    store stays up for everyone."""
    prefix = "wrongtype-%d:" % os.getpid()
    client = redis_server.client()
    client.zadd(prefix + "index", {"old-task": 1.0})
    client.sadd(prefix + "cancels", "old-task")
    gateway = start_gateway(REDIS_URL=redis_server.url, STATUS_PREFIX=prefix, WORKERS="1")
    assert gateway.get("/api/tags", headers={"X-Task-Id": "ok-1"}).status_code == 200
    assert client.type(prefix + "index") == b"none" and client.type(prefix + "_first_release_index") == b"zset"
    assert client.type(prefix + "_first_release_cancels") == b"set"
    client.hset(prefix + "odd", "field", "value")  # another type, left by hand
    client.set(prefix + "text", "not a task document")
    for task_id in ("odd", "text", "index"):
        answer = gateway.status(task_id)
        assert answer.status_code == 404 and gateway_error(answer)["code"] == "not_found", answer.text
    assert gateway.status("ok-1").json()["state"] == "SUCCESS"  # at once: no cool-down began
    assert gateway.get("/tasks/status?limit=5").status_code == 200
    assert "odd is not a task document" in gateway.read_log()
    assert "unavailable" not in gateway.read_log()
    answer = gateway.post("/api/chat", json=dict(CHAT, stream=False), headers={"X-Task-Id": "odd"})
    assert answer.status_code == 200 and gateway.wait_state("odd", ["SUCCESS"])["task_id"] == "odd"
