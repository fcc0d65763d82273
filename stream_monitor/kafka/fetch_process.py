"""Fetch process: `run`'s Kafka consumer in a child process, one batch ahead of the loop.

confluent-kafka builds a Python `Message` per consumed message (about 1.1-1.4 us each,
holding the GIL): in one process that work is serialised with the engine's, which caps
`run` near 0.77x the bare engine however the two are overlapped in threads. Here a child
process (`python -m stream_monitor.kafka.fetch_process`, started with fork+exec, never a
bare fork of a process running librdkafka threads) owns the `Consumer`. It consumes a
batch when asked and writes it as one frame into shared memory (a memfd both processes
map): the values back to back (their lengths as a `struct` format), and compact arrays
of offsets, partitions, topic codes and timestamps; keys, null values and error events
ride in the small control message. The parent rebuilds only the `bytes` values the
decoder needs (one `struct` unpack out of the shared memory) and offers the rest through `Frame`, a
sequence of light `FrameMessage`s made on demand (the per-message paths: re-reads,
errors, dead letters).

Control messages go over a socket pair (`multiprocessing.connection.Connection`): the
parent's requests (consume, consumer calls, subscribe, close) and the child's replies,
plus what librdkafka raises inside the child's calls: log lines, `error_cb`, commit
results (forwarded, handled by the parent in order) and rebalance callbacks (on_assign,
on_revoke, on_lost), which the parent runs on its own thread while the child waits
inside consume(), serving the consumer calls the handler makes meanwhile: exactly where
an in-process callback would make them.

The child dies with the parent: it reads every request from the pipe (EOF: it exits at
once, without leaving the group, as a killed process would) and a watchdog thread
exits when its parent process changes (SIGKILL of the parent). `PR_SET_PDEATHSIG` is
not used: it fires when the *thread* that started the child ends, which is not the
parent's death when a sidecar is built on a short-lived thread. SIGINT and SIGTERM are
ignored by the child: the parent stops gracefully and still needs its consumer.
"""

from __future__ import annotations

import gc
import mmap
import os
import signal
import struct
import sys
import threading
from array import array
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

_INITIAL_SHM = 16 << 20       # bytes; grows (doubling) to fit the largest batch
_WATCH_SECONDS = 0.2          # how often the child checks that its parent is alive
_GC_YOUNG = 20_000            # the child's allocations between young GC collections


# -- what crosses the pipe ---------------------------------------------------------------

class _TP(tuple):
    """A TopicPartition on the wire: (topic, partition, offset, metadata, leader_epoch).
    (confluent-kafka's TopicPartition does not pickle; its `error` is not carried.)"""

    __slots__ = ()


