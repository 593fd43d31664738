"""The live page at /ui, driven in a real browser (headless Chromium) as a
person on a second screen would: enter the key, watch a request run and
another wait, cancel them. And what it may show to whom: a key sees its own
tasks and the slots' states, never another key's task ids or models."""

import os
import shutil
import time

import pytest
import requests

from conftest import wait_until
from test_slot_and_cancel import CHAT, raw_request

ALICE, BOB, ROOT = "sk-alice-secret", "sk-bob-secret", "sk-root-secret"
CHROMIUM = "/usr/bin/chromium"
# A closed network and root: no sandbox, nothing fetched from outside, a profile of its own.
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SLOW_STREAM = "chunks=400,chunk_delay=0.05"  # 20 s of tokens, unless cancelled


def as_key(key):
    return {"Authorization": "Bearer " + key}


@pytest.fixture(scope="module")
def live(start_gateway, tmp_path_factory):
    """Two workers, one GPU slot, a line that waits: alice, bob, and root (admin)."""
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text("%s alice\n%s bob\n%s root admin\n" % (ALICE, BOB, ROOT))
    return start_gateway(GATEWAY_API_KEYS="@%s" % key_file, SLOT_WAIT_S="30")


@pytest.fixture
def gw(live, stub):
    assert wait_until(lambda: all(s["state"] == "free" for s in state(live, ROOT)["slots"]), 5)
    return live


def state(gateway, key):
    answer = gateway.get("/ui/state", headers=as_key(key))
    assert answer.status_code == 200, answer.text
    return answer.json()


def task_state(gateway, task_id, key=ALICE):
    return gateway.get("/tasks/status/" + task_id, headers=as_key(key)).json()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium (.ci/run installs it)")
        pytest.skip("no %s: apt-get install chromium" % CHROMIUM)
    from playwright.sync_api import sync_playwright
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:  # Debian's Chromium: Playwright downloads no browser of its own
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 720})
        yield context
        context.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()  # a new tab: its sessionStorage starts empty
    page.refused = []  # what the browser's CSP refused: must stay empty
    page.on("console", lambda message: page.refused.append(message.text)
            if "Content Security Policy" in message.text else None)
    yield page
    page.close()


def open_with_key(page, gateway, key):
    page.goto(gateway.url + "/ui")
    page.locator("#key").wait_for(state="visible", timeout=5000)  # no key yet: the page asks for one
    assert "needs an API key" in page.locator("#status").inner_text()
    page.fill("#key", key)
    page.click("#usekey")
    page.locator("#keyform").wait_for(state="hidden", timeout=3000)


def row_of(page, table, text):
    return page.locator("#%s tr" % table, has_text=text)


def test_a_person_sees_a_request_run_and_one_wait_and_cancels_both(gw, page, tmp_path):
    from playwright.sync_api import expect
    open_with_key(page, gw, ALICE)
    expect(page.locator("#slots")).to_contain_text("free", timeout=2000)
    assert gw.post("/api/chat", json=dict(CHAT, stream=False), headers=dict(as_key(ALICE), **{"X-Task-Id": "story-done"}),
                   ).status_code == 200
    expect(row_of(page, "recent", "story-done")).to_contain_text("SUCCESS", timeout=2000)

    running = raw_request(gw, "/api/chat", CHAT, [("X-Task-Id", "story-run"), ("Authorization", "Bearer " + ALICE),
                                                  ("X-Stub", SLOW_STREAM)])
    started = time.monotonic()
    expect(row_of(page, "running", "story-run")).to_be_visible(timeout=2000)
    seen_after = time.monotonic() - started
    assert seen_after < 2.0
    expect(row_of(page, "slots", "story-run")).to_contain_text("llama3.2")
    tokens = row_of(page, "running", "story-run").locator("td.n").first
    assert wait_until(lambda: tokens.inner_text().isdigit() and int(tokens.inner_text()) > 0, 3)

    waiting = raw_request(gw, "/api/chat", CHAT, [("X-Task-Id", "story-wait"), ("Authorization", "Bearer " + ALICE)])
    expect(row_of(page, "queue", "story-wait")).to_be_visible(timeout=2000)
    assert row_of(page, "queue", "story-wait").locator("td").first.inner_text() == "1"  # its position
    expect(page.locator("#loaded")).to_contain_text("(a model; its name is for the admin)")  # alice is no admin
    expect(page.locator("#usage")).to_contain_text("usage" if gw.get("/usage", headers=as_key(ALICE)).status_code == 404
                                                   else "alice")
    shot = tmp_path / "live-page.png"
    page.screenshot(path=str(shot), full_page=True)
    print("screenshot: %s" % shot)
    if os.environ.get("EDGEGATE_UI_SCREENSHOT"):  # the README's picture: EDGEGATE_UI_SCREENSHOT=docs/live-page.png
        shutil.copy(shot, os.environ["EDGEGATE_UI_SCREENSHOT"])

    row_of(page, "queue", "story-wait").locator("button.cancel").click()
    expect(row_of(page, "recent", "story-wait")).to_contain_text("CANCELLED", timeout=3000)
    assert (task_state(gw, "story-wait")["state"], task_state(gw, "story-wait")["stage"]) == ("FAILED", "cancelled")
    expect(row_of(page, "queue", "story-wait")).to_have_count(0)

    row_of(page, "running", "story-run").locator("button.cancel").click()
    expect(row_of(page, "recent", "story-run")).to_contain_text("CANCELLED", timeout=3000)
    expect(page.locator("#slots tr").first).to_contain_text("free", timeout=2000)
    assert task_state(gw, "story-run")["stage"] == "cancelled"
    assert all(s["state"] == "free" for s in state(gw, ROOT)["slots"])
    assert page.refused == []
    running.close()
    waiting.close()


