"""The MP client's message queue: :class:`MessageQueueClient` and :class:`MessagingFuture`.

One DEALER socket per client, owned by one I/O thread; :meth:`MessageQueueClient.submit_request`
may be called from any thread and returns at once with a future. A request unanswered after
``timeout`` seconds, or pending when :meth:`MessageQueueClient.fail_pending` is called (the
heartbeat saw the server go away), completes with the protocol's failure result (lookup 0,
store/retrieve False) or, for requests without one, with :class:`MPRequestError`. Wire format:
:mod:`lmcache.v1.multiprocess.protocol`.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from typing import Any, Generic, Optional, TypeVar

import zmq

from lmcache.v1.multiprocess.protocol import RequestType, failure_result, pack, unpack

logger = logging.getLogger(__name__)
T = TypeVar("T")


class MPRequestError(RuntimeError):
    """A request the server refused (its error text) or that was lost (timeout, server gone)."""


class MessagingFuture(Generic[T]):
    """The result of one request: ``query()`` (done?), ``wait(timeout)``, ``result(timeout)``."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._result: Any = None
        self._error: Optional[BaseException] = None

    def query(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: Optional[float] = None) -> T:
        """The result. Raises TimeoutError when not done within ``timeout`` seconds, or the
        request's error (:class:`MPRequestError`)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"MP request not answered within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def set_result(self, result: T) -> None:
        if not self._done.is_set():
            self._result = result
            self._done.set()

    def set_exception(self, error: BaseException) -> None:
        if not self._done.is_set():
            self._error = error
            self._done.set()

    @classmethod
    def completed(cls, result: T) -> "MessagingFuture[T]":
        """A future that is already done with ``result``."""
        future: MessagingFuture[T] = cls()
        future.set_result(result)
        return future

    def to_cuda_future(self, device: Any = None) -> "CudaMessagingFuture[T]":
        """The future of a STORE/RETRIEVE, whose result is ``[event_handle, value]``: done when
        the answer came and the server's CUDA event (if any) completed; ``result()`` is value."""
        return CudaMessagingFuture(self, device)


class CudaMessagingFuture(MessagingFuture[T]):
    """Waits for the answer and then for the server's IPC event (empty handle: no event)."""

    def __init__(self, raw: MessagingFuture, device: Any = None) -> None:
        super().__init__()
        self._raw = raw
        self._device = device
        self._event = None
        self._opened = False

    def _open(self) -> Any:
        if not self._opened:
            handle, _ = self._raw.result()
            self._opened = True
            if handle:
                import torch

                device = self._device if self._device is not None else torch.cuda.current_device()
                self._event = torch.cuda.Event.from_ipc_handle(device, handle)
        return self._event

    def query(self) -> bool:
        if not self._raw.query():
            return False
        event = self._open()
        return event is None or event.query()

    def wait(self, timeout: Optional[float] = None) -> bool:
        if not self._raw.wait(timeout):
            return False
        event = self._open()
        if event is not None:
            event.synchronize()
        return True

    def result(self, timeout: Optional[float] = None) -> T:
        if not self.wait(timeout):
            raise TimeoutError(f"MP request not answered within {timeout} s")
        return self._raw.result()[1]


class MessageQueueClient:
    """A client of lmcache's MP server.

    Args:
        server_url: ZMQ address of the server, e.g. ``"tcp://localhost:5555"``.
        context: the ZMQ context to make the socket in.
        timeout: seconds a request may stay unanswered (None: forever).

    Raises:
        zmq.ZMQError: a malformed ``server_url``.
    """

    def __init__(self, server_url: str, context: zmq.Context,
                 timeout: Optional[float] = None) -> None:
        self.server_url = server_url
        self.timeout = timeout
        self._socket = context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(server_url)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[int, tuple[MessagingFuture, RequestType, Optional[float]]] = {}
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)  # a full pipe already means "wake up"
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lmcache-mp-client", daemon=True)
        self._thread.start()

    def submit_request(self, request_type: RequestType, payloads: list,
                       response_class: Any = None) -> MessagingFuture:
        """Send one request; returns its future at once. ``response_class`` is accepted for
        LMCache's signature (results are checked by the caller). RuntimeError when closed."""
        if self._closed:
            raise RuntimeError(f"MessageQueueClient of {self.server_url} is closed")
        request_type = RequestType(request_type)
        future: MessagingFuture = MessagingFuture()
        number = next(self._numbers)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with self._lock:
            self._pending[number] = (future, request_type, deadline)
        self._outbox.put((number, request_type, pack(list(payloads))))
        _wake(self._wake_w)
        return future

    def fail_pending(self, reason: str) -> int:
        """Complete every pending request as lost (failure result or MPRequestError);
        returns how many."""
        with self._lock:
            lost, self._pending = self._pending, {}
        for future, request_type, _ in lost.values():
            _fail(future, request_type, reason)
        return len(lost)

    def close(self) -> None:
        """Stop the I/O thread, fail what is pending, close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _wake(self._wake_w)
        self._thread.join(timeout=5)
        self.fail_pending("client closed")
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---- I/O thread ---------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._closed:
                events = dict(poller.poll(100))
                if self._wake_r in events:
                    os.read(self._wake_r, 4096)
                self._send_outbox()
                while self._socket.poll(0, zmq.POLLIN):
                    self._on_reply(self._socket.recv())
                self._expire()
        except Exception:  # noqa: BLE001 - the thread must not die silently
            logger.exception("lmcache MP client I/O thread of %s failed", self.server_url)
        finally:
            self._socket.close(linger=0)

    def _send_outbox(self) -> None:
        while True:
            try:
                number, request_type, body = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._socket.send_multipart([pack([number, int(request_type)]), body],
                                            flags=zmq.NOBLOCK)
            except zmq.Again:
                self._complete_lost(number, "send queue to the server is full")

    def _on_reply(self, frame: bytes) -> None:
        try:
            number, ok, value = unpack(frame)
        except Exception:  # noqa: BLE001 - a bad frame is logged and dropped
            logger.warning("lmcache MP client: undecodable reply from %s dropped", self.server_url)
            return
        with self._lock:
            entry = self._pending.pop(number, None)
        if entry is None:
            return  # answered after it timed out
        if ok:
            entry[0].set_result(value)
        else:
            entry[0].set_exception(MPRequestError(f"{entry[1].name} refused by the server: {value}"))

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [n for n, (_, _, d) in self._pending.items() if d is not None and d < now]
        for number in late:
            self._complete_lost(number, f"no answer within {self.timeout} s")

    def _complete_lost(self, number: int, reason: str) -> None:
        with self._lock:
            entry = self._pending.pop(number, None)
        if entry is not None:
            _fail(entry[0], entry[1], reason)


def _wake(fd: int) -> None:
    try:
        os.write(fd, b"x")
    except BlockingIOError:
        pass  # the pipe is full: the I/O thread wakes anyway


def _fail(future: MessagingFuture, request_type: RequestType, reason: str) -> None:
    result = failure_result(request_type)
    if result is None:
        future.set_exception(MPRequestError(f"{request_type.name} lost: {reason}"))
    else:
        future.set_result(result)
