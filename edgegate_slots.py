"""The GPU slots, the line of those who wait for one, and which GPU a request gets.

No HTTP here: the gateway (gateway.py), ``python -m gateway hold``
(edgegate_hold.py) and the benchmarks use these with values only. What an
auditor checks here, with ``Exchange.close`` in gateway.py:

- a slot is an flock on ``slot-<n>.lock`` (``GpuSlots``); the kernel frees
  it when its holder dies, so a killed worker never wedges the GPU;
- the slot is handed to its owner the moment it is taken
  (``GpuSlots.try_take``'s ``owner``): no step between the flock and the
  request that holds it can lose it;
- ``Slot.release`` drops the lock and wakes the line, whatever happens.

Sections: the slots -> the line (``SlotLine``, ``Ticket``) -> the choice
among several GPUs (``GpuChoice``).
"""

import collections
import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import select
import socket
import time

log = logging.getLogger("edgegate")

# ================================================================ the slots


class GpuSlots:
    """``GPU_SLOTS`` lock files, ``slot-<n>.lock`` in ``GPU_LOCK_DIR``, and
    the line of those who wait for one (``SlotLine``).

    Why flock and not a Redis lock: the kernel drops a flock when its holder
    dies, even on SIGKILL, so a crashed worker can never wedge the GPU, and
    any other program on the box (ASR, TTS, ``flock(1)``) can take part
    without talking to us. The lock belongs to the open file description:
    two descriptors opened apart exclude each other, even in one thread,
    while one shared across fork or by two holders would exclude nothing.
    So each hold uses a descriptor this process opened and nobody else
    uses meanwhile; a released one is kept for the next hold of that slot
    (one ``open`` and ``close`` less per request), never across a fork.

    Two small dicts go with every take. The ``holder_record`` (JSON: pid,
    task id, path, since, key, model, batch) is written over the file's
    start when the lock is taken, and left there when it goes: the kernel's
    lock table says whether the slot is held, and a record counts only when
    its pid is the lock's (``describe``). The ``waiter`` is what the one who
    asks wants and is (the holder record, plus its model, its key and, for
    ``hold --slot``, the slots it may have): it picks the slot, and it is
    what a ticket in the line holds.
    """

    KEEP_PER_SLOT = 4  # released descriptors kept per slot, for holds at once in this process

    def __init__(self, lock_dir, count, choose=None):
        self.paths = [os.path.join(lock_dir, "slot-%d.lock" % n) for n in range(count)]
        self.line = SlotLine(lock_dir)
        self.holds = collections.deque(maxlen=32)  # this process's recent hold times, for Retry-After
        self.choose = choose  # several upstreams: (slot indexes, waiter) -> the order to try them in
        self.held_here = set()  # indexes this process holds: not worth a try
        self._kept = {}  # index -> [released descriptors]
        self._kept_pid = os.getpid()

    def try_take(self, holder_record, waiter=None, owner=None):
        """The first free slot of those ``waiter`` may have (``waiter["slots"]``:
        only these, for ``hold --slot``), in the order ``choose`` prefers for
        it; None when none is free. ``owner(slot)`` is handed the slot the
        moment it is taken, before anything else can fail: from then on its
        owner releases it (for a request, ``Exchange.close``); until then,
        any failure here releases it."""
        indexes = range(len(self.paths))
        if waiter and waiter.get("slots") is not None:
            indexes = [i for i in waiter["slots"] if 0 <= i < len(self.paths)]
        if self.choose is not None:
            indexes = self.choose(indexes, waiter or {})
        if self._kept_pid != os.getpid():  # forked: the parent's descriptors would share its locks
            self.held_here, self._kept, self._kept_pid = set(), {}, os.getpid()
        record = None
        for index in indexes:
            if index in self.held_here:
                continue
            fd = self._descriptor(index)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._keep(index, fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            self.held_here.add(index)
            slot = Slot(index, fd, self._released)
            try:
                if record is None:
                    record = json.dumps(holder_record).encode()
                os.pwrite(fd, record.ljust(RECORD_BYTES), 0)
                if owner is not None:
                    owner(slot)
            except BaseException:
                slot.release()
                raise
            return slot
        return None

    def _descriptor(self, index):
        """A descriptor of slot ``index``'s lock file that nobody uses: one
        kept from an earlier hold in this process, else a new one."""
        kept = self._kept.get(index)
        if kept:
            try:
                return kept.pop()
            except IndexError:  # another thread took the last one
                pass
        return os.open(self.paths[index], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _keep(self, index, fd):
        kept = self._kept.setdefault(index, [])
        if len(kept) < self.KEEP_PER_SLOT:
            kept.append(fd)
        else:
            os.close(fd)

    def _released(self, slot, fd):
        """Drop ``slot``'s lock (closing the descriptor if that fails), then
        wake the line: the next waiter may have it."""
        self.held_here.discard(slot.index)
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            os.close(fd)  # closing drops the lock too
        else:
            self._keep(slot.index, fd)
        self.holds.append(time.monotonic() - slot.taken_at)
        try:
            self.line.wake_all()
        except OSError:  # a wake that fails costs a waiter FALLBACK_S, never the ending
            log.exception("could not wake the GPU queue")

    def retry_after(self, waiting, floor):
        """Seconds until a place may open: the holders' and ``waiting``
        waiters' turns at this process's recent hold time, never below ``floor``."""
        if not self.holds:
            return floor
        mean = sum(self.holds) / len(self.holds)
        return max(floor, math.ceil((waiting + 1) * mean / len(self.paths)))

    def describe(self):
        """Each slot, free or held, read without touching the locks.

        The truth is the kernel's table ``/proc/locks`` (taking a lock to look
        would make a real acquirer fail); the file adds task, path and since.
        """
        locked = _flock_holders()
        slots = []
        for index, path in enumerate(self.paths):
            entry = {"slot": index, "lock_file": path, "state": "free"}
            try:
                st = os.stat(path)
            except FileNotFoundError:
                slots.append(entry)
                continue
            pid = locked.get((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
            if pid is None:
                pid = locked.get((None, None, st.st_ino))
            if pid is not None:
                entry.update(state="held", pid=pid)
                record = holder_record(path)
                # A record left by an earlier holder, or none (flock(1)
                # writes nothing): the kernel's pid stands alone then.
                if record.get("pid") == pid:
                    entry.update({k: record[k] for k in ("task_id", "path", "since", "key", "model", "batch")
                                  if k in record})
            slots.append(entry)
        return slots


class Slot:
    """One held GPU slot: a lock file's descriptor with an exclusive flock on it."""

    def __init__(self, index, fd, on_release):
        self.index = index
        self.fd = fd
        self.taken_at = time.monotonic()
        self.on_release = on_release

    def release(self):
        """Drop the lock; the descriptor is kept for the next hold, and the
        line hears of it (``GpuSlots._released``). Only the first call counts."""
        fd, self.fd = self.fd, None
        if fd is not None:
            self.on_release(self, fd)


RECORD_BYTES = 512  # a holder record is padded to this, so that a shorter one leaves no tail of the last


def holder_record(path):
    """The JSON object at the start of a slot's lock file ({} if none):
    what follows it is padding, or the tail of a longer earlier record."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(4096).lstrip()
        record, _ = json.JSONDecoder().raw_decode(text)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _flock_holders():
    """{(major, minor, inode): pid} of every FLOCK in the kernel's table."""
    holders = {}
    try:
        with open("/proc/locks", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return holders
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or "->" in fields:
            continue
        try:
            major, minor, inode = fields[5].split(":")
            key = (int(major, 16), int(minor, 16), int(inode))
            holders[key] = int(fields[4])
            holders[(None, None, key[2])] = int(fields[4])
        except ValueError:
            continue
    return holders


# ================================================================ the line


class QueueFull(Exception):
    """QUEUE_MAX waiters are in line already, one of them of the same key."""

    def __init__(self, waiting):
        super().__init__("%d waiting" % waiting)
        self.waiting = waiting


class SlotLine:
    """The line of those waiting for a GPU slot, shared by every worker
    process and by ``python -m gateway hold``: files in GPU_LOCK_DIR/queue,
    beside the slots, so that it needs nothing the slots do not (no Redis).

    - A waiter's ticket is ``<n>.ticket`` (n: CLOCK_MONOTONIC nanoseconds at
      arrival, taken under ``queue.lock``: one clock for every process of
      the box), JSON saying who waits, and the waiter holds an flock on it
      for as long as it waits. A ticket whose lock can be taken is dead (its
      waiter was killed, even by SIGKILL) and is removed: nothing dead ever
      blocks the line.
    - No polling: each waiter sleeps on its own unix datagram socket
      ``<n>.sock``. Whoever changes the line -- a slot freed, a waiter served
      or gone -- sends each waiter one datagram (``wake_all``); each then
      takes ``queue.lock`` and looks whether it is first (``turn``). Order
      and the try for the slot happen under that lock, so two waiters never
      both take the turn.
    - The slow fallback: a program holding the slot with flock(1), or a
      worker killed while holding it, sends nothing when the lock goes, and
      a waiter killed in line cannot either. So each waiter also looks every
      FALLBACK_S on its own; such a hand-over takes up to that long.
    - Fair between keys (``line_order``): ``served.json`` keeps when each
      key last got its turn, in line or at the door. At the door too: a key
      with nothing waiting always gets a place (QUEUE_MAX plus one per key).

    Every waiter wakes on every change, so positions stay current at once;
    the cost grows with the square of the line, which QUEUE_MAX keeps short.
    """

    FALLBACK_S = 0.5

    def __init__(self, lock_dir):
        self.dir = os.path.join(lock_dir, "queue")
        self.lock_path = os.path.join(self.dir, "queue.lock")
        self.served = ServedRecord(os.path.join(self.dir, "served.json"))

    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def join(self, waiter, holder_record, slots, owner, bound=None):
        """(slot, None) when nobody waits and a slot is free (handed to
        ``owner``, see ``GpuSlots.try_take``; a turn, recorded as one from the
        line is), else (None, a new Ticket) at the end of the line. QueueFull
        when ``bound`` wait, one of them of ``waiter``'s key."""
        with self._locked():
            waiting = self._live()
            if not waiting:
                slot = slots.try_take(holder_record, waiter, owner)
                if slot is not None:
                    if not waiter.get("batch"):  # a batch item's turn costs its key no interactive turn
                        self._quietly("record a key's turn in " + self.served.path, self.served.mark,
                                      waiter.get("key"))
                    return slot, None
            if bound is not None and len(waiting) >= bound and key_waits(waiting, waiter.get("key")):
                raise QueueFull(len(waiting))
            return None, Ticket.issue(self.dir, waiter)

    def turn(self, ticket, holder_record, slots, owner):
        """(slot, 0) when it is ``ticket``'s turn and a slot is free (handed
        to ``owner``; the ticket leaves the line); else (None, its position,
        1 = next). Once the slot is taken nothing here can lose it: it is
        its owner's; the fairness record, the ticket's files and the wake of
        the others are bookkeeping, and an OSError of theirs is logged."""
        with self._locked():
            order = [name for name, _ in line_order(self._live(), self.served.read())]
            position = order.index(ticket.name) + 1 if ticket.name in order else 1
            if position > 1:
                return None, position
            slot = slots.try_take(holder_record, ticket.waiter, owner)
            if slot is None:
                return None, position
            if not ticket.waiter.get("batch"):  # a batch item's turn costs its key no interactive turn
                self._quietly("record a key's turn in " + self.served.path, self.served.mark, ticket.waiter.get("key"))
            self._quietly("remove a served ticket", ticket.tear_down)
        self._quietly("wake the GPU line", self.wake_all)  # the next may find another slot free; all move up
        return slot, 0

    @staticmethod
    def _quietly(what, step, *args):
        """Bookkeeping of the line: a full disk or a vanished queue directory
        costs a waiter FALLBACK_S or the fairness record, never a slot."""
        try:
            step(*args)
        except OSError as error:
            log.warning("could not %s: %s", what, error)

    def leave(self, ticket):
        """The ticket leaves the line (served, timed out, or its client
        left); those behind it move up. Its descriptor is closed whatever
        happens, so that a ticket whose files could not be removed is dead
        to the next look (``_live``), never a waiter that blocks the line."""
        if ticket is None:
            return
        try:
            if not ticket.gone:
                with self._locked():
                    self._quietly("remove a ticket", ticket.tear_down)
                self._quietly("wake the GPU line", self.wake_all)
        finally:
            ticket.close()

    def wake_all(self):
        """One datagram to every waiter: look at the line again."""
        try:
            names = [n for n in os.listdir(self.dir) if n.endswith(".sock")]
        except FileNotFoundError:
            return
        if not names:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as out:
            out.setblocking(False)
            for name in names:
                try:
                    out.sendto(b"!", os.path.join(self.dir, name))
                except OSError:  # dead (reaped soon), or its buffer full of wakes already
                    pass

    def describe(self):
        """The waiters in the order they will be served, for /slots and /metrics."""
        try:
            waiting = self._live(reap=False)
        except FileNotFoundError:
            return []
        return [{"position": n + 1, "task_id": waiter.get("task_id"), "path": waiter.get("path"),
                 "model": waiter.get("model"), "since": waiter.get("since"), "key": waiter.get("key"),
                 "pid": waiter.get("pid"), **({"batch": waiter["batch"]} if waiter.get("batch") else {})}
                for n, (_, waiter) in enumerate(line_order(waiting, self.served.read()))]

    def _live(self, reap=True):
        """[(name, place)] of the live tickets, in arrival order; dead ones
        removed (under the lock only). A ticket this gateway did not write
        -- another user's file, a name or content not its own -- is never
        trusted: left out, and removed with the dead."""
        live = []
        for entry in sorted(os.listdir(self.dir)):
            if not entry.endswith(".ticket"):
                continue
            name = entry[:-len(".ticket")]
            try:
                fd = os.open(os.path.join(self.dir, entry), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:  # gone, or a symlink (ELOOP): not a ticket of ours
                waiter = None
            else:
                try:
                    waiter = _ticket_waiter(fd, name, tell=reap)
                finally:
                    os.close(fd)
            if waiter is not None:
                live.append((name, waiter))
            elif reap:
                _unlink(os.path.join(self.dir, name + ".ticket"), os.path.join(self.dir, name + ".sock"))
        return live


def key_waits(waiting, key):
    """Whether ``key`` (a name, or None) has a request among ``waiting``."""
    return any(waiter.get("key") == key for _, waiter in waiting)


TICKET_NAME_DIGITS = 20


def _ticket_waiter(fd, name, tell):
    """The place a live ticket holds, or None: dead (its lock can be taken),
    or not one this gateway wrote (another user's, a name that is not its
    clock reading, content that is not a JSON object)."""
    if not (len(name) == TICKET_NAME_DIGITS and name.isascii() and name.isdigit()) or \
            os.fstat(fd).st_uid != os.geteuid():
        if tell:
            log.warning("ignored and removed a ticket in the GPU queue that this gateway did not write: %r",
                        name[:40])
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # its waiter is gone: dead
    except BlockingIOError:  # its waiter holds it: alive
        pass
    try:
        waiter = json.loads(os.pread(fd, 65536, 0))
    except ValueError:
        waiter = None
    if not isinstance(waiter, dict):
        if tell:
            log.warning("ignored and removed a ticket in the GPU queue that does not parse: %s", name)
        return None
    return waiter


def wait_turn(slots, ticket, holder_record, owner, deadline, moved, stopped):
    """Wait in line with ``ticket`` until its turn gives it a slot (handed to
    ``owner`` and returned), ``deadline`` (time.monotonic(); None: no limit)
    passes or ``stopped()`` (None). ``moved(position)`` hears its place
    (1 = next) after each look that did not serve it. Sleeps on the ticket's
    socket: a wake, a shutdown, or FALLBACK_S."""
    while not stopped():
        slot, position = slots.line.turn(ticket, holder_record, slots, owner)
        if slot is not None:
            return slot
        moved(position)
        left = SlotLine.FALLBACK_S if deadline is None else deadline - time.monotonic()
        if left <= 0:
            return None
        ticket.wait(min(left, SlotLine.FALLBACK_S))
    return None


class ServedRecord:
    """``served.json``: when each key last had its turn, for ``line_order``
    (keys not served for an hour are as good as never)."""

    FRESH_S = 60.0  # a key served last keeps its time at most this long without a write

    def __init__(self, path):
        self.path = path

    def read(self):
        try:
            with open(self.path, "rb") as f:
                served = json.loads(f.read())
        except (OSError, ValueError):
            return {}
        if not isinstance(served, dict):
            return {}
        return {k: t for k, t in served.items() if isinstance(t, (int, float)) and not isinstance(t, bool)}

    def mark(self, key):
        """``key``'s turn, now. Every request that takes a slot comes here
        (under the line's lock), so the common case costs a read only: a
        key that is already the one served last (one client, or keys off)
        moves in no order by a newer time, and is written again only every
        FRESH_S. A write is a new file renamed over the old: a reader sees
        one record or the other, never half of one."""
        now = time.time()
        key = key or ""
        served = self.read()
        last = served.get(key)
        if last is not None and now - last < self.FRESH_S and last >= max(served.values()):
            return
        served = {k: t for k, t in served.items() if now - t < 3600}
        served[key] = now
        temporary = self.path + ".new"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(served).encode())
        finally:
            os.close(fd)
        os.replace(temporary, self.path)


def line_order(waiting, served):
    """``waiting`` ([(name, place)], in arrival order) in the order the
    line serves it: the next turn goes to the waiting key served least
    recently (``served``: key -> time of its last turn), and within a key
    to the first arrived. So one key's backlog of 50 keeps another key's
    one request waiting behind one of them, not fifty. Without keys
    (all None) this is arrival order. Batch items (``waiter["batch"]``) come
    after every interactive request (README, "Batches")."""
    batch = [(name, waiter) for name, waiter in waiting if waiter.get("batch")]
    if batch and len(batch) < len(waiting):
        return line_order([w for w in waiting if not w[1].get("batch")], served) + line_order(batch, served)
    by_key = {}
    for name, waiter in waiting:
        by_key.setdefault(waiter.get("key") or "", collections.deque()).append((name, waiter))
    last = {key: served.get(key, 0.0) for key in by_key}
    order, turn = [], 0
    while by_key:
        key = min(by_key, key=lambda k: (last[k], by_key[k][0][0]))
        order.append(by_key[key].popleft())
        if not by_key[key]:
            del by_key[key]
        turn += 1
        last[key] = 1e18 + turn  # as if served after everyone now waiting
    return order


class Ticket:
    """One waiter's place in the line (see ``SlotLine``): its ticket file,
    flocked for as long as it waits, and the datagram socket it sleeps on.
    ``sock`` is what ``UpstreamCall.abort`` shuts down on a hang-up or a
    DELETE while the request waits: the sleep ends at once."""

    def __init__(self, directory, name, waiter, fd, sock):
        self.base = os.path.join(directory, name)
        self.name = name
        self.waiter = waiter
        self.fd = fd
        self.sock = sock
        self.gone = False  # its files are removed: it is out of the line

    @classmethod
    def issue(cls, directory, waiter):
        """A new ticket, complete before it is seen: written under another
        name, then renamed (the flock stays with the file)."""
        name = "%020d" % time.monotonic_ns()
        base = os.path.join(directory, name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        fd = None
        try:
            sock.bind(base + ".sock")
            fd = os.open(base + ".new", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps(waiter).encode())
            os.rename(base + ".new", base + ".ticket")
        except BaseException:
            sock.close()
            if fd is not None:
                os.close(fd)
            _unlink(base + ".sock", base + ".new")
            raise
        return cls(directory, name, waiter, fd, sock)

    def wait(self, timeout):
        """Sleep until a wake, a shutdown of ``sock``, or ``timeout``."""
        readable, _, _ = select.select([self.sock], [], [], timeout)
        if readable:
            self.sock.setblocking(False)
            try:
                while self.sock.recv(16):  # the wakes that came meanwhile
                    pass
            except OSError:
                pass

    def tear_down(self):
        """Out of the line (under the line's lock)."""
        if not self.gone:
            self.gone = True
            _unlink(self.base + ".ticket", self.base + ".sock")

    def close(self):
        self.sock.close()
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def _unlink(*paths):
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# ================================================================ the choice among several GPUs


@dataclasses.dataclass
class GpuState:
    """What the gateway knows of the Ollama that serves one GPU slot."""

    base: str  # its UPSTREAM_BASE
    down_until: float = 0.0  # time.monotonic() until which it is skipped: it refused a connection
    looked_at: float = 0.0  # time.monotonic() of the last look at its /api/ps
    loaded: frozenset = frozenset()  # model names as /api/ps shows them (``loaded_name``)


class GpuChoice:
    """Which GPU a request goes to, with one Ollama per GPU (README, "Several
    GPUs"). With one upstream all of this stands aside: every request goes
    to it, as it always did.

    With several, slot i belongs to upstream i, and an inference request
    tries the free slots in this order (``choose``, under the line's lock):
    first those whose Ollama has the request's model loaded -- a load costs
    seconds, a loaded model nothing -- then the one taken longest ago (the
    lock file's mtime: the holder record is written into it when a slot is
    taken, and every worker sees it). An upstream that refused a connection
    is skipped for UPSTREAM_DOWN_S, unless all are down (then the request
    goes and names the failure). With PREFER_LOADED_WAIT_S a waiter whose
    model is loaded on a busy slot tries only that slot until it has waited
    that long, rather than load the model a second time elsewhere.

    What is loaded where comes from each Ollama's GET /api/ps (looked at by
    ``edgegate_upstream.Upstreams.ask_loaded_models``, which reports here with ``seen``),
    and from what this worker just sent (``sent``): a request loads its
    model where it goes, ``keep_alive: 0`` unloads it (server/sched.go).
    No HTTP here.
    """

    LOOK_EVERY_S = 3.0

    def __init__(self, bases, lock_dir, down_s, prefer_loaded_wait_s):
        self.gpus = [GpuState(base) for base in bases]
        self.several = len(self.gpus) > 1
        self.lock_dir = lock_dir
        self.down_s = down_s
        self.prefer_loaded_wait_s = prefer_loaded_wait_s

    def choose(self, indexes, waiter):
        """``indexes`` (slots) in the order to try them for ``waiter`` (its
        ``model``; its ``since``, wall time, for PREFER_LOADED_WAIT_S)."""
        now = time.monotonic()
        indexes = list(indexes)
        up = [i for i in indexes if self.gpus[i].down_until <= now] or indexes
        model = loaded_name(waiter.get("model"))
        has_model = [i for i in up if model in self.gpus[i].loaded]
        since, patience = waiter.get("since"), self.prefer_loaded_wait_s
        if has_model and patience > 0 and since is not None and time.time() - since < patience:
            return has_model  # wait a little for the slot that has the model loaded
        taken_longest_ago = sorted(up, key=self._taken_at)
        return has_model + [i for i in taken_longest_ago if i not in has_model]

    def _taken_at(self, index):
        try:
            return os.stat(os.path.join(self.lock_dir, "slot-%d.lock" % index)).st_mtime
        except OSError:
            return 0.0

    def first_up(self):
        """The first upstream not marked down (the first of all when all are)."""
        now = time.monotonic()
        return next((i for i, gpu in enumerate(self.gpus) if gpu.down_until <= now), 0)

    def loaded_models_stale(self, index):
        return time.monotonic() - self.gpus[index].looked_at >= self.LOOK_EVERY_S

    def seen(self, index, models):
        """A look at upstream ``index`` answered: it is up, and has ``models``
        loaded (a list of /api/ps entries; None when its answer said nothing)."""
        gpu = self.gpus[index]
        gpu.looked_at, gpu.down_until = time.monotonic(), 0.0
        if isinstance(models, list):
            gpu.loaded = frozenset(loaded_name(m.get("name") or m.get("model"))
                                   for m in models if isinstance(m, dict))

    def asked_loaded_models(self, index):
        """A look at upstream ``index`` was tried (answered or not)."""
        self.gpus[index].looked_at = time.monotonic()

    def refused(self, index):
        """Upstream ``index`` refused a connection: skip its slot for UPSTREAM_DOWN_S."""
        if self.several:
            gpu = self.gpus[index]
            if gpu.down_until <= time.monotonic():
                log.warning("upstream %s refused a connection: its slot is skipped for %s s", gpu.base, self.down_s)
            gpu.down_until = time.monotonic() + self.down_s

    def ask_again_soon(self, index):
        """A request on upstream ``index`` failed: look at it again before the next request."""
        self.gpus[index].looked_at = 0.0

    def sent(self, index, model, unloads):
        """A request for ``model`` just went to upstream ``index``: Ollama
        loads the model there, or unloads it (``unloads``: keep_alive 0)."""
        name = loaded_name(model)
        if self.several and name:
            gpu = self.gpus[index]
            gpu.loaded = gpu.loaded - {name} if unloads else gpu.loaded | {name}

    def describe(self):
        now = time.monotonic()
        return [{"upstream": gpu.base, "upstream_state": "up" if gpu.down_until <= now else "down",
                 "loaded": sorted(gpu.loaded)} for gpu in self.gpus]


def loaded_name(model):
    """``model`` as /api/ps names it: ``:latest`` added to a name without a tag."""
    if not isinstance(model, str) or not model.strip():
        return None
    model = model.strip()
    return model if ":" in model.rpartition("/")[2] else model + ":latest"
