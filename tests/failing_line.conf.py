"""gunicorn.conf.py as the README runs it, with the GPU line's bookkeeping
made to fail: waking the line and removing a served waiter's ticket raise
OSError (EMFILE), as a full descriptor table or a vanished queue directory
would. Used by test_slot_ownership.py: a slot taken in line must still be
freed, and the line must keep moving."""

import errno
import os

import edgegate_slots

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gunicorn.conf.py"), encoding="utf-8") as f:
    exec(compile(f.read(), "gunicorn.conf.py", "exec"))


def _fails(*args, **kwargs):
    raise OSError(errno.EMFILE, "Too many open files (injected by tests/failing_line.conf.py)")


edgegate_slots.SlotLine.wake_all = _fails
edgegate_slots.Ticket.tear_down = _fails
