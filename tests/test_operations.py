"""What an operator relies on: /metrics summed over workers, an access log
that never shows a prompt or a key, graceful reload, ``python -m gateway
check``, and the air-gapped install from a wheelhouse."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import venv

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, GatewayProcess, free_port, wait_until
from test_slot_and_cancel import CHAT, raw_request
from test_status import session_on_other_worker, session_on_worker


def metric_samples(text, name):
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def test_metrics_add_up_over_both_workers(start_gateway, stub):
    gateway = start_gateway(SLOT_WAIT_S="0")
    pid = gateway.worker_pids()[0]
    pinned = session_on_worker(gateway, pid)
    for _ in range(7):  # all on one worker
        assert pinned.post(gateway.url + "/api/chat", json=dict(CHAT, stream=False), timeout=5).status_code == 200
    holder = raw_request(gateway, "/api/chat", CHAT, [("X-Stub", "stall=30")])
    assert wait_until(lambda: gateway.slots()[0]["state"] == "held", 5)
    assert pinned.post(gateway.url + "/api/chat", json=CHAT, timeout=5).status_code == 503
    other = session_on_other_worker(gateway, pid)  # scraped on the other worker
    text = other.get(gateway.url + "/metrics", timeout=5).text
    requests_by = {(s.labels["route"], s.labels["status"]): s.value
                   for s in metric_samples(text, "edgegate_requests_total")}
    assert requests_by[("inference", "200")] == 8  # 7 answered, and the holder's stream has begun
    assert requests_by[("inference", "503")] == 1
    assert metric_samples(text, "edgegate_gpu_busy_total")[0].value == 1
    assert [s.value for s in metric_samples(text, "edgegate_gpu_slots") if s.labels["state"] == "held"] == [1]
    assert metric_samples(text, "edgegate_open_streams")[0].value == 1
    assert [s.value for s in metric_samples(text, "edgegate_slot_wait_seconds_count")] == [8]
    assert [s.value for s in metric_samples(text, "edgegate_time_to_first_token_seconds_count")] == [7]
    holder.close()
    assert gateway.wait_slot_free(2)
    text = other.get(gateway.url + "/metrics", timeout=5).text
    assert metric_samples(text, "edgegate_open_streams")[0].value == 0
    assert [s.value for s in metric_samples(text, "edgegate_slot_hold_seconds_count")] == [8]


def test_metrics_start_from_zero_whatever_prometheus_multiproc_dir_the_environment_has(start_gateway, stub,
                                                                                          tmp_path):
    """An earlier run's values in an inherited PROMETHEUS_MULTIPROC_DIR are
    never summed in: the gateway keeps its own, under STATE_DIR/metrics."""
    inherited = tmp_path / "elsewhere"
    first = start_gateway(PROMETHEUS_MULTIPROC_DIR=str(inherited))
    second = start_gateway(PROMETHEUS_MULTIPROC_DIR=str(inherited))
    for gateway in (first, second):
        assert gateway.post("/api/chat", json=dict(CHAT, stream=False)).status_code == 200
        counted = {s.labels["status"]: s.value for s in metric_samples(gateway.get("/metrics").text,
                                                                          "edgegate_requests_total")
                   if s.labels["route"] == "inference"}
        assert counted == {"200": 1}
    assert not inherited.exists() or os.listdir(inherited) == []


def test_metrics_still_add_up_when_gunicorn_is_given_its_own_environment_variables(start_gateway, stub):
    """``-e NAME=VALUE`` (here through GUNICORN_CMD_ARGS) replaces gunicorn's
    raw_env: the workers must still write their values where /metrics reads."""
    gateway = start_gateway(GUNICORN_CMD_ARGS="-e EDGEGATE_NOTE=1")
    for _ in range(2):
        assert gateway.post("/api/chat", json=dict(CHAT, stream=False)).status_code == 200
    counted = {s.labels["status"]: s.value for s in metric_samples(gateway.get("/metrics").text,
                                                                      "edgegate_requests_total")
               if s.labels["route"] == "inference"}
    assert counted == {"200": 2}


def test_metrics_count_upstream_errors(start_gateway):
    gateway = start_gateway(UPSTREAM_BASE="http://127.0.0.1:%d" % free_port(), WORKERS="1")
    gateway.post("/api/chat", json=CHAT)
    text = gateway.get("/metrics").text
    assert [s.value for s in metric_samples(text, "edgegate_upstream_errors_total")
            if s.labels["kind"] == "upstream_unreachable"] == [1]


def test_metrics_without_prometheus_client_is_a_404_saying_what_to_install(start_gateway, tmp_path):
    (tmp_path / "prometheus_client.py").write_text("raise ImportError('not installed here')\n")
    gateway = start_gateway(WORKERS="1", PYTHONPATH=str(tmp_path))
    answer = gateway.get("/metrics")
    assert answer.status_code == 404
    assert "pip install 'edgegate[metrics]'" in answer.json()["error"]["message"]


def test_access_log_has_the_fields_and_never_a_prompt_completion_or_key(start_gateway, stub):
    gateway = start_gateway(WORKERS="1", GATEWAY_API_KEYS="sk-VERY-SECRET-KEY")
    headers = {"Authorization": "Bearer sk-VERY-SECRET-KEY", "X-Task-Id": "logged-1",
               "X-Stub": "word=ZEBRA-COMPLETION,chunks=3"}
    prompt = {"model": "llama3.2", "messages": [{"role": "user", "content": "TOP-SECRET-PROMPT"}]}
    answer = gateway.post("/api/chat?api_key=QUERY-SECRET", json=prompt, headers=headers)
    assert b"ZEBRA-COMPLETION" in answer.content
    gateway.post("/v1/chat/completions", json=dict(prompt, stream=True), headers=dict(headers, **{"X-Task-Id": "logged-2"}))
    gateway.get("/api/tags", headers={"X-API-Key": "sk-VERY-SECRET-KEY"})
    assert wait_until(lambda: "logged-2" in gateway.read_log(), 3)
    log = gateway.read_log()
    for secret in ("TOP-SECRET-PROMPT", "ZEBRA-COMPLETION", "VERY-SECRET-KEY", "QUERY-SECRET"):
        assert secret not in log
    line = next(line for line in log.splitlines() if "task=logged-1" in line)
    assert re.search(r'"POST /api/chat" 200 task=logged-1 model=llama3.2 slot_wait_ms=[\d.]+ '
                     r'ttfb_ms=[\d.]+ duration_ms=\d+ bytes=\d+', line), line


def test_hup_reload_lets_open_streams_finish_while_new_workers_serve(start_gateway, stub):
    gateway = start_gateway(WORKERS="1", GPU_SLOTS="2")
    [old_pid] = gateway.worker_pids()
    stream = requests.post(gateway.url + "/api/chat", json=CHAT, stream=True, timeout=20,
                           headers={"X-Stub": "chunks=25,chunk_delay=0.1", "X-Task-Id": "through-reload"})
    lines = stream.iter_lines()
    first = next(lines)
    gateway.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: any(p != old_pid for p in gateway.worker_pids()), 10)
    new_pid = next(p for p in gateway.worker_pids() if p != old_pid)
    fresh = requests.Session()
    assert wait_until(lambda: fresh.get(gateway.url + "/healthz", timeout=2).json()["pid"] == new_pid, 5)
    assert fresh.post(gateway.url + "/api/chat", json=dict(CHAT, stream=False), timeout=5).status_code == 200
    rest = list(lines)  # the old worker finishes the stream it had
    assert len([first] + rest) == 26 and b'"done": true' in rest[-1]
    assert gateway.status("through-reload").json()["state"] == "SUCCESS"
    assert wait_until(lambda: old_pid not in gateway.worker_pids(), 10)


def run_check(env):
    return subprocess.run([sys.executable, "-m", "gateway", "check"], cwd=REPO, capture_output=True, text=True,
                          timeout=30, env=env)


def test_check_prints_configuration_upstream_store_and_slots(stub, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "UPSTREAM_", "GATEWAY_"))}
    env.update(STATE_DIR=str(tmp_path), UPSTREAM_BASE=stub.url, GATEWAY_API_KEYS="do-not-print-me",
               REDIS_PASSWORD="nor-me")
    done = run_check(env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "upstream:  %s answered 200" % stub.url in done.stdout
    assert "store:     sqlite answers" in done.stdout
    assert "slot 0:    free" in done.stdout
    assert "1 key(s)" in done.stdout
    assert "do-not-print-me" not in done.stdout and "nor-me" not in done.stdout

    env["UPSTREAM_BASE"] = "http://127.0.0.1:%d" % free_port()
    done = run_check(env)
    assert done.returncode == 1 and "does NOT answer" in done.stdout


@pytest.mark.slow
def test_air_gapped_install_from_a_wheelhouse(tmp_path, stub):
    """The README's recipe: build a wheelhouse where there is network, then
    install with no index at all and serve from outside the source tree."""
    wheelhouse = tmp_path / "wheelhouse"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheelhouse), REPO],
                   check=True, timeout=600, cwd=tmp_path)
    target = tmp_path / "venv"
    venv.create(target, with_pip=True)
    pip = target / "bin" / "pip"
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")}
    subprocess.run([str(pip), "install", "-q", "--no-index", "--find-links", str(wheelhouse), "edgegate"],
                   check=True, timeout=600, env=env, cwd=tmp_path)
    site = tmp_path / "run"
    site.mkdir()
    shutil.copy(os.path.join(REPO, "gunicorn.conf.py"), site)
    gateway = GatewayProcess({"UPSTREAM_BASE": stub.url, "WORKERS": "1"})
    gateway.env.pop("PYTHONPATH", None)
    process = subprocess.Popen([str(target / "bin" / "gunicorn"), "-c", "gunicorn.conf.py", "gateway:app"],
                               cwd=site, env=gateway.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _answers(gateway.url + "/healthz"), 15)
        assert requests.get(gateway.url + "/api/tags", timeout=5).json()["models"]
        page = requests.get(gateway.url + "/ui", timeout=5)  # the live page's HTML came with the wheel
        assert page.status_code == 200 and "edgegate: live" in page.text
        imported = subprocess.run([str(target / "bin" / "python"), "-c", "import gateway; print(gateway.__file__)"],
                                  cwd=tmp_path, capture_output=True, text=True, env=gateway.env)
        assert str(target) in imported.stdout  # served from the installed wheel, not the source tree
    finally:
        process.terminate()
        process.wait(10)


def _answers(url):
    try:
        return requests.get(url, timeout=0.5).status_code == 200
    except requests.RequestException:
        return False


def test_a_request_can_never_write_a_log_line_of_its_own(start_gateway, stub):
    """A newline in the path (%0a) or in the model is escaped: one request, one line."""
    gateway = start_gateway(WORKERS="1")
    forged = '6.6.6.6 "POST /api/pull" 200 task=forged'
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.sendall(b"GET /api/tags%0a" + forged.replace(" ", "%20").encode() + b" HTTP/1.1\r\nHost: x\r\n"
                 b"X-Task-Id: inject-1\r\nConnection: close\r\n\r\n")
    sock.recv(65536)
    sock.close()
    gateway.post("/api/chat", json={"model": "llama3.2\n" + forged, "messages": [], "stream": False},
                 headers={"X-Task-Id": "inject-2"})
    assert wait_until(lambda: "task=inject-2" in gateway.read_log(), 3)
    log = gateway.read_log().splitlines()
    assert not any(line.startswith("6.6.6.6") for line in log)
    assert len([line for line in log if "task=inject-1 " in line]) == 1
    assert len([line for line in log if "task=inject-2 " in line]) == 1
