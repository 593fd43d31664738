"""Usage per key and model, and quotas per key (README, "Usage and quotas").

Every finished inference request adds its tokens (as each API reports them),
its GPU-seconds and its queue seconds to its key's and model's day, in the
task store, so every worker adds to the same figures; GET /usage reads them.
A key line may carry daily quotas; a key over one gets 429 in its route's
shape, before it takes a place in the GPU line, on every worker."""

import datetime
import os
import subprocess
import sys
import time
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, asr_job_holds_the_gpu, free_port, gateway_error, wait_until
from edgegate_config import Config, ConfigError

ALICE, BOB, CAROL, ROOT = "sk-alice-usage", "sk-bob-usage", "sk-carol-usage", "sk-root-usage"
MESSAGES = [{"role": "user", "content": "hi"}]


def as_key(key):
    return {"Authorization": "Bearer " + key}


def figures(report, period, key, model):
    return report["days"][period].get(key, {}).get(model)


def today():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


# ---------------------------------------------------------------- what is counted


def test_each_api_s_token_counts_gpu_and_queue_seconds_are_added_to_the_key_and_model(any_store_gateway, stub):
    """Ollama's prompt_eval_count/eval_count, OpenAI's usage, Anthropic's
    usage, streamed or not, as the stub reports them (7 prompt tokens; one
    completion token a piece); the slot's time as GPU-seconds."""
    gw = any_store_gateway
    model = "usage-%s" % uuid.uuid4().hex[:8]  # a model of its own: the session's gateways are shared
    sent = [
        ("/api/chat", {"model": model, "messages": MESSAGES, "stream": False}, "chunks=3"),
        ("/api/generate", {"model": model, "prompt": "hi"}, "chunks=4"),  # NDJSON stream
        ("/v1/chat/completions", {"model": model, "messages": MESSAGES}, "chunks=2"),
        ("/v1/chat/completions", {"model": model, "messages": MESSAGES, "stream": True,
                                  "stream_options": {"include_usage": True}}, "chunks=5"),
        ("/v1/messages", {"model": model, "max_tokens": 10, "messages": MESSAGES, "stream": True}, "chunks=6"),
        ("/v1/messages", {"model": model, "max_tokens": 10, "messages": MESSAGES},
         "chunks=1,delay=0.3"),  # 0.3 s on the GPU
    ]
    for path, body, knobs in sent:
        answer = gw.post(path, json=body, headers={"X-Stub": knobs})
        assert answer.status_code == 200, answer.text
    report = gw.get("/usage").json()
    mine = figures(report, "today", "-", model)
    assert mine["requests"] == 6
    assert mine["prompt_tokens"] == 6 * 7
    assert mine["completion_tokens"] == 3 + 4 + 2 + 5 + 6 + 1
    assert 0.3 <= mine["gpu_seconds"] < 3.0
    assert 0 <= mine["queue_seconds"] < 1.0
    assert figures(report, "last_7_days", "-", model) == mine == figures(report, "last_30_days", "-", model)
    assert (report["to"], report["from"]) == (today(), (datetime.datetime.strptime(today(), "%Y-%m-%d")
                                                       - datetime.timedelta(days=29)).strftime("%Y-%m-%d"))
    ranged = gw.get("/usage?from=%s&to=%s" % (today(), today())).json()
    assert ranged["range"]["-"][model] == mine and set(ranged) == {"from", "to", "range"}
    assert gw.get("/usage?from=2001-01-01&to=2001-01-31").json() == {"from": "2001-01-01", "to": "2001-01-31",
                                                                     "range": {}}


def test_a_request_that_never_ran_is_not_counted_and_a_failed_one_is(gateway, stub):
    model = "usage-%s" % uuid.uuid4().hex[:8]

    def others():  # failed requests for a model Ollama does not list are kept as "other"
        return (figures(gateway.get("/usage").json(), "today", "-", "other") or {}).get("requests", 0)

    before = others()
    with asr_job_holds_the_gpu(gateway):
        assert gateway.post("/api/chat", json={"model": model, "messages": MESSAGES}).status_code == 503
    assert others() == before
    failed = gateway.post("/api/chat", json={"model": model, "messages": MESSAGES}, headers={"X-Stub": "status=500"})
    assert failed.status_code == 500
    assert others() == before + 1
    assert figures(gateway.get("/usage").json(), "today", "-", model) is None


