"""Small pieces without sockets: PEP 3333 conformance, parsing, translation."""

import io
import json
import os
import socket
import tempfile
import wsgiref.validate

os.environ.setdefault("STATE_DIR", tempfile.mkdtemp(prefix="edgegate-units-"))

import pytest  # noqa: E402

import edgegate_cloud  # noqa: E402
import gateway  # noqa: E402
from edgegate_body import ollama_runs_in_cloud  # noqa: E402
from edgegate_config import Config, ConfigError, keep_alive_seconds  # noqa: E402
from edgegate_relay import PieceCount, token_counts  # noqa: E402
from edgegate_upstream import ModelLifetimes  # noqa: E402


def call(app, path, method="GET", body=b"", headers=None):
    environ = {"REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "x",
               "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
               "wsgi.input": io.BytesIO(body), "wsgi.errors": io.StringIO(), "wsgi.multithread": True,
               "wsgi.multiprocess": True, "wsgi.run_once": False, "CONTENT_LENGTH": str(len(body))}
    environ.update(headers or {})
    seen = {}

    def start_response(status, response_headers, exc_info=None):
        seen["status"], seen["headers"] = status, dict(response_headers)

    result = app(environ, start_response)
    body = b"".join(result)
    result.close()
    return seen["status"], seen["headers"], body


@pytest.mark.parametrize("model,cloud", [
    # internal/modelref/modelref.go parseSourceSuffix, case by case
    ("kimi-k2:cloud", True), ("gpt-oss:20b:cloud", True), ("foo: CLOUD ", True), ("foo:8b-cloud", True),
    ("foo:8b-Cloud", True), ("foo:-cloud", True), ("\u00a0foo:cloud\u3000", True),
    ("foo-cloud", False), ("foo", False), ("foo:local", False), ("x:cloud:local", False),
    ("host:5000/foo-cloud", False), ("host:5000/ns/m:cloud", True), ("foo:8b/x-cloud", False), (None, False),
])
def test_what_ollama_runs_in_the_cloud_follows_its_own_rule(model, cloud):
    assert ollama_runs_in_cloud(model) is cloud


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    config = Config.from_environ({"STATE_DIR": str(tmp_path_factory.mktemp("state")),
                                  "UPSTREAM_BASE": "http://127.0.0.1:9"})
    return wsgiref.validate.validator(gateway.Gateway(config))


def test_own_routes_conform_to_pep_3333(validated):
    assert call(validated, "/healthz")[0] == "200 OK"
    status, headers, body = call(validated, "/nowhere")
    assert status.startswith("404") and json.loads(body)["error"]["code"] == "not_found"
    assert call(validated, "/slots")[0] == "200 OK"
    status, headers, body = call(validated, "/ui")
    assert status == "200 OK" and headers["Content-Type"] == "text/html; charset=utf-8" and b"/ui/state" in body
    status, _, body = call(validated, "/ui/state")  # its upstream does not answer: the page says so
    assert status == "200 OK" and json.loads(body)["loaded"][0]["state"] == "down"


def test_proxied_errors_conform_to_pep_3333(validated):
    status, headers, body = call(validated, "/api/chat", "POST", b"{not json")
    assert status.startswith("400") and headers["X-Task-Id"]
    status, _, body = call(validated, "/api/chat", "POST", b'{"model": "m"}')  # nothing listens on port 9
    assert status.startswith("503") and json.loads(body)["code"] == "upstream_unreachable"  # Ollama's shape on /api


@pytest.mark.parametrize("value,seconds", [("30s", 30), ("5m", 300), ("1h30m", 5400), ("1.5h", 5400), (10, 10),
                                           ("10", 10), (-1, float("inf")), ("-1m", float("inf")), ("0", 0),
                                           ("soon", None), (True, None), ("5x", None)])
def test_keep_alive_durations(value, seconds):
    assert keep_alive_seconds(value) == seconds


