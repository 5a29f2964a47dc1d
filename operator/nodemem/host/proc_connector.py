"""Process events (fork, exec, exit) from the kernel's netlink proc connector.

docs/kernel-facts.md#proc-connector. One datagram per event, 76 bytes:

    0   nlmsghdr   len u32, type u16 (NLMSG_DONE), flags u16, seq u32, pid u32
    16  cn_msg     idx u32, val u32, seq u32, ack u32, len u16, flags u16
    36  proc_event what u32, cpu u32, timestamp_ns u64 (at 44: not 8-aligned), union at 52

Fields are decoded by offset, in host byte order. PIDs are init-namespace PIDs.
Subscribing (LISTEN) raises the kernel's global listener count; only an explicit
IGNORE lowers it again (closing the socket does not), so `close()` sends IGNORE.
"""

from __future__ import annotations

import errno
import math
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from enum import IntEnum
from types import TracebackType

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_DONE = 3
SO_RCVBUFFORCE = 33  # not exported by the socket module; needs CAP_NET_ADMIN

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT_HEADER = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_OP = struct.Struct("=I")
_FORK = struct.Struct("=iiii")  # parent pid, parent tgid, child pid, child tgid
_EXEC = struct.Struct("=ii")  # pid, tgid
_EXIT = struct.Struct("=iiIIii")  # pid, tgid, exit_code, exit_signal, parent pid, parent tgid
_ACK = struct.Struct("=I")  # err
_WHAT_ACK = 0
_U32 = 0xFFFFFFFF


class EventType(IntEnum):
    FORK = 0x00000001
    EXEC = 0x00000002
    EXIT = 0x80000000


class ControlOp(IntEnum):
    LISTEN = 1  # PROC_CN_MCAST_LISTEN
    IGNORE = 2  # PROC_CN_MCAST_IGNORE


@dataclass(frozen=True)
class ProcEvent:
    what: EventType
    pid: int  # FORK: the child
    tgid: int
    timestamp_ns: int  # CLOCK_MONOTONIC (ktime_get_ns) at the event
    parent_pid: int | None = None  # FORK and EXIT
    parent_tgid: int | None = None
    exit_code: int | None = None  # EXIT: the wait status (signal, or code << 8)
    exit_signal: int | None = None  # EXIT: signal sent to the parent (SIGCHLD = 17)


@dataclass(frozen=True)
class ProcAck:
    """The kernel's answer to LISTEN/IGNORE; multicast to every listener."""

    err: int  # errno, 0 = accepted
    ack: int  # the request's cn_msg.ack + 1 (identifies the request)


@dataclass(frozen=True)
class LostEvents:
    """Events were dropped (receive buffer overrun): rescan /proc to catch up."""

    reason: str


class ProcConnectorUnavailable(Exception):  # noqa: N818 - a state to fall back from
    """No events can be had; the reason says why. Fall back to periodic rescans."""


def encode_control(op: ControlOp, port_id: int) -> bytes:
    """A LISTEN/IGNORE request. cn_msg.ack carries our port id so the kernel's
    ack (which echoes ack + 1 to every listener) can be told apart from others'."""
    payload = _OP.pack(op)
    total = _NLMSGHDR.size + _CN_MSG.size + len(payload)
    return (
        _NLMSGHDR.pack(total, NLMSG_DONE, 0, 0, port_id & _U32)
        + _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, port_id & _U32, len(payload), 0)
        + payload
    )


def decode(datagram: bytes) -> list[ProcEvent | ProcAck]:
    """The fork/exec/exit events and acks in one datagram (others are dropped).

    A datagram may hold several netlink messages; each is walked by nlmsg_len.
    Raises ValueError for a datagram whose lengths do not add up.
    """
    decoded: list[ProcEvent | ProcAck] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(datagram):
        length, _type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(datagram, offset)
        if length < _NLMSGHDR.size or offset + length > len(datagram):
            raise ValueError(f"netlink message at {offset}: bad length {length}")
        item = _decode_message(datagram[offset + _NLMSGHDR.size : offset + length])
        if item is not None:
            decoded.append(item)
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return decoded


def _decode_message(body: bytes) -> ProcEvent | ProcAck | None:
    if len(body) < _CN_MSG.size:
        return None  # NLMSG_NOOP / NLMSG_ERROR bodies without a connector message
    idx, val, _seq, ack, length, _flags = _CN_MSG.unpack_from(body, 0)
    if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC):
        return None
    event = body[_CN_MSG.size : _CN_MSG.size + length]
    if len(event) != length or length < _EVENT_HEADER.size:
        raise ValueError(f"proc event: cn_msg.len {length}, {len(event)} bytes present")
    what, _cpu, timestamp_ns = _EVENT_HEADER.unpack_from(event, 0)
    data = event[_EVENT_HEADER.size :]
    needed = {
        _WHAT_ACK: _ACK,
        EventType.FORK: _FORK,
        EventType.EXEC: _EXEC,
        EventType.EXIT: _EXIT,
    }.get(what)
    if needed is None:
        return None  # uid, gid, sid, comm, ptrace, coredump: not ours
    if len(data) < needed.size:
        raise ValueError(f"proc event {what:#x}: {len(data)} bytes, needs {needed.size}")
    if what == _WHAT_ACK:
        (err,) = _ACK.unpack_from(data, 0)
        return ProcAck(err=err, ack=ack)
    if what == EventType.FORK:
        parent_pid, parent_tgid, pid, tgid = _FORK.unpack_from(data, 0)
        return ProcEvent(
            EventType.FORK, pid, tgid, timestamp_ns, parent_pid=parent_pid, parent_tgid=parent_tgid
        )
    if what == EventType.EXEC:
        pid, tgid = _EXEC.unpack_from(data, 0)
        return ProcEvent(EventType.EXEC, pid, tgid, timestamp_ns)
    pid, tgid, exit_code, exit_signal, parent_pid, parent_tgid = _EXIT.unpack_from(data, 0)
    return ProcEvent(
        EventType.EXIT,
        pid,
        tgid,
        timestamp_ns,
        parent_pid=parent_pid,
        parent_tgid=parent_tgid,
        exit_code=exit_code,
        exit_signal=exit_signal,
    )