@pytest.mark.parametrize("query", ["from=yesterday", "from=2026-02-30", "to=2026-1-1", "from=2026-03-02&to=2026-03-01"])
def test_bad_dates_are_a_400_in_the_envelope(gateway, query):
    answer = gateway.get("/usage?" + query)
    assert answer.status_code == 400
    assert gateway_error(answer)["code"] == "invalid_request"


# ---------------------------------------------------------------- keys and quotas


@pytest.fixture(scope="module")
def quota_gateway(start_gateway, tmp_path_factory, redis_server):
    """Two workers on Redis; alice may use 20 tokens a day (two small chats
    of the stub: 7 + 3 tokens each), carol 0.4 GPU-seconds, bob and root
    (admin) anything. Requests may wait for the GPU (SLOT_WAIT_S)."""
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text("%s alice tokens_per_day=20\n%s bob\n%s carol gpu_seconds_per_day=0.4\n%s root admin\n"
                        % (ALICE, BOB, CAROL, ROOT))
    return start_gateway(GATEWAY_API_KEYS="@%s" % key_file, REDIS_URL=redis_server.url,
                         STATUS_PREFIX="quota-%s:" % uuid.uuid4().hex[:6], SLOT_WAIT_S="5", WORKERS="2")


def sessions_on_both_workers(gateway, key):
    """Two kept-alive connections, each served by a different worker process."""
    by_pid = {}
    for _ in range(100):
        session = requests.Session()
        session.headers.update(as_key(key))
        pid = session.get(gateway.url + "/healthz", timeout=5).json()["pid"]
        by_pid.setdefault(pid, session)
        if len(by_pid) == 2:
            return list(by_pid.values())
    pytest.fail("every connection went to one worker")


def chat(session, gateway, path="/api/chat", **body):
    body = dict({"model": "llama3.2", "messages": MESSAGES, "stream": False}, **body)
    if path == "/v1/messages":
        body["max_tokens"] = 10
    return session.post(gateway.url + path, json=body, timeout=10)


def test_a_key_over_its_token_quota_gets_429_on_every_worker_until_midnight(quota_gateway, stub):
    gw = quota_gateway
    first, second = sessions_on_both_workers(gw, ALICE)
    assert chat(first, gw).status_code == 200  # 10 tokens, on one worker
    assert chat(second, gw).status_code == 200  # 20, on the other: the limit reached
    refused = chat(second, gw)  # the worker that saw it go over knows at once
    assert refused.status_code == 429, refused.text
    error = gateway_error(refused)
    assert (error["code"], error["provider"]) == ("quota_exceeded", "gateway")
    assert "tokens_per_day" in error["message"] and "20" in error["message"]
    now = time.time()
    retry_after = int(refused.headers["Retry-After"])
    assert abs(retry_after - (86400 - now % 86400)) <= 2  # until midnight UTC
    time.sleep(1.1)  # the other worker reads the key's figures again within a second
    for path in ("/api/chat", "/v1/chat/completions", "/v1/messages"):
        answer = chat(first, gw, path)
        assert answer.status_code == 429, (path, answer.text)
        if path == "/v1/messages":
            assert answer.json()["type"] == "error" and answer.json()["error"]["type"] == "rate_limit_error"
        else:
            assert gateway_error(answer)["code"] == "quota_exceeded"
    assert len(stub.requests_to("/api/chat")) == 2  # nothing refused reached Ollama
    assert stub.requests_to("/v1/chat/completions") == [] and stub.requests_to("/v1/messages") == []
    task = first.get(gw.url + "/tasks/status/" + answer.headers["X-Task-Id"], timeout=5).json()
    assert (task["state"], task["stage"]) == ("FAILED", "quota_exceeded")
    usage = first.get(gw.url + "/usage", timeout=5).json()["days"]["today"]
    assert list(usage) == ["alice"]  # a key sees its own usage only
    assert usage["alice"]["llama3.2:latest"]["requests"] == 2
    assert usage["alice"]["llama3.2:latest"]["prompt_tokens"] + usage["alice"]["llama3.2:latest"][
        "completion_tokens"] == 20


