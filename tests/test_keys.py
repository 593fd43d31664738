"""Tasks belong to the API key that made them: keys have names and roles
(GATEWAY_API_KEYS=@file, lines ``KEY NAME [admin]``). A key sees, lists and
cancels only its own tasks; another key's task is 404; ids are per key. An
admin key sees and cancels everything, and alone may use management routes.
Key names, never keys, appear in documents, the access log and metrics."""

import hashlib
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import gateway_error, wait_until
from test_slot_and_cancel import CHAT, raw_request

ALICE, BOB, ROOT = "sk-alice-secret", "sk-bob-secret", "sk-root-secret"


@pytest.fixture(scope="module")
def keyed(start_gateway, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text("# key name [admin]\n%s alice\n%s bob\n%s root admin\nsk-bare-secret\n" % (ALICE, BOB, ROOT))
    return start_gateway(GATEWAY_API_KEYS="@%s" % key_file, ALLOW_MANAGEMENT="1", GPU_SLOTS="2")


@pytest.fixture
def gw(keyed, stub):
    assert wait_until(lambda: all(s["state"] == "free" for s in keyed.get("/slots", headers=as_key(ROOT)).json()["slots"]),
                      5), "a previous test left a slot held"
    return keyed


def as_key(key):
    return {"Authorization": "Bearer " + key}


def test_another_keys_task_is_not_found_and_not_listed(gw, stub):
    answer = gw.post("/api/chat", json=dict(CHAT, stream=False), headers=dict(as_key(ALICE), **{"X-Task-Id": "mine"}))
    assert answer.status_code == 200
    own = gw.get("/tasks/status/mine", headers=as_key(ALICE))
    assert own.status_code == 200 and own.json()["extensions"]["key"] == "alice"
    other = gw.get("/tasks/status/mine", headers=as_key(BOB))
    assert other.status_code == 404 and gateway_error(other)["code"] == "not_found"
    assert "mine" not in [d["task_id"] for d in gw.get("/tasks/status?limit=1000", headers=as_key(BOB)).json()["items"]]
    assert requests.delete(gw.url + "/tasks/mine", headers=as_key(BOB), timeout=5).status_code == 404
    assert gw.get("/tasks/status/alice/mine", headers=as_key(BOB)).status_code == 404  # only an admin may name the key


def test_ids_are_per_key_so_another_key_cannot_overwrite_a_task(gw, stub):
    holder = raw_request(gw, "/api/chat", CHAT, [("X-Task-Id", "job-1"), ("Authorization", "Bearer " + ALICE),
                                                 ("X-Stub", "stall=30")])
    assert wait_until(lambda: gw.get("/tasks/status/job-1", headers=as_key(ALICE)).json().get("state") == "RUNNING", 5)
    answer = gw.post("/api/chat", json=dict(CHAT, stream=False), headers=dict(as_key(BOB), **{"X-Task-Id": "job-1"}))
    assert answer.status_code == 200  # not 409: Bob's job-1 is his own
    assert gw.get("/tasks/status/job-1", headers=as_key(BOB)).json()["state"] == "SUCCESS"
    alices = gw.get("/tasks/status/job-1", headers=as_key(ALICE)).json()
    assert (alices["state"], alices["extensions"]["key"]) == ("RUNNING", "alice")
    again = gw.post("/api/chat", json=CHAT, headers=dict(as_key(ALICE), **{"X-Task-Id": "job-1"}))
    assert again.status_code == 409  # Alice's own live id
    # the admin sees both, and cancels Alice's
    listed = gw.get("/tasks/status?limit=1000", headers=as_key(ROOT)).json()["items"]
    assert {("job-1", "alice"), ("job-1", "bob")} <= {(d["task_id"], d["extensions"].get("key")) for d in listed}
    cancelled = requests.delete(gw.url + "/tasks/alice/job-1", headers=as_key(ROOT), timeout=5)
    assert cancelled.status_code == 200 and cancelled.json()["stage"] == "cancelled"
    holder.close()


def test_only_an_admin_key_may_use_management_routes(gw, stub):
    refused = gw.post("/api/pull", json={"model": "x"}, headers=as_key(ALICE))
    assert refused.status_code == 403 and "admin" in gateway_error(refused)["message"]
    assert stub.received == []
    assert gw.post("/api/pull", json={"model": "x"}, headers=as_key(ROOT)).status_code == 200
    assert [r.path for r in stub.received] == ["/api/pull"]


def test_key_names_never_keys_in_documents_log_and_metrics(gw, stub):
    bare = "key-" + hashlib.sha256(b"sk-bare-secret").hexdigest()[:8]
    gw.post("/api/chat", json=dict(CHAT, stream=False), headers=dict(as_key("sk-bare-secret"), **{"X-Task-Id": "bare"}))
    document = gw.get("/tasks/status/bare", headers=as_key("sk-bare-secret")).json()
    assert document["extensions"]["key"] == bare
    assert wait_until(lambda: "task=bare " in gw.read_log(), 3)
    line = next(line for line in gw.read_log().splitlines() if "task=bare " in line)
    assert line.endswith("key=" + bare)
    text = gw.get("/metrics", headers=as_key(ROOT)).text
    keys = {s.labels["key"] for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "edgegate_requests_total"}
    assert bare in keys
    for secret in (ALICE, BOB, ROOT, "sk-bare-secret"):
        assert secret not in gw.read_log() and secret not in text and secret not in str(document)


def test_a_cancel_that_races_the_slot_hand_off_ends_the_task_cleanly(start_gateway, stub):
    """A waiting task cancelled just as the slot frees: whatever the timing,
    FAILED/cancelled at once, and its client gets a clean 503."""
    gateway = start_gateway(SLOT_WAIT_S="10", WORKERS="1")
    for attempt in range(12):
        holder = raw_request(gateway, "/api/chat", CHAT, [("X-Stub", "stall=30")])
        assert wait_until(lambda: gateway.slots()[0]["state"] == "held", 5)
        task_id = "race-%d" % attempt
        result = {}
        waiter = threading.Thread(target=lambda: result.update(answer=gateway.post(
            "/api/chat", json=dict(CHAT, stream=False), headers={"X-Task-Id": task_id, "X-Stub": "delay=2"},
            timeout=15)))
        waiter.start()
        gateway.wait_state(task_id, ["PENDING"])
        holder.close()  # the slot frees...
        time.sleep(attempt * 0.004)  # ...and the DELETE lands a little later each time
        cancel = requests.delete(gateway.url + "/tasks/" + task_id, timeout=5)
        waiter.join(15)
        assert cancel.status_code in (200, 409), cancel.text
        answer = result["answer"]
        if cancel.status_code == 200:
            assert answer.status_code == 503 and gateway_error(answer)["code"] == "cancelled", answer.text
            document = gateway.status(task_id).json()
            assert (document["state"], document["stage"]) == ("FAILED", "cancelled")
        else:  # it had already finished: then it succeeded
            assert answer.status_code == 200
        assert gateway.wait_slot_free(2)
