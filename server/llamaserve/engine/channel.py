"""One end of the pipe between the API process and the engine process, in which neither side can block
the other.

A thread writes and a thread reads: `send` only queues, however long the peer takes to read, and every
message is read as soon as it arrives and handed to `deliver` (None once the peer has gone). So a busy
engine never freezes the API's event loop, and both directions full at once cannot deadlock. Dedicated
threads around the existing pipe rather than ZeroMQ: the pipe closes when its peer process dies, which
is how each side learns of the other's death at once, and no dependency is needed. Pickling happens on
the threads too, off the event loop and off the engine's step.
"""

import logging
import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

log = logging.getLogger(__name__)

_CLOSE = object()  # tells the writer thread to stop


class Channel:
    def __init__(self, conn: Connection, deliver: Callable[[object | None], None], name: str):
        """`deliver(message)` runs on the reader thread; `deliver(None)` once when the pipe closes."""
        self._conn = conn
        self._deliver = deliver
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._write, name=f"{name}-writer", daemon=True).start()
        threading.Thread(target=self._read, name=f"{name}-reader", daemon=True).start()

    def send(self, message: object) -> None:
        """Queues `message`; never blocks. Messages go out in order."""
        self._outbox.put(message)

    def close(self) -> None:
        """Stops the writer once what is queued has been sent; the reader stops when the peer closes."""
        self._outbox.put(_CLOSE)

    def _write(self) -> None:
        while (message := self._outbox.get()) is not _CLOSE:
            try:
                self._conn.send(message)
            except (BrokenPipeError, OSError):  # the peer is gone: the reader reports it
                return

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            self._deliver(message)
        self._deliver(None)
