"""The request-context middleware's own parts (its behaviour through the app is in
test_app.py)."""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection

from server.middleware import _new_id


def test_forked_processes_do_not_repeat_each_others_ids() -> None:
    """Front-ends started by fork: each draws from its own reseeded generator."""
    context = multiprocessing.get_context("fork")
    ids = []
    for _ in range(2):  # the parent draws nothing in between: the same state at each fork
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=_send_new_id, args=(sender,))
        child.start()
        ids.append(receiver.recv())
        child.join(timeout=30)
    assert ids[0] != ids[1]


def _send_new_id(sender: Connection) -> None:
    sender.send(_new_id())