def _out(obj: Any) -> Any:
    if isinstance(obj, TopicPartition):
        return _TP((obj.topic, obj.partition, obj.offset, obj.metadata, obj.leader_epoch))
    if isinstance(obj, list):
        return [_out(x) for x in obj]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple(_out(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _out(v) for k, v in obj.items()}
    return obj


def _in(obj: Any) -> Any:
    if type(obj) is _TP:
        topic, partition, offset, metadata, epoch = obj
        extra = {k: v for k, v in (("metadata", metadata), ("leader_epoch", epoch))
                 if v is not None}
        return TopicPartition(topic, partition, offset, **extra)
    if isinstance(obj, list):
        return [_in(x) for x in obj]
    if type(obj) is tuple:
        return tuple(_in(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _in(v) for k, v in obj.items()}
    return obj


def _wire_error(exc: BaseException) -> tuple:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return ("kafka", exc.args[0])
    return (type(exc).__name__, str(exc))


_BUILTIN_ERRORS = {e.__name__: e for e in (TypeError, ValueError, RuntimeError, BufferError,
                                           IndexError, KeyError, OverflowError)}


def _raise(wire: tuple) -> None:
    kind, what = wire
    if kind == "kafka":
        raise KafkaException(what)
    raise _BUILTIN_ERRORS.get(kind, RuntimeError)(what)


# -- the child ----------------------------------------------------------------------------

class _Child:
    """The consumer's side: serves the parent's requests one at a time."""

    def __init__(self, conn: Connection, memfd: int, config: dict[str, Any]):
        self.conn, self.memfd = conn, memfd
        self.size = _INITIAL_SHM
        os.ftruncate(memfd, self.size)
        self.mm = mmap.mmap(memfd, self.size)
        self.consumer = Consumer({**config, "logger": self, "error_cb": self._error,
                                  "on_commit": self._committed})

    def _send(self, msg: tuple) -> None:
        try:
            self.conn.send(msg)
        except OSError:  # the parent is gone
            os._exit(0)

    # librdkafka's hooks: forwarded to the parent, which handles them in order
    def log(self, level: int, fmt: str, *args: Any) -> None:
        self._send(("log", level, fmt, args))

    def _error(self, err: KafkaError) -> None:
        self._send(("error", err))

    def _committed(self, err: KafkaError | None, partitions: list) -> None:
        self._send(("commit", err, _out(partitions)))

    def _rebalance(self, kind: str) -> Callable[[Consumer, list], None]:
        def callback(consumer: Consumer, partitions: list) -> None:
            # the parent runs its handler now; this process waits inside consume(),
            # making the consumer calls the handler asks for, until it is done
            self._send(("callback", kind, _out(partitions)))
            self.serve(nested=True)
        return callback

    def serve(self, nested: bool = False) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone: exit as a killed process
                os._exit(0)
            kind = msg[0]
            if kind == "done":
                if nested:
                    return
            elif kind == "consume":
                self._consume(msg[1], msg[2])
            elif kind == "cast":  # an asynchronous commit: no reply, errors forwarded
                _, name, args, kwargs = msg
                try:
                    getattr(self.consumer, name)(*_in(args), **_in(kwargs))
                except KafkaException as exc:
                    self._committed(exc.args[0], kwargs.get("offsets") or [])
                except Exception as exc:
                    self.log(3, "%s", f"{name} failed: {type(exc).__name__}: {exc}")
            elif kind == "call":
                _, name, args, kwargs = msg
                try:
                    result = getattr(self.consumer, name)(*_in(args), **_in(kwargs))
                except Exception as exc:
                    self._send(("err", _wire_error(exc)))
                else:
                    self._send(("ok", _out(result)))
            elif kind == "subscribe":
                _, topics, kinds = msg
                try:
                    self.consumer.subscribe(topics, **{f"on_{k}": self._rebalance(k)
                                                       for k in kinds})
                except Exception as exc:
                    self._send(("err", _wire_error(exc)))
                else:
                    self._send(("ok", None))
            elif kind == "close":
                try:
                    self.consumer.close()
                except Exception as exc:
                    self._send(("err", _wire_error(exc)))
                else:
                    self._send(("ok", None))
                self.conn.close()
                os._exit(0)

    def _consume(self, n: int, timeout: float) -> None:
        try:
            raw = self.consumer.consume(n, timeout)
            meta = self._write(raw)
        except Exception as exc:
            self._send(("batch", None, _wire_error(exc)))
            return
        self._send(("batch", meta, None))

    def _write(self, raw: list) -> dict[str, Any]:
        """The batch into the shared memory; returns its layout (and the rare parts)."""
        n = len(raw)
        meta: dict[str, Any] = {"n": n}
        if not n:
            return meta
        errors = {}
        if any(map(Message.error, raw)):  # error / EOF events: carried whole, rare
            for i, m in enumerate(raw):
                if m.error() is not None:
                    errors[i] = (m.topic(), m.partition(), m.offset(), m.value(), m.key(),
                                 m.error())
            # offset 0, not -1: confluent-kafka gives a Message made with -1 the offset
            # None, which no integer array takes (a broker outage crashed `run`)
            blank = Message(topic="", partition=0, offset=0, value=b"", timestamp=(0, 0))
            raw = [blank if i in errors else m for i, m in enumerate(raw)]
        meta["errors"] = errors
        values = list(map(Message.value, raw))
        if None in values:  # null values (tombstones): b"" in the frame, None on demand
            meta["nulls"] = [i for i, v in enumerate(values) if v is None]
            values = [v or b"" for v in values]
        keys = list(map(Message.key, raw))
        if keys.count(None) != n:
            meta["keys"] = keys
        topics = list(map(Message.topic, raw))
        names = list(dict.fromkeys(topics))
        meta["topics"] = names
        if len(names) == 1:
            codes = array("h", bytes(2 * n))
        else:
            codes = array("h", map({t: i for i, t in enumerate(names)}.__getitem__, topics))
        ts_types, stamps = zip(*map(Message.timestamp, raw), strict=True)
        blob = b"".join(values)
        # the values' lengths as a `struct` format ("=650s 677s ..."; struct ignores the
        # spaces): the parent unpacks every value as `bytes` in one C call (see `Frame`).
        # Made by the list's C-level repr: 0.08 us a message vs 0.11 by joining str()s.
        meta["format"] = "=" + str(list(map(len, values)))[1:-1].replace(",", "s") + "s"
        # arrays from lists, not from iterators: 0.03-0.04 vs 0.04-0.05 us a message each
        parts: list[tuple[str, str, Any]] = [
            ("offsets", "q", array("q", list(map(Message.offset, raw)))),
            ("timestamps", "q", array("q", stamps)),
            ("partitions", "i", array("i", list(map(Message.partition, raw)))),
            ("codes", "h", codes),
            ("ts_types", "b", array("b", ts_types))]
        need = len(blob) + sum(len(a) * a.itemsize for _, _, a in parts)
        if need > self.size:
            self.size = max(need, 2 * self.size)
            self.mm.close()
            os.ftruncate(self.memfd, self.size)
            self.mm = mmap.mmap(self.memfd, self.size)
        meta["size"] = self.size
        mm, pos = self.mm, len(blob)
        mm[0:pos] = blob
        meta["values"] = pos
        layout = {}
        for name, code, arr in parts:
            end = pos + len(arr) * arr.itemsize
            mm[pos:end] = arr  # (no copy by tobytes: an array is a buffer)
            layout[name] = (pos, end, code)
            pos = end
        meta["layout"] = layout
        return meta


def _watch_parent(parent: int) -> None:
    def watch() -> None:
        while True:
            if os.getppid() != parent:  # reparented: the parent died (e.g. SIGKILL)
                os._exit(0)
            threading.Event().wait(_WATCH_SECONDS)
    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent stops gracefully and
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # needs its consumer until it closes it
    parent = int(argv[3])
    if os.getppid() != parent:
        os._exit(0)
    _watch_parent(parent)
    conn = Connection(int(argv[1]))
    try:
        kind, config = conn.recv()
    except (EOFError, OSError):
        os._exit(0)
    try:
        child = _Child(conn, int(argv[2]), config)
    except Exception as exc:
        conn.send(("err", _wire_error(exc)))
        os._exit(0)
    # the consumer's message objects are tracked by the cyclic GC: 10,000 of them a
    # batch made it collect the young generation over and over (measured: consume()
    # 1.4-1.6 us a message -> 1.0); what exists now is never garbage
    gc.freeze()
    gc.set_threshold(_GC_YOUNG, 20, 10)
    conn.send(("ok", None))
    child.serve()


# -- the parent ---------------------------------------------------------------------------

class FrameMessage:
    """One message of a `Frame`, with the accessors of confluent-kafka's `Message` that
    `run` uses (`headers()` is not carried: None)."""

    __slots__ = ("_f", "_i")

    def __init__(self, frame: Frame, i: int):
        self._f, self._i = frame, i

    def error(self) -> KafkaError | None:
        e = self._f.errors.get(self._i)
        return None if e is None else e[5]

    def topic(self) -> str | None:
        e = self._f.errors.get(self._i)
        return e[0] if e is not None else self._f.topic_names[self._f.list("codes")[self._i]]

    def partition(self) -> int | None:
        e = self._f.errors.get(self._i)
        return e[1] if e is not None else self._f.list("partitions")[self._i]

    def offset(self) -> int | None:
        e = self._f.errors.get(self._i)
        return e[2] if e is not None else self._f.list("offsets")[self._i]

    def value(self) -> bytes | None:
        f, i = self._f, self._i
        e = f.errors.get(i)
        if e is not None:
            return e[3]
        return None if i in f.nulls else f.values[i]

    def key(self) -> bytes | None:
        e = self._f.errors.get(self._i)
        if e is not None:
            return e[4]
        return None if self._f.keys is None else self._f.keys[self._i]

    def timestamp(self) -> tuple[int, int]:
        # read for a few messages a batch (the re-read fingerprint of each partition's
        # first message): one element each, not a list of the whole batch's
        f, i = self._f, self._i
        return (int(f.ts_types[i]), int(f.timestamps[i]))

    def headers(self) -> None:
        return None

    def __len__(self) -> int:
        v = self.value()
        return 0 if v is None else len(v)

    def __repr__(self) -> str:
        return f"FrameMessage({self.topic()}[{self.partition()}]@{self.offset()})"


class Frame:
    """A consumed batch as the fetch process hands it over: the values as `bytes`,
    offsets, partitions, topic codes and timestamps as numpy arrays, and a sequence of
    `FrameMessage`s made on demand."""

    def __init__(self, meta: dict[str, Any], mm: mmap.mmap):
        import numpy as np
        n = self.n = meta["n"]
        self.errors: dict[int, tuple] = meta.get("errors") or {}
        self.nulls = frozenset(meta.get("nulls", ()))
        self.keys: list | None = meta.get("keys")
        self.topic_names: list[str] = meta["topics"]
        arrays = {name: np.frombuffer(mm[a:b], np.dtype(code))
                  for name, (a, b, code) in meta["layout"].items()}
        # every value copied straight out of the shared memory as `bytes` by one
        # `struct` unpack whose format the child wrote (measured on 10,000 values of
        # 650 bytes: 0.05-0.08 us a value, format compiled each time; 0.14-0.17 for a
        # slice of the mmap per value, 0.35-0.49 for one copy of the batch and a split,
        # 0.50 for memoryview slices, which rejects could not keep anyway). A `Struct`
        # of its own, not `struct.unpack_from`: its cache would keep 100 of them.
        self.values: list[bytes] = list(struct.Struct(meta["format"]).unpack_from(mm, 0))
        self.offsets, self.partitions = arrays["offsets"], arrays["partitions"]
        self.codes, self.timestamps = arrays["codes"], arrays["timestamps"]
        self.ts_types = arrays["ts_types"]
        self._lists: dict[str, list] = {}
        if len(self.values) != n:
            raise RuntimeError(f"fetch process: a frame of {n} messages with "
                               f"{len(self.values)} values")

    def list(self, name: str) -> list:
        got = self._lists.get(name)
        if got is None:
            got = self._lists[name] = getattr(self, name).tolist()
        return got

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [FrameMessage(self, j) for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError("frame index out of range")
        return FrameMessage(self, i)

    def __iter__(self):
        return map(FrameMessage, [self] * self.n, range(self.n))

    def has_topic(self, topic: str) -> bool:
        return topic in self.topic_names

    def topic_mask(self, topic: str) -> list[bool]:
        """Per message: whether it is of `topic` (the label topic's messages)."""
        if topic not in self.topic_names:
            return [False] * self.n
        if self.errors:
            return [m.topic() == topic for m in self]
        return (self.codes == self.topic_names.index(topic)).tolist()

    def runs(self, one_topic: bool) -> list[tuple[tuple[str, int], int, int, int, int]] | None:
        """`digest_batch`'s runs of one partition with rising offsets (tp, start, end,
        first offset, last offset); None when the batch holds an error or EOF event."""
        import numpy as np
        n = self.n
        if not n or self.errors:
            return None
        offs = self.offsets
        cut = offs[1:] <= offs[:-1]
        names = self.topic_names
        key = self.partitions.astype(np.int64) * len(names) + self.codes
        cut |= key[1:] != key[:-1]
        cuts = (np.flatnonzero(cut) + 1).tolist()
        starts, ends = [0, *cuts], [*cuts, n]
        firsts, lasts = offs[starts].tolist(), offs[[e - 1 for e in ends]].tolist()
        codes, parts = self.codes[starts].tolist(), self.partitions[starts].tolist()
        return [((names[c], p), a, b, first, last)
                for c, p, a, b, first, last in zip(codes, parts, starts, ends, firsts, lasts,
                                                   strict=True)]


# Consumer methods the parent calls on the child as they are (`FetchProcess.__getattr__`).
_FORWARDED = frozenset({"committed", "position", "seek", "assign", "assignment",
                        "pause", "resume", "get_watermark_offsets", "list_topics",
                        "consumer_group_metadata", "memberid"})


class FetchProcess:
    """(parent) The consumer in the child process: the methods of confluent-kafka's
    `Consumer` that `run` uses, made as requests, and the fetch one batch ahead
    (`start` / `join` / `take`, as the fetch thread's `_Fetcher`).

    A consumer call while a consume() is in flight first waits for it (the loop joins at
    quiet points of its turn before using the consumer, so that is a safety net); a call
    made by a rebalance handler the child handed over goes straight to the child, which
    serves it inside its consume(). Thread-safe: one exchange at a time (re-entrant, for
    the handlers)."""

    thread = None  # no fetch thread in this process (`KafkaSidecar._in_loop`)

    def __init__(self, config: dict[str, Any], logger: Any,
                 error_cb: Callable[[KafkaError], None],
                 on_commit: Callable[[KafkaError | None, list], None]):
        import socket
        import subprocess
        self.logger, self.error_cb, self.on_commit = logger, error_cb, on_commit
        self._callbacks: dict[str, Callable[[Any, list], None]] = {}
        self._lock = threading.RLock()
        self._deferred = 0         # requests whose replies are not read yet (init, subscribe)
        self._stash: list[tuple] = []  # a callback seen by `returned`, run at `join`
        self._closed = False
        self.inflight = False      # a consume() requested and not joined yet
        self.slot: Any = None      # its result: a Frame, or an exception
        self._ready = False        # the consume() in flight has replied
        self._serving = 0          # rebalance handlers running (nested)
        self._batch = (1, 1.0)     # (messages, timeout) of a consume() ahead (`ahead`)
        mine, theirs = socket.socketpair()
        self._memfd = os.memfd_create("stream-monitor-fetch", os.MFD_CLOEXEC)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stream_monitor.kafka.fetch_process",
                 str(theirs.fileno()), str(self._memfd), str(os.getpid())],
                pass_fds=(theirs.fileno(), self._memfd), env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.pid = self.process.pid
        self.conn = Connection(mine.detach())
        self._size = 0
        self._mm: mmap.mmap | None = None
        self.conn.send(("init", config))
        self._deferred += 1  # its reply is read with the next call's: the child starts
        # (about 0.1-0.2 s) while the caller goes on (e.g. loads the engine)

    # -- the exchange -------------------------------------------------------------------

    def _recv(self) -> tuple:
        try:
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            code = self.process.poll()
            raise RuntimeError(f"the Kafka fetch process exited (code {code})") from exc

    def _handle(self, msg: tuple) -> None:
        """A message from the child that is not a reply: forwarded hooks, callbacks."""
        kind = msg[0]
        if kind == "log":
            self.logger.log(msg[1], msg[2], *msg[3])
        elif kind == "error":
            self.error_cb(msg[1])
        elif kind == "commit":
            self.on_commit(msg[1], _in(msg[2]))
        elif kind == "callback":
            self._run_callback(msg)

    def _run_callback(self, msg: tuple) -> None:
        _, kind, partitions = msg
        handler = self._callbacks.get(kind)
        self._serving += 1
        try:
            if handler is not None:
                handler(self, _in(partitions))  # an exception ends the loop, after:
        finally:
            self._serving -= 1
            self.conn.send(("done",))          # the child goes on either way

    def _until(self, kinds: tuple[str, ...]) -> tuple:
        """Messages from the child, handled in order, up to the first of `kinds`."""
        while self._stash:
            self._handle(self._stash.pop(0))
        while True:
            msg = self._recv()
            if msg[0] in kinds:
                return msg
            self._handle(msg)

    def _settle(self) -> None:
        """Read the replies of requests sent without waiting (in order)."""
        while self._deferred:
            self._deferred -= 1
            msg = self._until(("ok", "err"))
            if msg[0] == "err":
                _raise(msg[1])

    def _request(self, msg: tuple) -> Any:
        with self._lock:
            if self._closed:
                raise RuntimeError("Consumer closed")
            if self.inflight and not self._serving:
                self.join()  # the loop's own calls wait for the consume() in flight
            self._settle()
            self.conn.send(msg)
            reply = self._until(("ok", "err"))
            if reply[0] == "err":
                _raise(reply[1])
            return _in(reply[1])

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._request(("call", name, _out(args), _out(kwargs)))

    # -- the consumer's methods ---------------------------------------------------------

    def subscribe(self, topics: list[str], on_assign=None, on_revoke=None, on_lost=None
                  ) -> None:
        with self._lock:
            if self.inflight:
                self.join()
            self._callbacks = {k: f for k, f in (("assign", on_assign), ("revoke", on_revoke),
                                                 ("lost", on_lost)) if f is not None}
            self.conn.send(("subscribe", list(topics), list(self._callbacks)))
            self._deferred += 1  # the group join starts now; its reply is read later

    def commit(self, *args: Any, asynchronous: bool = True, **kwargs: Any) -> None:
        """An asynchronous commit is sent without waiting for the child (a round trip
        cost the loop 0.6-1.6 ms a batch): its result comes back as the commit callback's
        (`on_commit`), an error raised by the call too. A synchronous one waits."""
        if not asynchronous:
            return self._call("commit", *args, asynchronous=False, **kwargs)
        with self._lock:
            if self._closed:
                raise RuntimeError("Consumer closed")
            if self.inflight and not self._serving:
                self.join()
            self._settle()
            self.conn.send(("cast", "commit", _out(args),
                            _out({**kwargs, "asynchronous": True})))
        return None

    def __getattr__(self, name: str) -> Any:
        # the rest of `Consumer`'s methods that `run` uses are plain requests; the
        # group metadata comes back serialised (bytes), which the transactional
        # producer's send_offsets_to_transaction takes as it is
        if name in _FORWARDED:
            return partial(self._call, name)
        raise AttributeError(name)

    def consume(self, num_messages: int = 1, timeout: float = -1) -> Frame | list:
        """A consume() on the spot (no batch ahead)."""
        with self._lock:
            self.start(num_messages, timeout)
            return self.take()[0]

    def close(self) -> None:
        """Close the consumer (leaving the group: the revoke handler runs here) and end
        the child."""
        with self._lock:
            if self._closed:
                return
            try:
                if self.inflight:
                    self.join()
                    self.slot = None
                self._request(("close",))
            except (OSError, EOFError) as exc:  # the child is gone already
                raise RuntimeError(f"the Kafka fetch process exited (code "
                                   f"{self.process.poll()})") from exc
            finally:
                self._closed = True
                self.conn.close()
                try:
                    self.process.wait(5.0)
                except Exception:
                    self.process.kill()
                if self._mm is not None:
                    self._mm.close()
                    self._mm = None
                os.close(self._memfd)

    # -- one batch ahead ----------------------------------------------------------------

    def ahead(self, num_messages: int, timeout: float) -> FetchProcess:
        """This, as the loop's fetcher: `start()` consumes batches of this size."""
        self._batch = (num_messages, timeout)
        return self

    def start(self, num_messages: int | None = None, timeout: float | None = None) -> None:
        """Consume the next batch now (in the child)."""
        with self._lock:
            if self.inflight:
                self.join()
            self._settle()
            n, t = self._batch
            self.conn.send(("consume", num_messages or n, t if timeout is None else timeout))
            self.inflight, self._ready = True, False

    def _arrived(self, msg: tuple) -> None:
        _, meta, error = msg
        if error is not None:
            try:
                _raise(error)
            except Exception as exc:
                self.slot = exc
        elif not meta["n"]:
            self.slot = []
        else:
            if meta["size"] != self._size:  # the child grew its shared memory
                if self._mm is not None:
                    self._mm.close()
                self._mm = mmap.mmap(self._memfd, meta["size"])
                self._size = meta["size"]
            self.slot = Frame(meta, self._mm)
        self._ready = True

    def join(self) -> None:
        """Wait for the consume() in flight, running the callbacks it hands over."""
        with self._lock:
            if self.inflight and not self._ready:
                self._arrived(self._until(("batch",)))
            self.inflight = False

    def returned(self) -> bool:
        """Whether no consume() is in flight any more, so joining will not wait (a
        callback handed over meanwhile is kept for `join`, not run here)."""
        with self._lock:
            if not self.inflight or self._ready:
                return True
            if self._stash:
                return False
            while self.conn.poll(0):
                msg = self._recv()
                if msg[0] == "batch":
                    self._arrived(msg)
                    return True
                if msg[0] == "callback":
                    self._stash.append(msg)
                    return False
                self._handle(msg)
            return False

    def take(self) -> tuple[Frame | list, None]:
        """The batch consumed last (joined first), [] if none; and no digest (the loop
        takes the runs from the frame's arrays)."""
        self.join()
        result, self.slot = self.slot, None
        if isinstance(result, BaseException):
            raise result
        return (result if result is not None else []), None

    def stop(self) -> None:
        """Join what is in flight (its batch is dropped); the child stays for close()."""
        self.join()
        self.slot = None

    def cpu_seconds(self) -> float:
        """CPU time of the child process so far (Linux /proc; for the benchmarks)."""
        try:
            with open(f"/proc/{self.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0


if __name__ == "__main__":
    # run from the module under its own name, so that what the parent pickles (`_TP`)
    # is unpickled as the same class
    from stream_monitor.kafka import fetch_process
    fetch_process.main(sys.argv)
