"""README, "Batches": the OpenAI Batch API and Anthropic's Message Batches,
served by the gateway and run on the box's GPU, one item at a time, behind
every interactive request. Real SDKs over real sockets, against the stub."""

import io
import json
import os
import signal
import socket
import threading
import time

import anthropic
import openai
import pytest
import requests

from conftest import wait_until

MESSAGES = [{"role": "user", "content": "hi"}]


def jsonl(lines):
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()


def chat_lines(count, model="llama3.2"):
    return [{"custom_id": "req-%d" % n, "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": [{"role": "user", "content": "item %d" % n}]}}
            for n in range(count)]


def client_of(gateway, key="unused"):
    return openai.OpenAI(base_url=gateway.url + "/v1/", api_key=key, max_retries=0, timeout=20)


def submit(client, lines, endpoint="/v1/chat/completions", **extra):
    uploaded = client.files.create(file=("input.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h", **extra)


def wait_batch(client, batch_id, statuses=("completed", "failed", "expired", "cancelled"), timeout=30):
    seen = {}

    def ended():
        seen["batch"] = client.batches.retrieve(batch_id)
        return seen["batch"].status in statuses

    assert wait_until(ended, timeout, 0.1), seen.get("batch")
    return seen["batch"]


def output_lines(client, file_id):
    from openai.types.batch_request_counts import BatchRequestCounts  # noqa: F401  (the SDK's own types)
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def batch_gateway(start_gateway):
    return start_gateway(SLOT_WAIT_S="30", QUEUE_MAX="16")


@pytest.fixture
def gw(batch_gateway, stub):
    assert batch_gateway.wait_slot_free()
    return batch_gateway


def test_a_20_line_batch_completes_and_its_output_parses_with_the_sdk(gw, stub):
    client = client_of(gw)
    batch = submit(client, chat_lines(20), metadata={"job": "tickets"})
    assert batch.status == "validating" and batch.metadata == {"job": "tickets"}
    assert batch.request_counts.total == 20
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 20 and batch.request_counts.completed == 20
    assert batch.request_counts.failed == 0 and batch.error_file_id is None
    assert batch.completed_at >= batch.in_progress_at >= batch.created_at
    lines = output_lines(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in lines) == sorted("req-%d" % n for n in range(20))
    for line in lines:
        assert line["error"] is None and line["response"]["status_code"] == 200
        completion = openai.types.chat.ChatCompletion.model_validate(line["response"]["body"])
        assert completion.choices[0].message.content == "Hello from the"
    sent = sorted(r.json()["messages"][0]["content"] for r in stub.requests_to("/v1/chat/completions"))
    assert sent == sorted("item %d" % n for n in range(20))  # each item ran once
    # Each item is a task of its own, named by its request_id, and says which batch it belongs to.
    task = gw.status(lines[0]["response"]["request_id"]).json()
    assert task["state"] == "SUCCESS" and task["extensions"]["batch"] == batch.id
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert batch.id in [b.id for b in client.batches.list(limit=100)]


def test_bad_lines_land_in_the_error_file_and_the_others_run(gw, stub):
    client = client_of(gw)
    good = chat_lines(3)
    lines = [good[0], {"custom_id": "other-endpoint", "method": "POST", "url": "/v1/embeddings",
                       "body": {"model": "m", "input": "x"}},
             dict(good[1], custom_id="req-0"),  # a duplicate custom_id
             {"custom_id": "cloud", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-oss:120b-cloud", "messages": MESSAGES}},
             good[2]]
    body = jsonl(lines) + b"{this is not json\n"
    uploaded = client.files.create(file=("input.jsonl", io.BytesIO(body)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (6, 2, 4)
    assert sorted(line["custom_id"] for line in output_lines(client, batch.output_file_id)) == ["req-0", "req-2"]
    errors = {line["custom_id"]: line["error"] for line in output_lines(client, batch.error_file_id)}
    assert errors["other-endpoint"]["code"] == "invalid_url"
    assert errors["req-0"]["code"] == "duplicate_custom_id"
    assert errors["cloud"]["code"] == "cloud_model_disabled" and "ALLOW_OLLAMA_CLOUD" in errors["cloud"]["message"]
    assert errors[None]["code"] == "invalid_json"
    assert len(stub.requests_to("/v1/chat/completions")) == 2


def test_uploads_refused_whole_with_4xx_in_openais_shape(start_gateway, stub):
    gateway = start_gateway(BATCH_MAX_FILE_BYTES="4000", WORKERS="1")
    client = client_of(gateway)
    with pytest.raises(openai.BadRequestError, match="not JSONL"):
        client.files.create(file=("input.csv", io.BytesIO(b"a,b\n1,2\n")), purpose="batch")
    with pytest.raises(openai.APIStatusError) as too_big:
        client.files.create(file=("input.jsonl", io.BytesIO(jsonl(chat_lines(60)))), purpose="batch")
    assert too_big.value.status_code == 413 and "BATCH_MAX_FILE_BYTES" in too_big.value.message
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("input.jsonl", io.BytesIO(jsonl(chat_lines(1)))), purpose="fine-tune")
    answer = requests.post(gateway.url + "/v1/batches", json={"input_file_id": "file-nope",
                                                              "endpoint": "/v1/chat/completions"})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
    assert not [r for r in stub.received if "/files" in r.path or "/batches" in r.path]  # Ollama never sees them


def test_more_than_50000_lines_is_refused_at_upload(gw):
    client = client_of(gw)
    body = b'{"custom_id": "a"}\n' * 50001
    with pytest.raises(openai.BadRequestError, match="50000"):
        client.files.create(file=("input.jsonl", io.BytesIO(body)), purpose="batch")


def test_cancel_mid_batch_ends_cancelled_with_the_finished_lines_kept(gw, stub):
    stub.defaults = {"delay": "0.3"}
    client = client_of(gw)
    batch = submit(client, chat_lines(20))
    assert wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, 15, 0.05)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    batch = wait_batch(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    done = output_lines(client, batch.output_file_id)
    assert 2 <= len(done) < 20 and len(done) == batch.request_counts.completed
    ran = len(stub.requests_to("/v1/chat/completions"))
    assert ran == len(done)  # the item running at the cancel finished; no other started
    skipped = output_lines(client, batch.error_file_id) if batch.error_file_id else []
    assert skipped == []  # OpenAI's error file does not list the lines a cancel skipped
    time.sleep(1)
    assert len(stub.requests_to("/v1/chat/completions")) == ran


def test_an_interactive_request_during_a_batch_waits_for_one_item_at_most(gw, stub):
    stub.defaults = {"delay": "0.5"}  # batch items are slow; the interactive request asks for no delay
    client = client_of(gw)
    batch = submit(client, chat_lines(10))
    assert wait_until(lambda: any(s.get("batch") == batch.id for s in gw.slots()), 10, 0.02)
    waits = []
    for _ in range(2):
        started = time.monotonic()
        answer = gw.post("/v1/chat/completions", json={"model": "llama3.2", "messages": MESSAGES},
                         headers={"X-Stub": "delay=0"}, timeout=10)
        waits.append(time.monotonic() - started)
        assert answer.status_code == 200
        time.sleep(0.2)
    # An item holds the slot at most 0.5 s (its load call and its request: about 1 s at most).
    assert max(waits) < 1.3, waits
    assert client.batches.retrieve(batch.id).status == "in_progress"
    client.batches.cancel(batch.id)
    wait_batch(client, batch.id)


def test_batch_files_and_state_are_the_gateway_users_alone(gw, stub):
    """Prompts and answers on disk: 0600 files in 0700 directories; the
    runner's lock too (another user holding its flock would stop every batch)."""
    client = client_of(gw)
    batch = wait_batch(client, submit(client, chat_lines(2)).id)
    assert batch.status == "completed"
    state = os.path.join(gw.state_dir, "batch")
    modes = {os.path.relpath(os.path.join(root, name), gw.state_dir): os.stat(os.path.join(root, name)).st_mode & 0o777
             for root, dirs, files in os.walk(state) for name in dirs + files}
    modes["batch"] = os.stat(state).st_mode & 0o777
    modes["batches.sqlite3"] = os.stat(os.path.join(gw.state_dir, "batches.sqlite3")).st_mode & 0o777
    assert {name for name, mode in modes.items() if mode not in (0o600, 0o700)} == set(), modes
    assert modes["batch"] == modes[os.path.join("batch", "files")] == 0o700 and modes["batch/runner.lock"] == 0o600
    assert any(name.endswith(batch.output_file_id) for name in modes)


def test_slots_and_tasks_show_batch_items_and_metrics_count_them(gw, stub):
    stub.defaults = {"delay": "0.3"}
    client = client_of(gw)
    batch = submit(client, chat_lines(3))
    assert wait_until(lambda: any(s.get("batch") == batch.id for s in gw.slots()), 10, 0.02)
    running = [t for t in gw.get("/tasks/status?limit=20").json()["items"]
               if t["extensions"].get("batch") == batch.id]
    assert running
    wait_batch(client, batch.id)
    metrics = gw.get("/metrics").text
    assert 'edgegate_batch_items_total{endpoint="/v1/chat/completions",outcome="succeeded"}' in metrics
    assert 'edgegate_batches{status="completed"}' in metrics


def test_a_key_over_its_quota_has_its_batch_wait_for_midnight_not_fail(start_gateway, tmp_path, stub):
    """Items count toward the key's daily quota; once it is used up the rest
    of the batch waits (in_progress, nothing failed) instead of filling the
    error file with 429s, and a cancel still ends it at once."""
    keys = tmp_path / "keys"
    keys.write_text("sk-carol carol tokens_per_day=1\n")
    gateway = start_gateway(GATEWAY_API_KEYS="@" + str(keys), SLOT_WAIT_S="30", WORKERS="1")
    carol = client_of(gateway, "sk-carol")
    batch = submit(carol, chat_lines(4))
    assert wait_until(lambda: carol.batches.retrieve(batch.id).request_counts.completed >= 1, 10, 0.1)
    time.sleep(2)  # the runner would have run (or failed) the other three by now
    seen = carol.batches.retrieve(batch.id)
    assert seen.status == "in_progress" and seen.request_counts.failed == 0, seen
    assert seen.request_counts.completed == 1  # the first item took the day's one token and more
    assert "over its daily quota; its batches wait until midnight UTC" in gateway.read_log()
    carol.batches.cancel(batch.id)
    ended = wait_batch(carol, batch.id)
    assert ended.status == "cancelled" and ended.request_counts.completed == 1
    assert len(output_lines(carol, ended.output_file_id)) == 1


def test_keys_own_their_files_and_batches(start_gateway, tmp_path, stub):
    keys = tmp_path / "keys"
    keys.write_text("sk-alice alice\nsk-bob bob\nsk-root root admin\n")
    gateway = start_gateway(GATEWAY_API_KEYS="@" + str(keys), SLOT_WAIT_S="30", WORKERS="1")
    alice, bob, root = (client_of(gateway, k) for k in ("sk-alice", "sk-bob", "sk-root"))
    stub.defaults = {"delay": "0.3"}
    batch = submit(alice, chat_lines(2))
    as_root, as_bob = ({"Authorization": "Bearer " + k} for k in ("sk-root", "sk-bob"))
    assert wait_until(lambda: gateway.get("/slots", headers=as_root).json()["slots"][0].get("batch") == batch.id,
                      10, 0.02)
    assert batch.id not in gateway.get("/slots", headers=as_bob).text  # held by a batch item, but whose is not said
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(batch.input_file_id)
    assert batch.id not in [b.id for b in bob.batches.list()]
    batch = wait_batch(root, batch.id)
    assert batch.status == "completed"
    line = output_lines(root, batch.output_file_id)[0]
    task = gateway.get("/tasks/status/" + line["response"]["request_id"],
                       headers={"Authorization": "Bearer sk-alice"}).json()
    assert task["extensions"]["key"] == "alice" and task["extensions"]["batch"] == batch.id
    today = gateway.get("/usage", headers={"Authorization": "Bearer sk-alice"}).json()["days"]["today"]
    assert sum(figures["requests"] for figures in today["alice"].values()) == 2  # its items count as her requests


# ---------------------------------------------------------------- Anthropic's Message Batches


def test_anthropic_message_batch_runs_and_its_results_parse_with_the_sdk(gw, stub):
    client = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    requests_ = [{"custom_id": "q%d" % n, "params": {"model": "llama3.2", "max_tokens": 20,
                                                     "messages": [{"role": "user", "content": "item %d" % n}]}}
                 for n in range(5)] + [{"custom_id": "bad id!", "params": {"model": "llama3.2", "max_tokens": 5,
                                                                          "messages": MESSAGES}}]
    batch = client.messages.batches.create(requests=requests_)
    assert batch.processing_status == "in_progress" and batch.request_counts.processing == 6
    assert wait_until(lambda: client.messages.batches.retrieve(batch.id).processing_status == "ended", 30, 0.1)
    batch = client.messages.batches.retrieve(batch.id)
    assert batch.request_counts.succeeded == 5 and batch.request_counts.errored == 1
    assert batch.results_url.endswith("/v1/messages/batches/%s/results" % batch.id)
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert sorted(results) == ["bad id!", "q0", "q1", "q2", "q3", "q4"]
    assert results["q0"].type == "succeeded" and results["q0"].message.content[0].text
    assert results["bad id!"].type == "errored" and "custom_id" in results["bad id!"].error.error.message
    assert batch.id in [b.id for b in client.messages.batches.list()]
    assert client.messages.batches.delete(batch.id).type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)


def test_anthropic_cancel_gives_canceled_results_for_the_rest(gw, stub):
    stub.defaults = {"delay": "0.3"}
    client = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    batch = client.messages.batches.create(requests=[
        {"custom_id": "q%d" % n, "params": {"model": "llama3.2", "max_tokens": 5, "messages": MESSAGES}}
        for n in range(10)])
    assert wait_until(lambda: client.messages.batches.retrieve(batch.id).request_counts.succeeded >= 1, 15, 0.05)
    assert client.messages.batches.cancel(batch.id).processing_status in ("canceling", "ended")
    assert wait_until(lambda: client.messages.batches.retrieve(batch.id).processing_status == "ended", 15, 0.1)
    results = list(client.messages.batches.results(batch.id))
    kinds = [r.result.type for r in results]
    assert len(results) == 10 and "canceled" in kinds and "succeeded" in kinds
    with pytest.raises(anthropic.NotFoundError):
        anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0).messages.batches.retrieve("msgbatch_nope")
    error = gw.get("/v1/messages/batches/msgbatch_nope").json()  # Anthropic's error shape on Anthropic's routes
    assert error["type"] == "error" and error["error"]["type"] == "not_found_error", error


# ---------------------------------------------------------------- nothing lost


def custom_ids_once(client, batch):
    ids = [line["custom_id"] for line in output_lines(client, batch.output_file_id)]
    assert sorted(ids) == sorted("req-%d" % n for n in range(len(ids))) and len(ids) == len(set(ids))
    return ids


def test_a_killed_worker_mid_item_loses_nothing_and_runs_nothing_twice_to_completion(gw, stub):
    stub.defaults = {"delay": "0.4"}
    client = client_of(gw)
    batch = submit(client, chat_lines(8))
    assert wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, 15, 0.05)
    holder = next(s for s in gw.slots() if s.get("batch") == batch.id) if wait_until(
        lambda: any(s.get("batch") == batch.id for s in gw.slots()), 5, 0.01) else None
    assert holder, "no batch item held the slot"
    os.kill(holder["pid"], signal.SIGKILL)  # the worker that runs the item dies mid-item
    client = openai.OpenAI(base_url=gw.url + "/v1/", api_key="x", max_retries=3)  # its pooled connections died too
    batch = wait_batch(client, batch.id, timeout=40)
    assert batch.status == "completed" and batch.request_counts.completed == 8
    assert len(custom_ids_once(client, batch)) == 8
    assert wait_until(lambda: len(gw.worker_pids()) == 2, 10)


