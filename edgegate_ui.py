"""The live page (README, "Live page"): one HTML file, ``edgegate_ui.html``
beside this module, served at ``/ui`` under a strict Content-Security-Policy,
and ``/ui/state``, everything it shows in one JSON document.

The page needs no key; what it shows does. It asks for the key, keeps it in
the tab (``sessionStorage``) and sends it as ``Authorization: Bearer`` with
each call, never as a cookie: a page of another site cannot make the
browser act for the user. gateway.py routes both and filters the slots and
the line as ``/slots`` does (``seen_by``) before they reach ``live_state``.

    page = LivePage()
    body, headers = page.html()          # GET /ui
    live_state(seen, board, key, loaded.describe())   # GET /ui/state
"""

import base64
import hashlib
import os
import re
import threading
import time

import requests

import status

PAGE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "edgegate_ui.html")
RECENT_SHOWN = 10  # finished tasks on the page
RECENT_READ = 40  # the key's newest tasks read for it, live and finished...
RECENT_AMONG = 500  # ...among this many newest of all keys': a poll every second never reads the whole list


class LivePage:
    """The page's bytes and its headers, read once per process.

    Its one inline ``<script>`` and ``<style>`` are allowed by their SHA-256
    in the Content-Security-Policy (CSP level 2 hashes), so that the page is
    one file with no build step, and any other script -- injected through a
    model name shown on the page, say -- does not run. ``connect-src 'self'``
    keeps its calls on this gateway; ``frame-ancestors 'none'`` keeps other
    sites from framing it (clickjacking the cancel button)."""

    def __init__(self, path=PAGE_FILE):
        self.path = path
        self._answer = None
        self._lock = threading.Lock()

    def html(self):
        """(body, headers) of GET /ui."""
        with self._lock:
            if self._answer is None:
                with open(self.path, "rb") as f:
                    body = f.read()
                self._answer = (body, page_headers(body))
            return self._answer


def page_headers(body):
    """The headers that go with the page ``body``: its CSP, from its inline blocks' hashes."""
    policy = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; img-src 'self'; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
              % (_hashes(body, b"script"), _hashes(body, b"style")))
    return [("Content-Security-Policy", policy), ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-store")]


def _hashes(body, tag):
    """'sha256-...' of each inline ``<tag>`` block, as browsers hash its text; 'none' if there is none."""
    blocks = re.findall(rb"<" + tag + rb">(.*?)</" + tag + rb">", body, re.DOTALL)
    if not blocks:
        return "'none'"
    return " ".join("'sha256-%s'" % base64.b64encode(hashlib.sha256(b).digest()).decode() for b in blocks)


class LoadedModels:
    """What each upstream's Ollama has loaded (GET /api/ps: name, VRAM,
    ``expires_at``, when Ollama will unload it; server/routes.go PsHandler),
    looked at no more than once a second per process however many pages
    poll: one thread looks, the others take the last look."""

    EVERY_S = 1.0

    def __init__(self, upstreams, timeout):
        self.upstreams = upstreams
        self.timeout = timeout  # (connect, read) seconds
        self._last, self._at = [], 0.0
        self._looking = threading.Lock()

    def describe(self):
        if time.monotonic() - self._at >= self.EVERY_S and self._looking.acquire(blocking=False):
            try:
                self._last = [self._look(upstream) for upstream in self.upstreams]
                self._at = time.monotonic()
            finally:
                self._looking.release()
        return self._last

    def _look(self, upstream):
        seen = {"upstream": upstream.base, "state": "up", "models": []}
        try:
            answer = upstream.send("GET", "/api/ps", {"User-Agent": "edgegate-ui"}, timeout=self.timeout)
            models = answer.json().get("models") if answer.status_code == 200 else None
        except (requests.RequestException, ValueError, AttributeError) as error:
            return dict(seen, state="down", error=type(error).__name__)
        if not isinstance(models, list):
            return dict(seen, state="down", error="answered %d to /api/ps" % answer.status_code)
        seen["models"] = [{"name": m.get("name") or m.get("model"), "size_vram": m.get("size_vram"),
                           "expires_at": m.get("expires_at")} for m in models if isinstance(m, dict)]
        return seen


def live_state(seen, board, key, loaded):
    """GET /ui/state: the slots and the line as ``key`` may see them
    (``seen``: /slots filtered by gateway.seen_by), the running tasks with
    their tokens so far, the last finished ones, and ``loaded`` (the models
    each upstream has loaded; their names for the admin only). Each task the key may cancel carries
    ``cancel``, the id to DELETE at /tasks/. A store that does not answer
    leaves the tasks out and says so; the slots are still shown."""
    if key is not None and not key.admin:  # which models are loaded tells what other keys run: names withheld
        loaded = [dict(upstream, models=[dict(model, name=None) for model in upstream["models"]])
                  for upstream in loaded]
    state = {"now": round(time.time(), 3), "key": _viewer(key), "slots": seen["slots"], "queue": seen["queue"],
             "running": [], "recent": [], "loaded": loaded}
    for entry in state["slots"] + state["queue"]:
        owner = None if entry.get("path") == "hold" else entry.get("key")  # a hold waits as key "hold"
        if entry.get("task_id"):
            entry["cancel"] = cancel_address(key, entry["task_id"], owner)
    try:
        state["running"], state["recent"] = _tasks(state["slots"], board, key)
    except status.StoreUnavailable as error:
        state["store_error"] = "the task store (%s) does not answer: %s" % (error.provider, error)
    return state


def _viewer(key):
    return None if key is None else {"name": key.name, "admin": key.admin}


def cancel_address(key, task_id, owner):
    """What ``key`` DELETEs at /tasks/ to cancel ``owner``'s task
    (gateway.known_task): its id, or ``<owner>/<id>`` for an admin."""
    if key is None or owner is None or owner == key.name:
        return task_id
    return "%s/%s" % (owner, task_id) if key.admin else None


def _tasks(slots, board, key):
    """(running, recently finished) task documents ``key`` may see, newest first."""
    newest = board.recent(RECENT_READ, None, key.name if key is not None and not key.admin else None,
                          newest=RECENT_AMONG)
    running = {_where(d): d for d in newest if d["state"] == status.RUNNING}
    for slot in slots:  # a long generation may be older than the newest tasks: its slot names it
        if slot.get("task_id") and slot.get("path") != "hold":
            kept_as = status.store_id(slot["task_id"], slot.get("key"))
            if kept_as not in running:
                document = board.get(kept_as)
                if document is not None and document["state"] == status.RUNNING:
                    running[kept_as] = document
    finished = [d for d in newest if d["state"] not in status.LIVE_STATES][:RECENT_SHOWN]
    running = sorted(running.values(), key=lambda d: d["timestamp"], reverse=True)
    for document in running:
        document["cancel"] = cancel_address(key, document["task_id"], document["extensions"].get("key"))
    return running, finished


def _where(document):
    return status.store_id(document["task_id"], document["extensions"].get("key"))
