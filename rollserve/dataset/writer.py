"""A background thread that turns batches of finished prompts into shards, so writing never stalls generation.

The queue is bounded: if the disk (or the reward function) is slower than
generation, the engine waits instead of holding every result in memory.
An error in the thread is kept and raised in the generating thread at its
next `put` or at `close`; batches already written stay written.
"""

import queue
import threading

_STOP = object()


class ShardWriter:
    def __init__(self, write_batch, max_pending: int = 4):
        self._write_batch = write_batch
        self._queue: queue.Queue = queue.Queue(max_pending)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="rollserve-shard-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (batch := self._queue.get()) is not _STOP:
            if self.error is None:
                try:
                    self._write_batch(batch)
                except BaseException as e:  # noqa: BLE001 - handed to the generating thread
                    self.error = e

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, batch) -> None:
        self.raise_error()
        while True:
            try:
                self._queue.put(batch, timeout=0.1)
                return
            except queue.Full:
                self.raise_error()

    def close(self) -> None:
        """Waits until every queued batch is written (or the first error); raises that error."""
        self._queue.put(_STOP)
        self._thread.join()
        self.raise_error()
