"""What one key can see of another, and who may write the GPU line (issue 21,
items 14-16; README, "Keys and their tasks", "Metrics", "Sharing the GPU
slot"): /metrics is for an admin key or a metrics key, /slots does not tell a
key which models other keys loaded, and the lock and queue directories are
the gateway user's alone, with a ticket that does not parse ignored and
removed."""

import fcntl
import os
import shutil
import stat

import pytest
import requests

from conftest import GatewayProcess, gateway_error, wait_until
from stub_upstream import StubServer

ALICE, BOB, ROOT, SCRAPER = "sk-alice", "sk-bob", "sk-root", "sk-prometheus"
KEYS = "%s alice\n%s bob\n%s root admin\n%s prometheus metrics\n" % (ALICE, BOB, ROOT, SCRAPER)
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def as_key(key):
    return {"Authorization": "Bearer " + key}


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text(KEYS)
    return path


@pytest.fixture(scope="module")
def keyed(start_gateway, key_file):
    return start_gateway(GATEWAY_API_KEYS="@%s" % key_file, WORKERS="1")


def test_metrics_is_for_an_admin_or_a_metrics_key_only(keyed, stub):
    assert keyed.post("/api/chat", json=CHAT, headers=as_key(ALICE)).status_code == 200
    answer = keyed.get("/metrics", headers=as_key(BOB))
    assert answer.status_code == 403 and gateway_error(answer)["code"] == "forbidden"
    assert "alice" not in answer.text
    for key in (ROOT, SCRAPER):
        shown = keyed.get("/metrics", headers=as_key(key))
        assert shown.status_code == 200 and 'key="alice"' in shown.text


def test_a_metrics_key_reads_metrics_and_nothing_else(keyed, stub):
    for method, path in (("POST", "/api/chat"), ("GET", "/api/tags"), ("GET", "/slots"),
                         ("GET", "/tasks/status?limit=5"), ("GET", "/usage"), ("GET", "/ui/state"),
                         ("GET", "/v1/batches"), ("GET", "/v1/messages/batches"), ("GET", "/v1/files")):
        answer = requests.request(method, keyed.url + path, json=CHAT, headers=as_key(SCRAPER), timeout=5)
        body = answer.json()
        code = body["error"]["code"] if body.get("type") == "error" else gateway_error(answer)["code"]  # Anthropic's
        assert answer.status_code == 403 and code == "forbidden", (path, answer.text)
    assert keyed.get("/readyz", headers=as_key(SCRAPER)).status_code == 200
    assert stub.received == [] or all(r.path == "/api/version" for r in stub.received)


def test_with_several_gpus_a_key_does_not_see_the_models_others_loaded(start_gateway, key_file, stub):
    gpus = [StubServer().start(), StubServer().start()]
    try:
        gateway = start_gateway(GATEWAY_API_KEYS="@%s" % key_file, WORKERS="1",
                                UPSTREAM_BASE="%s,%s" % (gpus[0].url, gpus[1].url))
        secret = dict(CHAT, model="alices-secret-project:7b")
        assert gateway.post("/api/chat", json=secret, headers=as_key(ALICE)).status_code == 200
        seen_by_bob = gateway.get("/slots", headers=as_key(BOB))
        assert seen_by_bob.status_code == 200
        assert "alices-secret-project" not in seen_by_bob.text, seen_by_bob.text
        assert all("loaded" not in slot for slot in seen_by_bob.json()["slots"])
        seen_by_root = gateway.get("/slots", headers=as_key(ROOT)).json()
        assert any("alices-secret-project:7b" in slot["loaded"] for slot in seen_by_root["slots"])
    finally:
        for gpu in gpus:
            gpu.stop()


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_lock_and_queue_directories_are_the_gateway_users_alone(stub_server, stub):
    process = GatewayProcess({"UPSTREAM_BASE": stub_server.url, "WORKERS": "1", "SLOT_WAIT_S": "5"})
    locks = os.path.join(process.state_dir, "locks")
    os.makedirs(os.path.join(locks, "queue"), mode=0o755)  # as the first release left them
    os.chmod(locks, 0o755)
    os.chmod(os.path.join(locks, "queue"), 0o777)
    process.start()
    try:
        assert (mode(locks), mode(os.path.join(locks, "queue"))) == (0o700, 0o700)
        assert process.post("/api/chat", json=CHAT).status_code == 200
        assert mode(os.path.join(locks, "slot-0.lock")) == 0o600
    finally:
        process.stop()
        shutil.rmtree(process.state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def line_gateway(start_gateway):
    return start_gateway(WORKERS="1", SLOT_WAIT_S="3")


@pytest.mark.parametrize("content,owner,logged", [
    (b"\x00not a ticket", None, "does not parse"),
    (b'{"task_id": "first", "key": "mallory"}', 65534, "did not write"),  # another user's file
])
def test_a_ticket_this_gateway_did_not_write_is_removed_never_waited_behind(line_gateway, stub, content, owner,
                                                                             logged):
    if owner is not None and os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    queue = os.path.join(line_gateway.state_dir, "locks", "queue")
    planted = os.path.join(queue, "%020d.ticket" % 1)  # sorts before any real ticket
    fd = os.open(planted, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, content)
        if owner is not None:
            os.fchown(fd, owner, owner)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held: it would count as a live waiter
        answer = line_gateway.post("/api/chat", json=CHAT, timeout=10)
        assert answer.status_code == 200, answer.text  # served at once, not 503 after SLOT_WAIT_S
        assert not os.path.exists(planted)
        assert wait_until(lambda: logged in line_gateway.read_log(), 3)
    finally:
        os.close(fd)
