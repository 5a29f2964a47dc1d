"""Decoding hand-built proc connector datagrams (layout: docs/kernel-facts.md#proc-connector)."""

from __future__ import annotations

import struct

import pytest

from nodemem.host.proc_connector import (
    ControlOp,
    EventType,
    ProcAck,
    ProcEvent,
    decode,
    encode_control,
)

# Every byte different, so a misplaced or misaligned read cannot come out right.
TIMESTAMP = 0x0102030405060708


def _datagram(what: int, union: bytes, *, cn_ack: int = 0, idx: int = 1) -> bytes:
    event = struct.pack("=IIQ", what, 1, TIMESTAMP) + union.ljust(24, b"\0")
    assert len(event) == 40
    cn_msg = struct.pack("=IIIIHH", idx, 1, 7, cn_ack, len(event), 0)
    total = 16 + len(cn_msg) + len(event)
    return struct.pack("=IHHII", total, 3, 0, 5, 0) + cn_msg + event


def test_layout_is_76_bytes_with_the_timestamp_at_44() -> None:
    datagram = _datagram(0x2, struct.pack("=ii", 1234, 1234))
    assert len(datagram) == 76
    assert struct.unpack_from("=I", datagram, 36)[0] == 0x2
    assert datagram[44:52] == struct.pack("=Q", TIMESTAMP)  # not 8-byte aligned
    assert struct.unpack_from("=i", datagram, 52)[0] == 1234


def test_fork() -> None:
    union = struct.pack("=iiii", 100, 100, 4242, 4243)
    assert decode(_datagram(0x1, union)) == [
        ProcEvent(EventType.FORK, 4242, 4243, TIMESTAMP, parent_pid=100, parent_tgid=100)
    ]


def test_exec() -> None:
    assert decode(_datagram(0x2, struct.pack("=ii", 4242, 4241))) == [
        ProcEvent(EventType.EXEC, 4242, 4241, TIMESTAMP)
    ]


def test_exit() -> None:
    union = struct.pack("=iiIIii", 4242, 4242, 9, 17, 100, 99)
    [event] = decode(_datagram(0x80000000, union))
    assert event == ProcEvent(
        EventType.EXIT,
        4242,
        4242,
        TIMESTAMP,
        parent_pid=100,
        parent_tgid=99,
        exit_code=9,
        exit_signal=17,
    )


def test_ack() -> None:
    assert decode(_datagram(0x0, struct.pack("=I", 0), cn_ack=5929)) == [ProcAck(0, 5929)]
    assert decode(_datagram(0x0, struct.pack("=I", 1), cn_ack=2)) == [ProcAck(1, 2)]


@pytest.mark.parametrize("what", [0x4, 0x40, 0x80, 0x100, 0x200, 0x40000000])
def test_other_events_are_dropped(what: int) -> None:
    assert decode(_datagram(what, b"\x01" * 24)) == []


def test_other_connector_ids_are_dropped() -> None:
    assert decode(_datagram(0x2, struct.pack("=ii", 1, 1), idx=2)) == []


def test_several_messages_in_one_datagram() -> None:
    exec_event = _datagram(0x2, struct.pack("=ii", 10, 10))
    exit_event = _datagram(0x80000000, struct.pack("=iiIIii", 10, 10, 0, 17, 1, 1))
    decoded = decode(exec_event + exit_event)
    assert [(e.what, e.pid) for e in decoded if isinstance(e, ProcEvent)] == [
        (EventType.EXEC, 10),
        (EventType.EXIT, 10),
    ]


@pytest.mark.parametrize(
    "datagram",
    [
        _datagram(0x2, b"")[:60],  # nlmsg_len beyond the datagram
        struct.pack("=IHHII", 8, 3, 0, 0, 0) + b"\0" * 60,  # nlmsg_len shorter than its header
    ],
)
def test_malformed_datagrams_raise(datagram: bytes) -> None:
    with pytest.raises(ValueError):
        decode(datagram)


def test_truncated_event_raises() -> None:
    datagram = bytearray(_datagram(0x80000000, b""))
    struct.pack_into("=H", datagram, 16 + 16, 20)  # cn_msg.len = 20: exit data cut short
    struct.pack_into("=I", datagram, 0, 16 + 20 + 20)
    with pytest.raises(ValueError):
        decode(bytes(datagram[: 16 + 20 + 20]))


def test_listen_and_ignore_requests() -> None:
    listen = encode_control(ControlOp.LISTEN, 5928)
    assert len(listen) == 40
    assert struct.unpack_from("=IHHII", listen, 0) == (40, 3, 0, 0, 5928)
    assert struct.unpack_from("=IIIIHH", listen, 16) == (1, 1, 0, 5928, 4, 0)
    assert struct.unpack_from("=I", listen, 36) == (1,)
    assert struct.unpack_from("=I", encode_control(ControlOp.IGNORE, 5928), 36) == (2,)
    # autobound port ids are negative in the kernel; they go out as their u32 bits
    assert struct.unpack_from("=I", encode_control(ControlOp.LISTEN, -4097), 12) == (2**32 - 4097,)
