"""ServerLink: an MP client's view of whether the server is there, kept by heartbeats.

At start the link asks the server's chunk size (waiting at most ``connect_timeout``) and sends
its first heartbeat. When the server does not answer, the link starts *disconnected*: it logs
one clear error, the adapters answer every lookup with 0 hits and skip stores, and vLLM serves
on without LMCache. A heartbeat every ``heartbeat_interval`` seconds tells the server this
client is alive (its sessions are freed when heartbeats stop) and tells the client whether the
server is there: the first answer after an outage reconnects (``on_connect`` runs: the worker
re-registers its KV caches, since a restarted server knows none), a missed answer disconnects
and fails every pending request as a miss.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from lmcache.v1.multiprocess.mq import MessageQueueClient
from lmcache.v1.multiprocess.protocol import RequestType

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 256


class ServerLink:
    """Heartbeats and connection state of one MessageQueueClient (module docstring).

    Args:
        mq_client: the client to send through.
        instance_id: the engine instance the heartbeats are for (None: a scheduler).
        role: ``"scheduler"`` or ``"worker"`` (logged by the server).
        heartbeat_interval: seconds between heartbeats (> 0).
        connect_timeout: seconds to wait for the server at start; a heartbeat waits
            ``max(connect_timeout, heartbeat_interval)`` before the server counts as gone.
        default_chunk_size: chunk size assumed while the server was never reached.

    Attributes:
        connected: the server answered the last heartbeat / the start query.
        chunk_size: the server's chunk size (the default until reached).
    """

    def __init__(self, mq_client: MessageQueueClient, instance_id: Optional[int], role: str,
                 heartbeat_interval: float = 10.0, connect_timeout: float = 5.0,
                 default_chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not heartbeat_interval > 0:
            raise ValueError(f"heartbeat_interval must be > 0 seconds, got {heartbeat_interval!r}")
        self.mq = mq_client
        self.instance_id = instance_id
        self.role = role
        self.heartbeat_interval = float(heartbeat_interval)
        self.connect_timeout = float(connect_timeout)
        # a heartbeat unanswered for this long means the server is gone (never shorter than
        # the interval: a busy server or machine must not look dead)
        self.beat_timeout = max(self.connect_timeout, self.heartbeat_interval)
        self.on_connect: Optional[Callable[[dict], None]] = None
        self.epoch: Optional[str] = None
        self.last_beat_sent = 0.0  # time.monotonic() of the last heartbeat sent
        self.counters = {"reconnects": 0, "disconnects": 0}
        self._stop = threading.Event()
        try:
            self.chunk_size = int(mq_client.submit_request(
                RequestType.GET_CHUNK_SIZE, []).result(self.connect_timeout))
            self.connected = True
        except Exception as e:  # noqa: BLE001 - no server: run without hits
            self.chunk_size = int(default_chunk_size)
            self.connected = False
            logger.error("LMCache MP server at %s did not answer within %.1f s (%s): vLLM runs "
                         "WITHOUT LMCache hits (assuming chunk_size %d) and reconnects when the "
                         "server comes back", mq_client.server_url, self.connect_timeout, e,
                         self.chunk_size)
        if self.connected:
            # the first heartbeat at once, not one interval later: from now on the server knows
            # this client heartbeats, so what it pins is freed even if it dies within the interval
            self.beat()
        self._thread = threading.Thread(target=self._run, name=f"lmcache-mp-heartbeat-{role}",
                                        daemon=True)
        self._thread.start()

    def beat(self) -> bool:
        """Send one heartbeat now and update the state; returns ``connected``."""
        self.last_beat_sent = time.monotonic()
        try:
            reply = self.mq.submit_request(RequestType.HEARTBEAT, [self.instance_id, self.role]
                                           ).result(self.beat_timeout)
        except Exception:  # noqa: BLE001 - a missed heartbeat means the server is gone
            if self.connected:
                self.connected = False
                self.counters["disconnects"] += 1
                lost = self.mq.fail_pending("the server stopped answering heartbeats")
                logger.warning("LMCache MP server at %s stopped answering; %d pending request(s) "
                               "answered as misses; vLLM runs without LMCache until it comes back",
                               self.mq.server_url, lost)
            return False
        if int(reply["chunk_size"]) != self.chunk_size:
            if self.connected or self.epoch != reply["epoch"]:
                logger.error("LMCache MP server at %s uses chunk_size %s, this vLLM instance "
                             "started with %d: not using it (restart vLLM)", self.mq.server_url,
                             reply["chunk_size"], self.chunk_size)
            self.connected, self.epoch = False, reply["epoch"]
            return False
        was = self.connected
        self.connected = True
        if not was:
            self.counters["reconnects"] += 1
            logger.warning("LMCache MP server at %s is back", self.mq.server_url)
        restarted = self.epoch is not None and reply["epoch"] != self.epoch
        if (not was or restarted or not reply.get("registered", True)) \
                and self.on_connect is not None:
            try:
                self.on_connect(reply)
            except Exception:  # noqa: BLE001 - retried at the next heartbeat
                logger.exception("re-registering with the LMCache MP server failed")
                self.connected = False
                return False
        self.epoch = reply["epoch"]
        return True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.heartbeat_interval + self.connect_timeout + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            self.beat()
