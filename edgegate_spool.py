"""Request bodies kept off the worker's heap (README, "Large request bodies").

A worker holds many requests at once; if each body lived whole in memory,
its memory would grow with the number of clients sending large bodies. So
a body is kept as nginx keeps one beyond ``client_body_buffer_size``: a
small part in memory (CLIENT_BODY_BUFFER_BYTES), the rest in a temporary
file under STATE_DIR, unlinked at once, so that it is gone when closed or
when the process dies (``Spool``). What must be whole in memory -- an
inference body, parsed as JSON -- is parsed under the worker's budget
(``BodyBudget``, BODY_MEMORY_BYTES): a body that does not fit waits its
turn, at most BODY_WAIT_S, then gets 503 with ``Retry-After``. Under
gunicorn the turn is waited for by the worker's poller, before the request
has a thread (edgegate_worker.py); the share it takes is handed to the
application in the request's thread (``give_share``, ``take_given_share``).

    room = BodyRoom(config)           # one per process
    spool = room.spool()              # write pieces, then read or forward it
    share = room.budget.try_take(cost) or room.budget.take(cost, room.wait_s)
"""

import collections
import ctypes
import os
import re
import tempfile
import threading
import time

PIECE = 64 * 1024  # how much of a body is read, decoded or written at a time

# A UTF-8 lead byte of a character above U+00FF, or above U+FFFF: Python
# keeps a str in 1, 2 or 4 bytes a character, chosen by its widest one
# (PEP 393), so a body's text can take four times its bytes.
WIDER_THAN_LATIN1 = re.compile(rb"[\xc4-\xf4]")
ASTRAL = re.compile(rb"[\xf0-\xf4]")


def text_width(data, width=1):
    """The bytes a character of ``data``'s text takes in a Python str, at
    least ``width``: 1, 2 or 4 (see WIDER_THAN_LATIN1)."""
    if width < 4 and WIDER_THAN_LATIN1.search(data):
        return max(width, 4 if ASTRAL.search(data) else 2)
    return width


class SpoolFailed(Exception):
    """A body could not be kept (the disk under STATE_DIR is full or not
    writable). Not an OSError: one of those escaping the application makes
    gunicorn drop the connection without an answer."""


class Spool:
    """Bytes written once, then read back from the start: in memory up to
    ``in_memory`` bytes, beyond that in an unlinked temporary file in
    ``directory``. It reads like a file (``read``, ``seek``, ``tell``), so
    that ``requests`` sends it upstream a block at a time (urllib3 rewinds
    it with ``seek`` when it retries), and ``len`` is its size."""

    def __init__(self, directory, in_memory):
        self._file = tempfile.SpooledTemporaryFile(max_size=in_memory, dir=directory)
        self.directory = directory
        self.size = 0
        self.width = 1  # bytes a character of its text takes in a Python str (see WIDER_THAN_LATIN1)

    def write(self, data):
        try:
            self._file.write(data)
        except OSError as error:
            raise SpoolFailed("the request body could not be stored in %s: %s" % (self.directory, error.strerror))
        self.size += len(data)
        self.width = text_width(data, self.width)

    def written(self):
        """Writing is over: reading starts from the beginning."""
        self._file.seek(0)
        return self

    @property
    def on_disk(self):
        return self._file._rolled  # SpooledTemporaryFile's own flag: past in_memory, a real file

    def read(self, size=-1):
        return self._file.read(size)

    def seek(self, offset, whence=os.SEEK_SET):
        return self._file.seek(offset, whence)

    def tell(self):
        return self._file.tell()

    def pieces(self):
        """Its bytes from the start, PIECE at a time."""
        self._file.seek(0)
        while True:
            piece = self._file.read(PIECE)
            if not piece:
                return
            yield piece

    def read_all(self):
        self._file.seek(0)
        return self._file.read()

    def __len__(self):
        return self.size

    def __bool__(self):
        return self.size > 0

    def close(self):
        self._file.close()