def test_another_key_sees_the_slot_held_but_not_whose_task_nor_its_model(gw, page):
    from playwright.sync_api import expect
    holder = raw_request(gw, "/api/chat", CHAT, [("X-Task-Id", "alices-secret-job"),
                                                 ("Authorization", "Bearer " + ALICE), ("X-Stub", SLOW_STREAM)])
    try:
        assert wait_until(lambda: state(gw, ALICE)["running"], 3)
        assert wait_until(lambda: "llama3.2:latest" in str(state(gw, ROOT)["loaded"]), 3)  # Ollama has it loaded
        seen = state(gw, BOB)
        assert seen["slots"][0]["state"] == "held"
        assert "alices-secret-job" not in str(seen) and "llama3.2" not in str(seen)  # nor among the loaded models
        assert [m["name"] for m in seen["loaded"][0]["models"]] == [None]  # one loaded, whose name bob is not told
        assert seen["running"] == [] and "cancel" not in seen["slots"][0]
        open_with_key(page, gw, BOB)
        expect(page.locator("#slots")).to_contain_text("held")
        expect(page.locator("#loaded")).to_contain_text("its name is for the admin")
        assert "alices-secret-job" not in page.content() and "llama3.2" not in page.content()
        assert page.locator("button.cancel").count() == 0
        admin = state(gw, ROOT)  # the admin sees it, and cancels it as <key name>/<id>
        assert admin["running"][0]["cancel"] == admin["slots"][0]["cancel"] == "alice/alices-secret-job"
        assert requests.delete(gw.url + "/tasks/alice/alices-secret-job", headers=as_key(ROOT),
                               timeout=5).json()["stage"] == "cancelled"
    finally:
        holder.close()


def test_the_page_needs_no_key_and_what_it_shows_does(gw):
    page = gw.get("/ui")
    assert page.status_code == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    policy = dict(part.strip().split(" ", 1) for part in page.headers["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert all(source.startswith("'sha256-") for source in policy["script-src"].split())  # no inline script unhashed
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert gw.get("/ui/").text == page.text  # typed with a slash, the same page
    assert "http://" not in page.text.replace(gw.url, "") and "https://" not in page.text  # no asset from outside
    assert gw.get("/ui/state").status_code == 401
    assert gw.get("/ui/state", headers=as_key("sk-wrong")).status_code == 401
    assert state(gw, BOB)["key"] == {"name": "bob", "admin": False}


def test_a_running_stream_tells_its_tokens_so_far_in_its_task(gateway, stub):
    """Counted as the stream passes, written by the watcher about once a second."""
    holder = raw_request(gateway, "/v1/chat/completions", dict(CHAT, stream=True, stream_options={"include_usage": True}),
                         [("X-Task-Id", "counted"), ("X-Stub", "chunks=60,chunk_delay=0.05")])
    try:
        # (404, with no extensions, until the gateway has claimed the task)
        assert wait_until(lambda: (gateway.status("counted").json().get("extensions", {}).get("tokens_so_far") or 0)
                          > 5, 3)
        first = gateway.status("counted").json()["extensions"]
        assert 0 < first["tokens_so_far"] <= 60 and first["tokens_per_second"] > 0
        assert wait_until(lambda: gateway.status("counted").json()["extensions"]["tokens_so_far"]
                          > first["tokens_so_far"], 3)
        done = gateway.wait_state("counted", ("SUCCESS",), 5)
        assert done["extensions"]["completion_tokens"] == 60  # the exact count, in place of the live one
        assert "tokens_so_far" not in done["extensions"] and "tokens_per_second" not in done["extensions"]
    finally:
        holder.close()


def test_a_hold_shows_on_the_page_and_the_admin_can_cancel_it(gw):
    """``python -m gateway hold``: its slot and task, for the admin only; cancelled as <id>."""
    from test_queue import hold_process
    hold = hold_process(gw, "--", "sleep", "30")
    try:
        assert wait_until(lambda: state(gw, ROOT)["slots"][0].get("path") == "hold", 5)
        slot = state(gw, ROOT)["slots"][0]
        assert slot["task_id"].startswith("hold-") and slot["cancel"] == slot["task_id"]
        assert "task_id" not in state(gw, BOB)["slots"][0] and state(gw, BOB)["slots"][0]["state"] == "held"
        assert requests.delete(gw.url + "/tasks/" + slot["cancel"], headers=as_key(ROOT), timeout=5).status_code in (200, 202)
        assert hold.wait(5) != 0
        assert wait_until(lambda: state(gw, ROOT)["slots"][0]["state"] == "free", 3)
    finally:
        if hold.poll() is None:
            hold.kill()