def _why(exc: OSError) -> str:
    if exc.errno == errno.ECONNREFUSED:  # no connector in this network namespace
        return "the kernel serves it only in the node's network namespace: hostNetwork"
    if exc.errno == errno.EPERM:
        return "needs CAP_NET_ADMIN: before 6.6, and on some later kernels (6.18.44 measured)"
    return "see the error"


class ProcConnector:
    """A subscription to process events.

        with ProcConnector() as events:
            loop.add_reader(events.fileno(), ...)   # or events.wait(timeout)
            for item in events.read_events(): ...   # ProcEvent or LostEvents

    Entering subscribes (raises ProcConnectorUnavailable); leaving sends IGNORE and
    closes. `acknowledged` is False when the kernel never answered LISTEN: a task
    outside the initial user/PID namespace is ignored silently, yet may still receive
    events while another listener keeps the count up — unreliable, so say so.
    """

    def __init__(self, receive_buffer: int = 8 << 20, ack_timeout: float = 0.5) -> None:
        self._requested_buffer = receive_buffer
        self._ack_timeout = ack_timeout
        self._sock: socket.socket | None = None
        self._pending: list[ProcEvent | LostEvents] = []
        self.port_id = 0
        self.acknowledged = False
        self.receive_buffer = 0  # as the kernel set it (SO_RCVBUF reads back doubled)

    def __enter__(self) -> ProcConnector:
        self.subscribe()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def subscribe(self) -> None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as exc:
            raise ProcConnectorUnavailable(f"no netlink connector socket: {exc}") from exc
        try:
            self._set_receive_buffer(sock)
            sock.bind((0, CN_IDX_PROC))  # port id 0: the kernel assigns one
            self.port_id = sock.getsockname()[0]
            sock.setblocking(False)
            sock.sendto(encode_control(ControlOp.LISTEN, self.port_id), (0, 0))
        except OSError as exc:
            sock.close()
            raise ProcConnectorUnavailable(
                f"cannot subscribe to process events: {exc} ({_why(exc)})"
            ) from exc
        self._sock = sock
        self._await_ack()

    def _set_receive_buffer(self, sock: socket.socket) -> None:
        # A burst of execs must not overrun the buffer; FORCE passes net.core.rmem_max.
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self._requested_buffer)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._requested_buffer)
        self.receive_buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def _await_ack(self) -> None:
        """Wait briefly for our LISTEN's ack; keep events that arrive meanwhile."""
        expected = (self.port_id + 1) & _U32
        deadline = time.monotonic() + self._ack_timeout
        while not self.acknowledged:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.wait(remaining):
                return
            for item in self._receive():
                if isinstance(item, ProcAck):
                    if item.ack != expected:
                        continue  # another listener's request
                    if item.err != 0:
                        self._close(unsubscribe=False)  # nothing was subscribed
                        raise ProcConnectorUnavailable(
                            f"the kernel refused LISTEN: {os.strerror(item.err)}"
                        )
                    self.acknowledged = True
                else:
                    self._pending.append(item)

    def fileno(self) -> int:
        return self._socket().fileno()

    def wait(self, timeout: float | None) -> bool:
        """Whether something can be read within `timeout` seconds (None: no limit)."""
        poller = select.poll()
        poller.register(self._socket(), select.POLLIN | select.POLLERR)
        milliseconds = None if timeout is None else max(0, math.ceil(timeout * 1000))
        return bool(poller.poll(milliseconds))

    def read_events(self) -> list[ProcEvent | LostEvents]:
        """Every event available now, without blocking (acks are dropped)."""
        events, self._pending = self._pending, []
        events.extend(item for item in self._receive() if not isinstance(item, ProcAck))
        return events

    def _receive(self) -> list[ProcEvent | ProcAck | LostEvents]:
        sock = self._socket()
        items: list[ProcEvent | ProcAck | LostEvents] = []
        while True:
            try:
                datagram, (sender, _groups) = sock.recvfrom(65536)
            except BlockingIOError:
                return items
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # The kernel dropped events; the socket keeps working after reporting it.
                items.append(LostEvents("receive buffer overrun (ENOBUFS)"))
                continue
            if sender != 0:
                continue  # only the kernel speaks for the proc connector
            try:
                items.extend(decode(datagram))
            except ValueError as exc:
                items.append(LostEvents(f"undecodable datagram: {exc}"))

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise ValueError("the proc connector is not subscribed")
        return self._sock

    def close(self) -> None:
        """Unsubscribe (IGNORE) and close; safe to call twice."""
        self._close(unsubscribe=True)

    def _close(self, *, unsubscribe: bool) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            if unsubscribe:
                sock.sendto(encode_control(ControlOp.IGNORE, self.port_id), (0, 0))
        except OSError:
            pass  # the socket goes away anyway; the kernel's count stays one too high
        finally:
            sock.close()