def test_over_its_quota_a_key_waits_for_nothing_and_others_are_not_limited(quota_gateway, stub):
    gw = quota_gateway
    alice = requests.Session()
    alice.headers.update(as_key(ALICE))
    while chat(alice, gw).status_code == 200:  # if the test before did not use it up
        pass
    with asr_job_holds_the_gpu(gw):  # the GPU is taken: others wait in line (SLOT_WAIT_S)
        started = time.monotonic()
        refused = chat(alice, gw)
        assert refused.status_code == 429 and time.monotonic() - started < 1.0  # not after a wait in line
    for key in (BOB, ROOT):  # no quota, and the admin, who is never limited
        session = requests.Session()
        session.headers.update(as_key(key))
        assert chat(session, gw).status_code == 200
    report = gw.get("/usage", headers=as_key(ROOT)).json()["days"]["today"]
    assert {"alice", "bob", "root"} <= set(report)  # the admin sees everyone's


def test_the_sdks_raise_their_rate_limit_error_for_a_key_over_its_quota(quota_gateway, stub):
    import anthropic
    import openai
    gw = quota_gateway
    alice = requests.Session()
    alice.headers.update(as_key(ALICE))
    while chat(alice, gw).status_code == 200:  # if the tests before did not use its tokens up
        pass
    time.sleep(1.1)  # and every worker knows it
    started = time.monotonic()  # with their default retries, which would wait for Retry-After (midnight)
    with pytest.raises(openai.RateLimitError) as raised:
        openai.OpenAI(base_url=gw.url + "/v1", api_key=ALICE, timeout=30).chat.completions.create(
            model="llama3.2", messages=MESSAGES)
    assert raised.value.status_code == 429 and raised.value.code == "quota_exceeded"
    assert int(raised.value.response.headers["Retry-After"]) > 0
    with pytest.raises(anthropic.RateLimitError) as raised:
        anthropic.Anthropic(base_url=gw.url, api_key=ALICE, timeout=30).messages.create(
            model="llama3.2", max_tokens=10, messages=MESSAGES)
    assert raised.value.status_code == 429 and "tokens_per_day" in raised.value.message
    assert time.monotonic() - started < 3  # raised at once: no retry (X-Should-Retry: false)
    assert stub.requests_to("/v1/chat/completions") == [] and stub.requests_to("/v1/messages") == []


def test_a_key_over_its_gpu_seconds_quota_is_refused(quota_gateway, stub):
    gw = quota_gateway
    first, second = sessions_on_both_workers(gw, CAROL)
    assert first.post(gw.url + "/api/chat", json={"model": "llama3.2", "messages": MESSAGES, "stream": False},
                      headers={"X-Stub": "delay=0.5"}, timeout=10).status_code == 200  # 0.5 s on the GPU
    assert wait_until(lambda: chat(second, gw).status_code == 429, 3, 0.2)
    answer = chat(first, gw)
    assert answer.status_code == 429 and "gpu_seconds_per_day" in gateway_error(answer)["message"]


def test_metrics_count_tokens_and_gpu_seconds_with_only_listed_models(quota_gateway, stub):
    gw = quota_gateway
    bob = requests.Session()
    bob.headers.update(as_key(BOB))

    def samples():
        text = gw.get("/metrics", headers=as_key(ROOT)).text
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in ("edgegate_tokens_total", "edgegate_gpu_seconds_total") and \
                        sample.labels.get("key") == "bob":
                    found[(sample.name, sample.labels["model"], sample.labels.get("kind"))] = sample.value
        return found

    sessions_on_both_workers(gw, BOB)  # each worker has started, and looked at the model list
    time.sleep(0.5)
    before = samples()
    made_up = "made-up-%s" % uuid.uuid4().hex[:8]
    assert chat(bob, gw, model="llama3.2").status_code == 200
    assert chat(bob, gw, model=made_up).status_code == 200  # the stub answers any name; Ollama does not list it
    after = samples()

    def grew(name, model, kind=None):
        return after.get((name, model, kind), 0) - before.get((name, model, kind), 0)

    assert grew("edgegate_tokens_total", "llama3.2:latest", "prompt") == 7  # as /api/tags names it
    assert grew("edgegate_tokens_total", "llama3.2:latest", "completion") == 3
    assert grew("edgegate_tokens_total", "other", "prompt") == 7
    assert grew("edgegate_gpu_seconds_total", "llama3.2:latest") > 0
    assert not any(made_up in model for _, model, _ in after)
    assert stub.polls and all(r.path == "/api/tags" for r in stub.polls)  # looked at off the requests' path