def test_model_lifetimes_skip_a_load_call_only_when_it_changes_nothing():
    lifetimes = ModelLifetimes()
    assert lifetimes.needed("m", "30s")
    lifetimes.used("m", "30s")
    assert not lifetimes.needed("m", "30s")
    assert lifetimes.needed("m", "1h")  # another lifetime
    assert lifetimes.needed("other", "30s")
    assert not lifetimes.needed("m", 0)  # never unload on the gateway's own account
    lifetimes.native_api_missing = True
    assert not lifetimes.needed("other", "30s")


def test_token_counts_from_the_tail_of_each_shape():
    sse = b'data: {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 22}}\n\ndata: [DONE]\n\n'
    ndjson = b'{"done": true, "prompt_eval_count": 5, "eval_count": 6}\n'
    assert token_counts(sse) == {"prompt_tokens": 11, "completion_tokens": 22}
    assert token_counts(ndjson) == {"prompt_tokens": 5, "completion_tokens": 6}
    assert token_counts(b'{"content": "the word \\"eval_count\\": 3 in text"}') == {}


def test_pieces_so_far_are_counted_once_however_the_stream_is_cut():
    """The live page's tokens so far: one per NDJSON line not done, one per
    SSE data event but [DONE], whatever chunks the answer comes in."""
    sse = b"".join(b'data: {"choices": [{"delta": {"content": "w%d"}}]}\n\n' % n for n in range(5)) + b"data: [DONE]\n\n"
    ndjson = b"".join(b'{"message": {"content": "w"}, "done":false}\n' for _ in range(4)) + \
        b'{"done": true, "eval_count": 4}\n'
    for answer, stream_format, pieces in ((sse, "sse", 5), (ndjson, "ndjson", 4)):
        for size in (1, 2, 3, 7, 64, len(answer)):
            count = PieceCount(stream_format)
            counted = [count.add(answer[i:i + size]) for i in range(0, len(answer), size)]
            assert counted[-1] == pieces, (stream_format, size)
    assert PieceCount(None).add(sse) == 0  # a whole answer is not counted as it passes


def test_cloud_stream_translation_survives_any_chunking():
    events = [{"choices": [{"delta": {"content": "Hel"}}]}, {"choices": [{"delta": {"content": "lo"}}]},
              {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{\"a\""}}]}}]},
              {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                            "finish_reason": "tool_calls"}]},
              {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}]
    wire = b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events) + b"data: [DONE]\r\n\r\n"
    for size in (1, 7, 64, len(wire)):
        chunks = [wire[i:i + size] for i in range(0, len(wire), size)]
        lines = [json.loads(line) for line in b"".join(edgegate_cloud.openai_stream_to_ollama(iter(chunks), "openai/x")).splitlines()]
        assert [line["message"]["content"] for line in lines[:2]] == ["Hel", "lo"]
        assert lines[2]["message"]["tool_calls"] == [{"function": {"name": "f", "arguments": {"a": 1}}}]
        assert (lines[-1]["done"], lines[-1]["prompt_eval_count"], lines[-1]["eval_count"]) == (True, 3, 4)


def test_cloud_stream_without_done_is_an_error():
    with pytest.raises(edgegate_cloud.CloudError):
        list(edgegate_cloud.openai_stream_to_ollama(iter([b'data: {"choices": []}\n\n']), "openai/x"))


def test_config_errors_name_the_variable(tmp_path):
    with pytest.raises(ConfigError, match=r"^UPSTREAM_RETRIES='many': expected a whole number$"):
        Config.from_environ({"STATE_DIR": str(tmp_path), "UPSTREAM_RETRIES": "many"})
    config = Config.from_environ({"STATE_DIR": str(tmp_path), "OLLAMA_BASE_URL": "http://gpu-box:11434/",
                                  "PROVIDER_TIMEOUT_SECONDS": "90", "MODEL_ALIASES": " a, b ,"})
    assert (config.upstream_bases[0], config.read_timeout_s, config.model_aliases) == ("http://gpu-box:11434", 90.0,
                                                                                   ("a", "b"))


