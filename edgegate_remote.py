"""Which local model names Ollama forwards to another server (README,
"Ollama cloud models").

A local name can stand for a cloud model: ``ollama cp gpt-oss:120b-cloud
team-model``, or a Modelfile ``FROM ...-cloud``. Ollama decides from the
model's config, not its name: when it has ``remote_host`` and
``remote_model``, /api/generate and /api/chat (and every /v1 route they
serve) send the request there (server/routes.go, GenerateHandler and
ChatHandler), on the box owner's account. ``/api/show`` tells it without
contacting anyone: the config's ``remote_host``/``remote_model`` at the top
of its answer, or, when Ollama runs with OLLAMA_NO_CLOUD, 403 "ollama cloud
is disabled: remote model details are unavailable" (GetModelInfo).

``RemoteModels`` asks once per model name and upstream and remembers the
answer for ``FRESH_S``. A model known to be local stays off the hot path:
once its answer is older, requests go on and a background thread asks
again. A model known to be remote, or not known yet, is asked before the
request goes on.
"""

import json
import logging
import threading
import time

import requests

log = logging.getLogger("edgegate")


class RemoteModels:
    """Per worker process: (upstream base, model) -> (remote?, when learned)."""

    FRESH_S = 30.0
    SHOW_TIMEOUT_S = (2.0, 5.0)

    def __init__(self):
        self.known = {}
        self.asking = set()  # background looks under way
        self.lock = threading.Lock()

    def is_remote(self, upstream, model):
        """True when ``upstream``'s Ollama would forward ``model`` elsewhere.
        Raises ``requests.RequestException`` when it cannot be asked."""
        entry = self.known.get((upstream.base, model))
        now = time.monotonic()
        if entry is not None and not entry[0]:
            if now - entry[1] > self.FRESH_S:
                self._ask_later(upstream, model)
            return False
        if entry is not None and now - entry[1] <= self.FRESH_S:
            return True
        return self._ask(upstream, model)

    def _ask(self, upstream, model):
        answer = upstream.send("POST", "/api/show", {"Content-Type": "application/json",
                                                     "User-Agent": "edgegate-remote-check"},
                               json.dumps({"model": model}).encode(), timeout=self.SHOW_TIMEOUT_S)
        try:
            body = answer.content  # read whole, so that the connection goes back to the pool
        finally:
            answer.close()
        remote = _says_remote(answer.status_code, body)
        if remote is not None:
            with self.lock:
                if len(self.known) > 4096:  # names are the clients' to choose: keep the table bounded
                    self.known.clear()
                self.known[(upstream.base, model)] = (remote, time.monotonic())
        return bool(remote)

    def _ask_later(self, upstream, model):
        with self.lock:
            if (upstream.base, model) in self.asking:
                return
            self.asking.add((upstream.base, model))
        threading.Thread(target=self._ask_quietly, args=(upstream, model), daemon=True,
                         name="edgegate-remote-check").start()

    def _ask_quietly(self, upstream, model):
        try:
            self._ask(upstream, model)
        except requests.RequestException as error:
            log.warning("could not ask %s whether model %r is remote: %s", upstream.base, model[:100], error)
        finally:
            with self.lock:
                self.asking.discard((upstream.base, model))


def _says_remote(status_code, body):
    """What an /api/show answer says: True (remote), False (local), None
    (nothing to remember: an error that says neither)."""
    if status_code == 404:  # no such model: Ollama will say so to the request too
        return False
    if status_code == 403 and b"cloud is disabled" in body:  # OLLAMA_NO_CLOUD and a remote config (GetModelInfo)
        return True
    if status_code != 200:
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    return bool(document.get("remote_host") or document.get("remote_model"))
