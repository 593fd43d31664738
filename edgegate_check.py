"""``python -m gateway check`` (README, "Operations"): the effective
configuration, secrets masked; whether each upstream and the task store
answer; and who holds each GPU slot. What an operator runs first when
something is off. It changes nothing."""

import dataclasses
import sys
import urllib.parse

import requests

import status
from edgegate_upstream import upstream_error


def _masked(config):
    """The configuration as ``check`` prints it: secrets shown as ***."""
    shown = dataclasses.asdict(config)
    shown["api_keys"] = "%d key(s): %s" % (len(config.api_keys), ", ".join(
        k.name + (" (admin)" if k.admin else " (metrics)" if k.scraper else "") + _quotas_shown(k)
        for k in config.api_keys)) if config.api_keys else ""
    for secret in ("redis_password", "openai_api_key"):
        if shown[secret]:
            shown[secret] = "***"
    if config.redis_url:
        parts = urllib.parse.urlsplit(config.redis_url)
        if parts.password:
            netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
            shown["redis_url"] = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return shown


def _quotas_shown(key):
    """A key's quota words (README, "Usage and quotas"), as ``check`` shows them."""
    words = []
    if key.tokens_per_day is not None:
        words.append("tokens_per_day=%d" % key.tokens_per_day)
    if key.gpu_seconds_per_day is not None:
        words.append("gpu_seconds_per_day=%g" % key.gpu_seconds_per_day)
    return " (%s)" % " ".join(words) if words else ""


def check(gateway, out=sys.stdout):
    """Print what the module's docstring says for ``gateway`` (a
    ``gateway.Gateway``); returns the exit status: 0 when all answer."""
    ok = True
    print("configuration:", file=out)
    for name, value in _masked(gateway.config).items():
        print("  %-22s %s" % (name, value), file=out)
    for upstream in gateway.upstreams.all:  # one per GPU when there are several
        try:
            answer = upstream.send("GET", "/api/version", {"User-Agent": "edgegate-check"}, timeout=(2, 2))
            print("upstream:  %s answered %d %s" % (upstream.base, answer.status_code,
                                                    answer.text.strip()[:80]), file=out)
            ok = ok and answer.status_code < 400
        except requests.RequestException as error:
            print("upstream:  %s does NOT answer: %s" % (upstream.base,
                                                         upstream_error(error, "ollama", upstream.base).message),
                  file=out)
            ok = False
    store = status.open_store(gateway.config)
    try:
        store.ping()
        print("store:     %s answers" % store.provider, file=out)
    except Exception as error:
        print("store:     %s does NOT answer: %s" % (store.provider, error), file=out)
        ok = False
    for slot in gateway.slots.describe():
        held_by = "" if slot["state"] == "free" else " by pid %s%s" % (
            slot.get("pid"), " (task %s)" % slot["task_id"] if slot.get("task_id") else "")
        print("slot %d:    %s%s  [%s]" % (slot["slot"], slot["state"], held_by, slot["lock_file"]), file=out)
    return 0 if ok else 1