# ---------------------------------------------------------------- the key file's quota words


def key_file_config(tmp_path, line):
    path = tmp_path / "keys"
    path.write_text(line + "\n")
    return Config.from_environ({"GATEWAY_API_KEYS": "@%s" % path, "STATE_DIR": str(tmp_path)})


def test_quota_words_are_read_after_the_name_and_role(tmp_path):
    [key] = key_file_config(tmp_path, "sk-x= alice gpu_seconds_per_day=3600 tokens_per_day=2000000").api_keys
    assert (key.secret, key.name, key.admin) == (b"sk-x=", "alice", False)
    assert (key.tokens_per_day, key.gpu_seconds_per_day) == (2000000, 3600.0)
    [bare] = key_file_config(tmp_path, "sk-y tokens_per_day=5").api_keys
    assert bare.name.startswith("key-") and bare.tokens_per_day == 5 and bare.gpu_seconds_per_day is None


@pytest.mark.parametrize("line,says", [
    ("sk-x alice tokens_per_hour=5", "unknown word 'tokens_per_hour=5'"),
    ("sk-x alice tokens_per_day=1e6", "tokens_per_day='1e6': expected a whole number"),
    ("sk-x alice tokens_per_day=-1", "tokens_per_day='-1': expected a whole number, 0 or more"),
    ("sk-x alice gpu_seconds_per_day=nan", "gpu_seconds_per_day='nan': expected a number"),
    ("sk-x alice gpu_seconds_per_day=", "gpu_seconds_per_day='': expected a number"),
    ("sk-x alice tokens_per_day=1 tokens_per_day=2", "a repeated word 'tokens_per_day=2'"),
    ("sk-x root admin tokens_per_day=5", "an admin key is never limited"),
])
def test_a_bad_quota_word_is_a_configuration_error_that_names_it(tmp_path, line, says):
    with pytest.raises(ConfigError) as raised:
        key_file_config(tmp_path, line)
    assert "line 1: " + says in str(raised.value) and "\n" not in str(raised.value)


def test_an_unknown_quota_word_stops_the_start_with_one_line(tmp_path):
    (tmp_path / "keys").write_text("sk-x alice tokens_per_month=5\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPSTREAM_", "REDIS_", "GATEWAY_"))}
    env.update({"STATE_DIR": str(tmp_path), "GATEWAY_BIND": "127.0.0.1:%d" % free_port(),
                "GATEWAY_API_KEYS": "@%s" % (tmp_path / "keys")})
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "gateway:app"],
                          cwd=REPO, env=env, capture_output=True, timeout=30)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, lines
    assert lines[0].startswith("edgegate: configuration error: GATEWAY_API_KEYS=") and "tokens_per_month" in lines[0]


def test_usage_days_is_a_setting(tmp_path):
    assert Config.from_environ({"STATE_DIR": str(tmp_path)}).usage_days == 35
    assert Config.from_environ({"STATE_DIR": str(tmp_path), "USAGE_DAYS": "90"}).usage_days == 90
    with pytest.raises(ConfigError):
        Config.from_environ({"STATE_DIR": str(tmp_path), "USAGE_DAYS": "0"})


def test_check_shows_each_key_s_quotas(tmp_path, stub):
    (tmp_path / "keys").write_text("sk-x alice tokens_per_day=5\nsk-y root admin\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPSTREAM_", "REDIS_", "GATEWAY_"))}
    env.update({"STATE_DIR": str(tmp_path), "UPSTREAM_BASE": stub.url, "GATEWAY_API_KEYS": "@%s" % (tmp_path / "keys")})
    done = subprocess.run([sys.executable, "-m", "gateway", "check"], cwd=REPO, env=env, capture_output=True,
                          timeout=30, text=True)
    assert "2 key(s): alice (tokens_per_day=5), root (admin)" in done.stdout, done.stdout + done.stderr
    assert "sk-x" not in done.stdout and "usage_days" in done.stdout