class Share:
    """A part of the budget, held until ``release`` (or the end of a ``with``)."""

    def __init__(self, budget, cost):
        self.budget, self.cost = budget, cost

    def release(self):
        budget, self.budget = self.budget, None
        if budget is not None:
            budget.give_back(self.cost)

    def shrink(self, cost):
        """Now ``cost`` bytes, no more than it holds: the rest goes back."""
        if self.budget is not None and cost < self.cost:
            self.budget.give_back(self.cost - cost)
            self.cost = cost

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class BodyBudget:
    """The memory one worker lets large bodies take at once, in bytes.

    Bodies take their turn in the order they asked (a large one is not
    passed forever by small ones). A body larger than the whole budget
    goes alone, when nothing else holds any. A thread waits at most
    ``wait_s`` for its turn: the wait is bounded (BODY_WAIT_S, a few
    seconds), so a crowd of large bodies costs each of them a short wait or
    a 503, never a thread held for long."""

    def __init__(self, size):
        self.size = size
        self.used = 0
        self._turns = collections.deque()
        self._changed = threading.Condition()
        self.on_free = None  # called (from any thread) when part of the budget is given back: the worker's wake

    def try_take(self, cost):
        """A Share of ``cost`` bytes now, or None: for the worker's poller,
        which never waits. None too while a thread waits its turn (``take``)."""
        with self._changed:
            if self._turns or not (self.used == 0 or self.used + cost <= self.size):
                return None
            self.used += cost
            return Share(self, cost)

    def take(self, cost, wait_s):
        """A Share of ``cost`` bytes, or None when none came within ``wait_s``."""
        deadline = time.monotonic() + wait_s
        turn = object()
        with self._changed:
            self._turns.append(turn)
            try:
                while not (self._turns[0] is turn and (self.used == 0 or self.used + cost <= self.size)):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._changed.wait(left)
                self.used += cost
                return Share(self, cost)
            finally:
                self._turns.remove(turn)
                self._changed.notify_all()

    def give_back(self, cost):
        """``cost`` bytes back."""
        with self._changed:
            self.used -= cost
            self._changed.notify_all()
        if cost > 0 and self.on_free is not None:
            self.on_free()


# The share the worker's poller took for a request's body before the request
# had a thread (edgegate_worker.py), handed to the application in that thread.
_given = threading.local()


def give_share(share):
    """The worker, in the request's thread, before the application runs."""
    _given.share = share


def take_given_share():
    """The application: the share taken for this request's body, now its own (None if none)."""
    share = getattr(_given, "share", None)
    _given.share = None
    return share


def give_back_given_share():
    """After the request, or where its body is not read whole: a share the
    application did not take goes back."""
    share = take_given_share()
    if share is not None:
        share.release()


class BodyRoom:
    """Where one worker keeps request bodies: its spool directory, how much
    of a body stays in memory, and its budget for bodies parsed whole (one
    per process: the worker's poller and the application share it)."""

    def __init__(self, config):
        self.directory = os.path.join(config.state_dir, "bodies")
        self.in_memory = config.client_body_buffer_bytes
        self.wait_s = config.body_wait_s
        self.budget = BodyBudget(config.body_memory_bytes)
        self._made = False

    def spool(self, in_memory=None):
        """A new Spool, in memory up to ``in_memory`` (default
        CLIENT_BODY_BUFFER_BYTES); 1 for one that goes to a file at once."""
        if not self._made:
            try:  # made once, when first needed; if it cannot be, a body that needs the file is refused then
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                self._made = True
            except OSError:
                pass
        return Spool(self.directory, in_memory or self.in_memory)


# glibc's mallopt(3): M_MMAP_THRESHOLD is -3 in <malloc.h>.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value


def give_large_buffers_back():
    """Make freed large buffers go back to the system at once (glibc only).

    glibc serves an allocation over M_MMAP_THRESHOLD with its own mmap and
    unmaps it when freed, but it raises that threshold to the size of each
    such buffer freed (mallopt(3), "M_MMAP_THRESHOLD": dynamic adjustment),
    so that after the first large body, every later one is carved from the
    thread's arena, and each arena (up to 8 per core) keeps its freed top.
    A worker's memory then grows with the number of threads that ever
    held a large body. Setting the threshold turns the adjustment off.
    Returns whether it was set."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to turn off
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
