"""``python -m gateway hold``: give the GPU to another program, safely (README, "Sharing the GPU slot")."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import requests

import status
from edgegate_errors import printable, short_message
from edgegate_slots import wait_turn
from status import FAILED, RUNNING, SUCCESS


class Hold:
    """``python -m gateway hold [--wait SECONDS] -- COMMAND ARGS...``.

    It joins the same line as the gateway's requests, takes the slot, has
    Ollama unload every loaded model (``keep_alive`` 0 for each model
    ``/api/ps`` lists, then until ``/api/ps`` is empty or UNLOAD_TIMEOUT_S),
    runs the command with the slot held, lets go when it exits, and exits
    with its exit status. The slot is an flock, so a ``kill -9`` of this
    process frees it too; the command does not inherit it (O_CLOEXEC). It is
    a task (path ``hold``, the command's name as model) like any request:
    /slots and /tasks/status show it, and DELETE /tasks/<id> ends it.
    Exit status 75 (EX_TEMPFAIL) when the slot did not come within --wait.

    Like a request, it has one ending (``run``'s ``finally``): the slots it
    took are released and the task's last state is written, whatever happened.
    """

    UNLOAD_TIMEOUT_S = 30.0
    BUSY_EXIT = 75
    TICK_S = 0.25  # as a worker's watcher: the task's writes, heartbeat and DELETE

    def __init__(self, config, slots, upstreams, command, wait_s=None, wanted=None):
        self.config, self.slots, self.upstreams = config, slots, upstreams
        self.command, self.wait_s = command, wait_s
        self.wanted = wanted  # None: any one slot; else these slots, each taken in turn (--slot N, --all)
        self.board = status.TaskBoard(status.open_store(config))
        self.task = status.Task(self.board, "hold-%d-%s" % (os.getpid(), uuid.uuid4().hex[:8]),
                                config.algorithm_id, "HOLD", "hold")
        self.task.extensions.update(model=os.path.basename(command[0]))
        self.child = None
        self.cancelled = False  # by DELETE /tasks/<id> while it waited
        self.stop = threading.Event()

    def run(self):
        """Take the slot(s), run the command, and end: the exit status."""
        self.task.claim()
        threading.Thread(target=self._heartbeat, name="edgegate-hold", daemon=True).start()
        taken = []  # every slot taken, from the moment it is taken (``owner``)
        ending = (FAILED, "internal_error", "hold failed; see its error output")
        try:
            ending, code = self._hold(taken)
            return code
        except SystemExit:  # a signal while it waited (``signalled``)
            ending = (FAILED, "cancelled", "stopped by a signal")
            raise
        finally:
            self.stop.set()
            for slot in taken:
                slot.release()
            self.task.finish(*ending)

    def _hold(self, taken):
        """(the task's ending, the exit status)."""
        deadline = None if self.wait_s is None else time.monotonic() + self.wait_s
        for wanted in ([None] if self.wanted is None else [[n] for n in self.wanted]):
            if self._take(wanted, deadline, taken.append) is None:
                why = "cancelled by DELETE" if self.cancelled else "no GPU slot within %s s" % self.wait_s
                print("edgegate hold: %s" % why, file=sys.stderr)
                return (FAILED, "cancelled" if self.cancelled else "gpu_busy", why), self.BUSY_EXIT
        self.task.set(RUNNING, "unloading", "asking Ollama to unload its models")
        held_by = {self.upstreams.of_slot(slot.index).base: self.upstreams.of_slot(slot.index) for slot in taken}
        for upstream in held_by.values():  # only the Ollama(s) whose slot it holds
            self._unload_models(upstream)
        return self._run_command()

    def _take(self, wanted, deadline, owner):
        now = round(time.time(), 3)
        holder_record = {"pid": os.getpid(), "task_id": self.task.task_id, "path": "hold", "since": now}
        waiter = dict(holder_record, model=self.task.extensions["model"], key="hold", slots=wanted)
        line = self.slots.line
        slot, ticket = line.join(waiter, holder_record, self.slots, owner)
        if slot is not None:
            return slot
        try:
            return wait_turn(self.slots, ticket, holder_record, owner, deadline,
                             moved=lambda position: self.task.set(queue_position=position),
                             stopped=self.stop.is_set)
        finally:
            line.leave(ticket)
            self.task.set(queue_position=None)

    def _unload_models(self, upstream):
        deadline = time.monotonic() + self.UNLOAD_TIMEOUT_S
        try:
            loaded = self._loaded(upstream)
            for model in loaded:
                body = json.dumps({"model": model, "keep_alive": 0}, allow_nan=False).encode()
                upstream.send("POST", "/api/generate", {"Content-Type": "application/json"}, body).close()
            while loaded and time.monotonic() < deadline:
                time.sleep(0.1)
                loaded = self._loaded(upstream)
        except (requests.RequestException, ValueError, AttributeError, TypeError) as error:
            print("edgegate hold: could not ask Ollama to unload (%s); running the command anyway"
                  % short_message(error), file=sys.stderr)
            return
        if loaded:
            print("edgegate hold: still loaded after %.0f s: %s; running the command anyway"
                  % (self.UNLOAD_TIMEOUT_S, ", ".join(map(str, loaded))), file=sys.stderr)

    def _loaded(self, upstream):
        """The models /api/ps lists; an answer of another shape raises ValueError or TypeError."""
        answer = upstream.send("GET", "/api/ps", {"User-Agent": "edgegate-hold"}, timeout=(2, 5))
        return [m.get("name") or m.get("model") for m in answer.json().get("models", [])]

    def _run_command(self):
        """(the task's ending, the command's exit status)."""
        self.task.set(RUNNING, "holding", "running %s with the GPU slot held" % printable(self.command[0]))
        try:
            self.child = subprocess.Popen(self.command)
        except OSError as error:
            print("edgegate hold: cannot run %s: %s" % (self.command[0], error.strerror), file=sys.stderr)
            return (FAILED, "command_failed", "cannot run %s: %s" % (printable(self.command[0]), error.strerror)), 127
        code = self.child.wait()
        code = 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N
        if code == 0:
            return (SUCCESS, "completed", "the command exited with status 0"), 0
        return (FAILED, "command_failed", "the command exited with status %d" % code), code

    def _heartbeat(self):
        """The task's writes and heartbeat, as a worker's watcher does; and a
        DELETE: it ends the wait, or sends the command SIGTERM."""
        while not self.stop.wait(self.TICK_S):
            status.flush_tasks(self.board, [self.task], self.config.heartbeat_sec)
            if self.task.task_id in self.board.cancels_among([self.task.task_id]):
                if self.child is None:
                    self.cancelled = True
                    self.stop.set()
                elif self.child.poll() is None:
                    self.child.terminate()

    def signalled(self, signum, frame):
        """SIGTERM, SIGINT, SIGHUP: passed to the command; while waiting, leave the line."""
        if self.child is not None:
            self.child.send_signal(signum)
        else:
            raise SystemExit(128 + signum)


USAGE = "usage: python -m gateway hold [--wait SECONDS] [--slot N | --all] -- COMMAND ARGS..."


def hold_command(config, slots, upstreams, argv):
    """Parse ``[--wait SECONDS] [--slot N | --all] -- COMMAND ARGS...`` and run a Hold."""
    wait_s, wanted, count = None, None, config.gpu_slots
    while argv[:1] in (["--wait"], ["--slot"], ["--all"]):
        if argv[0] == "--all":
            wanted, argv = list(range(count)), argv[1:]
            continue
        if len(argv) < 2:
            break
        if argv[0] == "--slot":
            if not argv[1].isdigit() or int(argv[1]) >= count:
                print("edgegate hold: --slot expects a slot number from 0 to %d, got %r" % (count - 1, argv[1]),
                      file=sys.stderr)
                return 2
            wanted = [int(argv[1])]
        else:
            try:
                wait_s = float(argv[1])
            except ValueError:
                wait_s = -1
            if wait_s < 0:
                print("edgegate hold: --wait expects seconds, got %r" % argv[1], file=sys.stderr)
                return 2
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    hold = Hold(config, slots, upstreams, argv, wait_s, wanted)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, hold.signalled)
    return hold.run()