def test_a_stop_and_start_on_the_same_state_dir_finishes_the_batch(start_gateway, stub):
    stub.defaults = {"delay": "0.3"}
    first = start_gateway(SLOT_WAIT_S="30", WORKERS="1")
    client = client_of(first)
    batch = submit(client, chat_lines(6))
    assert wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, 15, 0.05)
    first.stop()
    second = start_gateway(SLOT_WAIT_S="30", WORKERS="1", STATE_DIR=first.state_dir)
    client = client_of(second)
    batch = wait_batch(client, batch.id, timeout=40)
    assert batch.status == "completed" and len(custom_ids_once(client, batch)) == 6


def test_a_gunicorn_reload_mid_batch_finishes_it(gw, stub):
    stub.defaults = {"delay": "0.3"}
    client = client_of(gw)
    batch = submit(client, chat_lines(6))
    assert wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, 15, 0.05)
    gw.process.send_signal(signal.SIGHUP)
    batch = wait_batch(client, batch.id, timeout=60)
    assert batch.status == "completed" and len(custom_ids_once(client, batch)) == 6


def test_a_batch_past_its_window_expires_and_keeps_what_finished(gw, stub):
    stub.defaults = {"delay": "0.4"}
    client = client_of(gw)
    uploaded = client.files.create(file=("input.jsonl", io.BytesIO(jsonl(chat_lines(20)))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="4s")
    batch = wait_batch(client, batch.id, timeout=20)
    assert batch.status == "expired" and batch.expired_at is not None
    done = output_lines(client, batch.output_file_id)
    expired = output_lines(client, batch.error_file_id)
    assert len(done) + len(expired) == 20 and done and expired
    assert {line["error"]["code"] for line in expired} == {"batch_expired"}


# ---------------------------------------------------------------- interactive first, fair between keys


def test_a_waiting_batch_item_lets_a_later_interactive_request_go_first(gw, stub):
    """The slot is held by an interactive request; a batch item waits in
    line; an interactive request that comes after it is served before it."""
    client = client_of(gw)
    holder = threading.Thread(target=lambda: gw.post(
        "/v1/chat/completions", json={"model": "llama3.2", "messages": [{"role": "user", "content": "first"}]},
        headers={"X-Stub": "delay=1"}, timeout=10))
    holder.start()
    assert wait_until(lambda: gw.slots()[0]["state"] == "held", 5, 0.01)
    batch = submit(client, chat_lines(2))
    assert wait_until(lambda: any(w.get("batch") == batch.id for w in gw.get("/slots").json()["queue"]), 5, 0.01)
    later = gw.post("/v1/chat/completions", json={"model": "llama3.2",
                                                  "messages": [{"role": "user", "content": "later"}]}, timeout=10)
    assert later.status_code == 200
    holder.join()
    wait_batch(client, batch.id)
    order = [r.json()["messages"][0]["content"] for r in stub.requests_to("/v1/chat/completions")]
    assert order[:2] == ["first", "later"] and sorted(order[2:]) == ["item 0", "item 1"], order


def test_batches_of_two_keys_take_turns(start_gateway, tmp_path, stub):
    keys = tmp_path / "keys"
    keys.write_text("sk-alice alice\nsk-bob bob\n")
    gateway = start_gateway(GATEWAY_API_KEYS="@" + str(keys), SLOT_WAIT_S="30", WORKERS="1")
    stub.defaults = {"delay": "0.2"}
    alice, bob = client_of(gateway, "sk-alice"), client_of(gateway, "sk-bob")
    first = submit(alice, [dict(line, body=dict(line["body"], messages=[{"role": "user", "content": "alice"}]))
                           for line in chat_lines(6)])
    second = submit(bob, [dict(line, body=dict(line["body"], messages=[{"role": "user", "content": "bob"}]))
                          for line in chat_lines(3)])
    wait_batch(alice, first.id)
    wait_batch(bob, second.id)
    order = [r.json()["messages"][0]["content"] for r in stub.requests_to("/v1/chat/completions")]
    # bob's three come in turns with alice's, not after all six of hers
    assert order.index("bob") <= 2 and len(order) - 1 - order[::-1].index("bob") <= 6, order


# ---------------------------------------------------------------- the other store, and memory


def test_two_boxes_on_one_redis_each_run_their_own_batches(start_gateway, redis_server, stub):
    """The batches' state is in the shared Redis, their files on each box's
    disk: each box runs, lists and answers for its own batches only (the
    other box never picks one up and fails it for a missing file)."""
    one, two = (start_gateway(REDIS_URL=redis_server.url, SLOT_WAIT_S="30", WORKERS="1") for _ in range(2))
    first, second = client_of(one), client_of(two)
    made_on_one = submit(first, chat_lines(4))
    made_on_two = submit(second, chat_lines(3))
    batch = wait_batch(first, made_on_one.id)
    assert batch.status == "completed" and len(custom_ids_once(first, batch)) == 4
    assert wait_batch(second, made_on_two.id).status == "completed"
    assert [b.id for b in first.batches.list()] == [made_on_one.id]
    with pytest.raises(openai.NotFoundError):
        second.batches.retrieve(made_on_one.id)
    boxes = {open(os.path.join(g.state_dir, "batch", "box-id")).read() for g in (one, two)}
    keys = {k.decode() for k in redis_server.client().keys("ts:ollama:_*:batch*")}
    assert len(boxes) == 2 and {k.split(":")[2] for k in keys} == {"_" + box for box in boxes}
    assert any(k.endswith(":batch:" + batch.id) for k in keys) and any(k.endswith(":batch_out:" + batch.id)
                                                                         for k in keys)


class LazyBody:
    """A request body made as it is read (``wsgi.input``), never whole in memory."""

    def __init__(self, head, line, count, tail):
        self.parts = [head] + [line] * count + [tail]
        self.pending = b""

    def read(self, size=-1):
        while len(self.pending) < size and self.parts:
            self.pending += b"".join(self.parts[:2000])
            del self.parts[:2000]
        piece, self.pending = self.pending[:size], self.pending[size:]
        return piece


def test_an_upload_streams_to_disk_without_being_held_in_memory(tmp_path):
    import tracemalloc
    from edgegate_batch import BatchFiles, read_upload
    request = chat_lines(1)[0]
    request["body"]["messages"][0]["content"] = "x" * 1400
    line = json.dumps(request).encode() + b"\n"
    count = 60 * 1000 * 1000 // len(line)  # 60 MB in 40,000 lines
    head = (b'--XyZ\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            b'Content-Type: application/jsonl\r\n\r\n')
    environ = {"CONTENT_TYPE": "multipart/form-data; boundary=XyZ",
               "wsgi.input": LazyBody(head, line, count, b"\r\n--XyZ--\r\n")}
    tracemalloc.start()
    purpose, filename, written, lines = read_upload(environ, BatchFiles(str(tmp_path)), 200 * 1000 * 1000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (purpose, filename, lines) == ("batch", "big.jsonl", count)
    assert os.path.getsize(written) == len(line) * count
    assert peak < 8 * 1024 * 1024, peak  # pieces, never the 60 MB


def test_a_batch_upload_may_be_larger_than_max_body_bytes(start_gateway):
    gateway = start_gateway(MAX_BODY_BYTES="1000000", WORKERS="1")
    line = json.dumps(chat_lines(1)[0]).encode() + b"\n"
    body = line * (3 * 1000 * 1000 // len(line))
    uploaded = client_of(gateway).files.create(file=("big.jsonl", body), purpose="batch")
    assert uploaded.bytes == len(body)
    with open(os.path.join(gateway.state_dir, "batch", "files", uploaded.id), "rb") as f:
        assert f.read() == body
    answer = gateway.post("/v1/chat/completions", data=b"x" * 1000001)  # other routes keep MAX_BODY_BYTES
    assert answer.status_code == 413


@pytest.fixture(params=["sqlite", "redis"])
def batch_store(request, tmp_path):
    from edgegate_batch import RedisBatchStore, SqliteBatchStore
    if request.param == "sqlite":
        return SqliteBatchStore(str(tmp_path / "batches.sqlite3"))
    server = request.getfixturevalue("redis_server")
    prefix = "test:%s:" % os.urandom(4).hex()
    return RedisBatchStore(server.client(), prefix, "box1")


def test_both_batch_stores_keep_an_outcome_once_and_the_counts_with_it(batch_store):
    batch = {"id": "batch_x", "created_at": 100, "status": "in_progress", "counts": {"succeeded": 1}}
    batch_store.save(batch)
    assert batch_store.record(dict(batch, counts={"succeeded": 1}), 3, '{"first": true}')
    assert not batch_store.record(dict(batch, counts={"succeeded": 2}), 3, '{"second": true}')
    assert batch_store.outcomes("batch_x") == {3: '{"first": true}'}
    assert batch_store.load("batch_x")["counts"] == {"succeeded": 1}  # the second record changed nothing
    batch_store.save(dict(batch, id="batch_y", created_at=200))
    assert [b["id"] for b in batch_store.all()] == ["batch_y", "batch_x"]
    assert batch_store.cancel_asked("batch_x") is None
    batch_store.ask_cancel("batch_x", 5.0)
    batch_store.ask_cancel("batch_x", 9.0)
    assert batch_store.cancel_asked("batch_x") == 5.0  # the first time counts
    batch_store.forget("batch_x")
    assert batch_store.load("batch_x") is None and batch_store.outcomes("batch_x") == {}
    assert [b["id"] for b in batch_store.all()] == ["batch_y"]


def test_an_upload_just_over_the_limit_gets_413_not_a_dropped_connection(start_gateway):
    gateway = start_gateway(BATCH_MAX_FILE_BYTES="100000", MAX_BODY_BYTES="50000", WORKERS="1")
    line = json.dumps(chat_lines(1)[0]).encode() + b"\n"
    for size in (100000 + 10000, 100000 + 200000):  # within the form's margin, and far over
        with pytest.raises(openai.APIStatusError) as refused:
            client_of(gateway).files.create(file=("big.jsonl", line * (size // len(line))), purpose="batch")
        assert refused.value.status_code == 413 and "BATCH_MAX_FILE_BYTES" in refused.value.message


def test_a_client_that_stops_reading_a_download_does_not_hold_a_thread_nor_the_body_budget(start_gateway, stub):
    """A file download by a client that never reads: its thread is freed
    after CLIENT_SEND_TIMEOUT_S (the worker's one thread answers /healthz
    again), and a stray Content-Encoding on it holds no body budget
    meanwhile (a large chat is still served)."""
    gateway = start_gateway(WORKERS="1", THREADS="2", CLIENT_SEND_TIMEOUT_S="1", BODY_MEMORY_BYTES="2000000",
                            BODY_WAIT_S="1", SLOT_WAIT_S="30")
    client = client_of(gateway)
    line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "llama3.2", "messages": [{"role": "user", "content": "y" * 2000}]}}
    uploaded = client.files.create(file=("big.jsonl", io.BytesIO(jsonl([dict(line, custom_id="c%d" % n)
                                                                         for n in range(4000)]))), purpose="batch")
    sleepers = []
    for _ in range(2):  # both threads
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gateway.port))
        sock.sendall(("GET /v1/files/%s/content HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n\r\n"
                      % uploaded.id).encode())
        sleepers.append(sock)
    try:
        time.sleep(0.5)  # both downloads are being written, to clients that read nothing
        large = dict(line["body"], messages=[{"role": "user", "content": "z" * 300000}], stream=False)
        started = time.monotonic()
        answer = requests.post(gateway.url + "/v1/chat/completions", json=large, timeout=15)
        assert answer.status_code == 200, answer.text  # neither download holds the budget, and a thread came free
        assert time.monotonic() - started < 4  # CLIENT_SEND_TIMEOUT_S, not as long as the sleepers stay
        assert requests.get(gateway.url + "/healthz", timeout=5).status_code == 200
    finally:
        for sock in sleepers:
            sock.close()
