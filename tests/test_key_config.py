"""Key configurations that would start the gateway open, or with a key other
than the one meant, stop the start with one line (issue 21, items 9-13;
README, "Keys and their tasks"); whole values are checked whole."""

import subprocess
import sys

import pytest
import requests

from conftest import REPO, GatewayProcess, gateway_error


def start_fails(env):
    """The one line a start with ``env`` stops with (gunicorn, as the README starts it)."""
    process = GatewayProcess(env)
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "gateway:app"],
                          cwd=REPO, env=process.env, capture_output=True, timeout=30)
    assert done.returncode != 0
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("edgegate: configuration error: GATEWAY_API_KEYS="), lines
    return lines[0]


@pytest.mark.parametrize("value", [",", " , ,", " "])
def test_keys_set_to_nothing_but_commas_and_spaces_stop_the_start(value):
    assert "no key in it" in start_fails({"GATEWAY_API_KEYS": value})


def test_the_same_key_on_two_lines_stops_the_start(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("sk-shared alice\nsk-other bob\nsk-shared ops admin\n")
    assert "line 3: the same key as line 1" in start_fails({"GATEWAY_API_KEYS": "@%s" % key_file})


def test_a_key_file_that_is_not_utf8_stops_the_start_with_one_line(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_bytes(b"sk-alice alice\nsk-b\xe9b bob\n")
    assert "not UTF-8" in start_fails({"GATEWAY_API_KEYS": "@%s" % key_file})


def test_an_indented_comment_is_a_comment_not_the_key_hash(start_gateway, stub, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("   # retired\n\t# old admin\nsk-alice alice\n")
    gateway = start_gateway(GATEWAY_API_KEYS="@%s" % key_file, WORKERS="1")
    for offered in ("#", "# retired"):
        answer = requests.get(gateway.url + "/api/tags", headers={"Authorization": "Bearer " + offered}, timeout=5)
        assert answer.status_code == 401, offered
    assert gateway.get("/api/tags", headers={"Authorization": "Bearer sk-alice"}).status_code == 200
    assert stub.requests_to("/api/tags") and all(r.headers.get("authorization") is None
                                                 for r in stub.requests_to("/api/tags"))


def test_a_task_id_with_a_trailing_newline_is_no_task_id(gateway, stub):
    """``$`` matches before a trailing newline; a whole value is checked whole."""
    answer = gateway.get("/tasks/status/mine%0A")
    assert answer.status_code == 404
    assert gateway_error(answer)["message"] == "no task with that id"
    from edgegate_config import KEY_NAME_RE, KEEP_ALIVE_RE
    from gateway import TASK_ID_RE
    assert not TASK_ID_RE.fullmatch("job-1\n") and not KEY_NAME_RE.fullmatch("alice\n")
    assert not KEEP_ALIVE_RE.fullmatch("30s\n")
