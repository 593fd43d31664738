"""A GPU slot is owned from the moment it is taken: whatever fails on the
way from the flock to the request that holds it, the slot is freed and the
next request is served (README, "Reading the code")."""

import os

import pytest

from conftest import REPO, wait_until
from test_queue import Waiter, hold_slot

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


@pytest.fixture(scope="module")
def failing_line_gateway(start_gateway):
    """Two workers that wait in line, whose line cannot wake anyone nor
    remove a served waiter's ticket (tests/failing_line.conf.py)."""
    return start_gateway(conf=os.path.join(REPO, "tests", "failing_line.conf.py"), SLOT_WAIT_S="20")


def test_a_waiter_served_while_the_line_fails_frees_the_slot_and_the_next_is_served(failing_line_gateway, stub):
    gateway = failing_line_gateway
    holder = hold_slot(gateway, "holder-1")
    waiter = Waiter(gateway, "waiter-1")
    waiter.start()
    assert wait_until(lambda: gateway.status("waiter-1").json().get("state") == "PENDING", 5)
    holder.close()  # the slot is freed; the wake fails, the waiter finds it on its own look
    waiter.join(15)
    assert waiter.answer is not None and waiter.answer.status_code == 200, waiter.answer
    assert gateway.wait_slot_free(5), gateway.slots()  # served, its ticket's tear-down failed: the slot is free
    after = gateway.post("/api/chat", json=CHAT, headers={"X-Task-Id": "after-1"}, timeout=10)
    assert after.status_code == 200
    assert gateway.status("after-1").json()["state"] == "SUCCESS"
    assert "injected by tests/failing_line.conf.py" in gateway.read_log()  # the failures happened, and were logged