def test_a_lock_directory_too_long_for_the_queue_sockets_stops_the_start(tmp_path):
    fits_len = 107 - len("/queue/") - 20 - len(".sock")  # the longest GPU_LOCK_DIR the sockets allow
    fits = str(tmp_path) + "/" + "x" * (fits_len - len(str(tmp_path)) - 1)
    assert len(fits) == fits_len
    assert Config.from_environ({"STATE_DIR": str(tmp_path), "GPU_LOCK_DIR": fits}).gpu_lock_dir == fits
    assert os.path.isdir(os.path.join(fits, "queue"))  # made at start, the user's alone
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as waiter:  # the kernel takes the longest name
        waiter.bind(os.path.join(fits, "queue", "%020d.sock" % 0))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as waiter, pytest.raises(OSError):  # and no longer
        waiter.bind(os.path.join(fits + "x", "queue", "%020d.sock" % 0))
    with pytest.raises(ConfigError, match=r"^GPU_LOCK_DIR='.*x': too long for the GPU queue's unix sockets "
                                          r"\(108 bytes with their names; at most 107\)"):
        Config.from_environ({"STATE_DIR": str(tmp_path), "GPU_LOCK_DIR": fits + "x"})


def test_importing_the_gateway_reads_nothing_creates_nothing_and_never_exits(tmp_path):
    """Configuration is read when gunicorn starts (gunicorn.conf.py) or by
    ``python -m gateway check|hold``, never at import."""
    import subprocess
    import sys

    state_dir = tmp_path / "not-made"
    env = dict(os.environ, STATE_DIR=str(state_dir), UPSTREAM_BASE="ftp://nowhere/v1", WORKERS="many",
               GATEWAY_API_KEYS="@/no/such/file")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    code = ("import os, gateway, edgegate_worker, edgegate_hold, edgegate_cloud; "
            "print(os.environ.get('PROMETHEUS_MULTIPROC_DIR'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "None\n", "")
    assert not state_dir.exists()
    checked = subprocess.run([sys.executable, "-m", "gateway", "check"], cwd=os.path.dirname(os.path.dirname(__file__)),
                             env=env, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 2 and checked.stderr.count("\n") == 1 and "configuration error" in checked.stderr


def test_a_store_opened_while_another_process_has_the_new_file_locked_waits_for_it(tmp_path):
    """Two workers' first requests on a new SQLite file: one sets WAL mode
    while the other has the file. Held here for half a second (longer than
    a store call may wait), the store still opens once the file is free."""
    import sqlite3
    import threading

    import status
    path = str(tmp_path / "tasks.sqlite3")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.5, other.rollback).start()
    store = status.SqliteStore(path, 60, 60, 5)
    store.ping()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()


def test_the_defaults_wait_their_turn_as_on_ollama(tmp_path):
    def config(**env):
        return Config.from_environ(dict(env, STATE_DIR=str(tmp_path)))

    assert (config().slot_wait_s, config().queue_max) == (300.0, 32)  # the read timeout; half of 2 workers x 32 threads
    assert config(UPSTREAM_READ_TIMEOUT_S="600").slot_wait_s == 600.0
    assert config(SLOT_WAIT_S="0", THREADS="8").slot_wait_s == 0.0
    assert config(THREADS="8").queue_max == 8
def test_a_list_of_recent_tasks_can_stop_at_the_newest_few():
    """The live page polls every second: for a key with few tasks it reads
    the newest documents of all keys only, never the whole list."""
    import status
    documents = [{"task_id": "t%d" % n, "state": "SUCCESS", "extensions": {"key": "alice" if n in (1, 7) else "bob"}}
                 for n in range(10)]
    pages = lambda: iter([documents[:4], documents[4:8], documents[8:]])  # noqa: E731
    assert [d["task_id"] for d in status._pick_recent(pages(), 5, None, 60, "alice")] == ["t1", "t7"]
    assert [d["task_id"] for d in status._pick_recent(pages(), 5, None, 60, "alice", newest=5)] == ["t1"]
