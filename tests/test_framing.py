"""Tests of the framing core: pack, unpack_header and FrameParser.

Most tests take the `framing` fixture from conftest.py, so they run once
against the pure-Python twin and once against the C core. Tests named
*_match_twin compare results and exceptions of the live module with the twin.
"""

import array
import mmap
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gaspar.framing
from gaspar import _framing_py
from gaspar._constants import DEFAULT_MAX_REQUEST_SIZE, HEADER_SIZE, MAX_FRAME_SIZE
from gaspar.errors import FrameError, FrameTooLarge

REPO_ROOT = Path(__file__).resolve().parent.parent

UNUSABLE_MESSAGE = "parser is unusable after an earlier error"

# A stream of several frames, empty ones included, used by the split tests.
STREAM_PAYLOADS = [b"abc", b"", b"\x00\xff" * 3, b"", b"", b"z"]


def encode(payload: bytes) -> bytes:
    """Frame a payload without the code under test, as a reference."""
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


def encode_all(payloads) -> bytes:
    return b"".join(encode(payload) for payload in payloads)


def feed_chunks(framing, chunks, **parser_options):
    parser = framing.FrameParser(**parser_options)
    for chunk in chunks:
        parser.feed(chunk)
    return parser


def receive_with_buffers(parser, data: bytes, read_size: int) -> None:
    """Deliver ``data`` through get_buffer()/buffer_updated(), at most ``read_size`` bytes a call."""
    position = 0
    while position < len(data):
        view = parser.get_buffer()
        count = min(len(view), read_size, len(data) - position)
        view[:count] = data[position : position + count]
        parser.buffer_updated(count)
        position += count


def raised(call):
    """Return the exception that ``call()`` raises; fail when it returns."""
    try:
        call()
    except Exception as error:
        return error
    pytest.fail("the call returned instead of raising")


# pack and unpack_header


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65536])
def test_pack_round_trip(framing, size):
    payload = bytes(index % 251 for index in range(size))

    frame = framing.pack(payload)

    assert type(frame) is bytes
    assert frame == encode(payload)
    assert framing.unpack_header(frame) == size
    assert frame[HEADER_SIZE:] == payload


def test_pack_every_byte_value(framing):
    payload = bytes(range(256)) * 3

    frame = framing.pack(payload)

    assert framing.unpack_header(frame) == len(payload)
    assert frame[HEADER_SIZE:] == payload


def test_pack_buffer_types(framing):
    raw = bytes(range(24))
    buffers = [
        bytearray(raw),
        memoryview(raw),
        memoryview(raw)[4:12],
        memoryview(bytearray(raw)).cast("B", (4, 6)),
        array.array("i", [1, 2, 3]),
    ]

    for buffer in buffers:
        expected = memoryview(buffer).tobytes()
        assert framing.pack(buffer) == encode(expected), type(buffer)


def test_pack_str_rejected(framing):
    with pytest.raises(TypeError, match="not str. Encode the text to bytes first"):
        framing.pack("text")


@pytest.mark.parametrize("value", [7, None, [1, 2]])
def test_pack_non_buffer_rejected(framing, value):
    with pytest.raises(TypeError, match=f"message must be a bytes-like object, not {type(value).__name__}"):
        framing.pack(value)


def test_pack_non_contiguous_rejected(framing):
    with pytest.raises(BufferError, match="C-contiguous"):
        framing.pack(memoryview(b"abcdef")[::2])


def test_pack_too_large(framing):
    # An anonymous mapping reserves address space, and pages are only
    # allocated when touched, so this costs no memory unless pack() copies.
    try:
        huge = mmap.mmap(-1, MAX_FRAME_SIZE + 1)
    except (OSError, OverflowError, ValueError) as error:
        pytest.skip(f"cannot map {MAX_FRAME_SIZE + 1} bytes of address space: {error}")

    with huge:
        with pytest.raises(FrameTooLarge) as caught:
            framing.pack(huge)

    assert caught.value.size == MAX_FRAME_SIZE + 1
    assert caught.value.max_size == MAX_FRAME_SIZE
    assert str(caught.value) == f"frame of {MAX_FRAME_SIZE + 1} bytes exceeds the maximum of {MAX_FRAME_SIZE} bytes"


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_unpack_header_short(framing, length):
    with pytest.raises(FrameError) as caught:
        framing.unpack_header(b"\x00" * length)

    assert str(caught.value) == f"frame header needs 4 bytes, got {length}"


def test_unpack_header_extra_bytes(framing):
    assert framing.unpack_header(b"\x00\x00\x01\x02" + b"rest of the frame") == 258


def test_unpack_header_byte_order(framing):
    assert framing.unpack_header(b"\x01\x02\x03\x04") == 0x01020304
    assert framing.unpack_header(bytearray(b"\xff\xff\xff\xff")) == MAX_FRAME_SIZE
    assert framing.unpack_header(memoryview(b"\x00\x00\x00\x00")) == 0


@pytest.mark.parametrize("value", ["abcd", 1234, None])
def test_unpack_header_non_buffer(framing, value):
    with pytest.raises(TypeError, match="buffer must be a bytes-like object"):
        framing.unpack_header(value)


# FrameParser construction


def test_parser_default_max_size(framing):
    parser = framing.FrameParser()

    assert parser.max_size == DEFAULT_MAX_REQUEST_SIZE
    assert parser.buffered == 0
    assert parser.frame_size == -1
    assert parser.next_frame() is None


@pytest.mark.parametrize("max_size", [0, 1, MAX_FRAME_SIZE])
def test_parser_max_size_accepted(framing, max_size):
    assert framing.FrameParser(max_size).max_size == max_size
    assert framing.FrameParser(max_size=max_size).max_size == max_size


@pytest.mark.parametrize("max_size", [-1, MAX_FRAME_SIZE + 1, 2**70])
def test_parser_max_size_out_of_range(framing, max_size):
    with pytest.raises(ValueError) as caught:
        framing.FrameParser(max_size)

    assert str(max_size) in str(caught.value)
    assert not isinstance(caught.value, TypeError)


@pytest.mark.parametrize("max_size", [True, 1.0, "10", None])
def test_parser_max_size_wrong_type(framing, max_size):
    with pytest.raises(TypeError, match=f"max_size must be an int, not {type(max_size).__name__}"):
        framing.FrameParser(max_size)


def test_parser_properties_read_only(framing):
    parser = framing.FrameParser()

    for name in ["max_size", "buffered", "frame_size"]:
        with pytest.raises(AttributeError):
            setattr(parser, name, 1)


# FrameParser.feed


def test_parser_feed_whole(framing):
    parser = feed_chunks(framing, [encode_all(STREAM_PAYLOADS)])

    assert list(parser) == STREAM_PAYLOADS
    assert parser.buffered == 0
    assert parser.frame_size == -1


def test_parser_payload_type(framing):
    parser = feed_chunks(framing, [encode_all([b"abc", b""])])

    first = parser.next_frame()
    empty = parser.next_frame()

    assert type(first) is bytearray
    assert type(empty) is bytearray
    assert empty == bytearray()


def test_parser_feed_byte_at_a_time(framing):
    payloads = [b"hello", b"", b"xy"]
    stream = encode_all(payloads)
    parser = framing.FrameParser()
    # Expected (buffered, frame_size) after each byte of the stream.
    expected_states = [
        (1, -1), (2, -1), (3, -1), (4, 5),
        (5, 5), (6, 5), (7, 5), (8, 5), (0, -1),
        (1, -1), (2, -1), (3, -1), (0, -1),
        (1, -1), (2, -1), (3, -1), (4, 2),
        (5, 2), (0, -1),
    ]  # fmt: skip
    assert len(expected_states) == len(stream)

    completed = []
    for index, expected_state in enumerate(expected_states):
        parser.feed(stream[index : index + 1])
        assert (parser.buffered, parser.frame_size) == expected_state, f"after byte {index}"
        completed.extend(parser)

    assert completed == payloads


def test_parser_feed_every_split(framing):
    stream = encode_all(STREAM_PAYLOADS)

    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            chunks = [stream[:first], stream[first:second], stream[second:]]
            parser = feed_chunks(framing, chunks)
            assert list(parser) == STREAM_PAYLOADS, f"cut at {first} and {second}"
            assert parser.buffered == 0


def test_parser_trailing_partial_frame(framing):
    stream = encode_all([b"one", b"two"]) + encode(b"three")[:6]

    parser = feed_chunks(framing, [stream])

    assert list(parser) == [b"one", b"two"]
    assert parser.buffered == 6
    assert parser.frame_size == 5

    parser.feed(b"ree" + encode(b"four")[:2])

    assert list(parser) == [b"three"]
    assert parser.buffered == 2
    assert parser.frame_size == -1


def test_parser_several_frames_one_feed(framing):
    payloads = [bytes([index]) * index for index in range(50)]

    parser = feed_chunks(framing, [encode_all(payloads)])

    assert list(parser) == payloads


def test_parser_zero_length_alone(framing):
    parser = feed_chunks(framing, [encode(b"")])

    assert parser.buffered == 0
    assert parser.frame_size == -1
    assert parser.next_frame() == bytearray()
    assert parser.next_frame() is None


def test_parser_zero_length_between(framing):
    payloads = [b"", b"a", b"", b"", b"bc", b""]

    parser = feed_chunks(framing, [encode_all(payloads)])

    assert list(parser) == payloads


def test_parser_feed_empty(framing):
    parser = framing.FrameParser()

    parser.feed(b"")
    parser.feed(bytearray())
    parser.feed(encode(b"abc")[:2])
    parser.feed(memoryview(b""))

    assert parser.buffered == 2
    assert parser.next_frame() is None


def test_parser_feed_buffer_types(framing):
    stream = encode_all([b"abcd", b"efgh"])
    parser = framing.FrameParser()

    parser.feed(bytearray(stream[:3]))
    parser.feed(memoryview(stream)[3:9])
    parser.feed(array.array("B", stream[9:]))

    assert list(parser) == [b"abcd", b"efgh"]


def test_parser_feed_rejects_str(framing):
    parser = framing.FrameParser()

    with pytest.raises(TypeError, match="data must be a bytes-like object, not str"):
        parser.feed("\x00\x00\x00\x00")

    parser.feed(encode(b"still usable"))
    assert parser.next_frame() == b"still usable"


def test_parser_many_small_frames_fast(framing):
    # 50,000 frames in one 1 MB buffer. A parser that re-slices or rescans
    # the remaining buffer per frame copies about 25 GB here and fails the
    # bound, while a linear one needs well under a second even in Python.
    payloads = [index.to_bytes(4, "big") * 3 for index in range(50_000)]
    stream = encode_all(payloads)
    parser = framing.FrameParser()

    started = time.perf_counter()
    parser.feed(stream)
    result = list(parser)
    elapsed = time.perf_counter() - started

    assert result == payloads
    assert elapsed < 5.0


def test_parser_queue_order(framing):
    # Reading fewer payloads than are fed keeps a long queue that the reader
    # never empties, which exercises the C core's queue compaction.
    parser = framing.FrameParser()
    produced = []
    consumed = []

    for index in range(6_000):
        batch = [index.to_bytes(4, "big"), b""]
        produced.extend(batch)
        parser.feed(encode_all(batch))
        consumed.append(parser.next_frame())
    consumed.extend(parser)

    assert consumed == produced


# Iteration


def test_parser_next_frame_none(framing):
    parser = framing.FrameParser()
    parser.feed(encode(b"abc")[:5])

    assert parser.next_frame() is None


def test_parser_iterator_protocol(framing):
    parser = framing.FrameParser()

    assert iter(parser) is parser
    with pytest.raises(StopIteration):
        next(parser)

    parser.feed(encode_all([b"a", b"b"]))

    assert next(parser) == b"a"
    assert parser.next_frame() == b"b"
    with pytest.raises(StopIteration):
        next(parser)

    parser.feed(encode(b"c"))
    assert list(parser) == [b"c"]


# max_size and the unusable state


def test_parser_max_size_equal_passes(framing):
    parser = feed_chunks(framing, [encode(b"x" * 10)], max_size=10)

    assert list(parser) == [b"x" * 10]


def test_parser_max_size_exceeded(framing):
    parser = framing.FrameParser(max_size=10)

    with pytest.raises(FrameTooLarge) as caught:
        parser.feed((11).to_bytes(4, "big"))

    assert caught.value.size == 11
    assert caught.value.max_size == 10
    assert str(caught.value) == "frame of 11 bytes exceeds the maximum of 10 bytes"


def test_parser_max_size_zero(framing):
    parser = feed_chunks(framing, [encode_all([b"", b""])], max_size=0)

    assert list(parser) == [b"", b""]
    with pytest.raises(FrameTooLarge):
        parser.feed(encode(b"a"))


def test_parser_rejects_before_allocation(framing):
    # The body buffer of a 1 MiB frame would show up in the traced peak.
    max_size = 1024 * 1024
    parser = framing.FrameParser(max_size=max_size)
    header = (max_size + 1).to_bytes(4, "big")

    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            parser.feed(header + b"body bytes")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < max_size // 4


def test_parser_max_header_default_limit(framing):
    # 0xFFFFFFFF is rejected from the header alone, so no 4 GiB buffer is made.
    parser = framing.FrameParser()

    started = time.perf_counter()
    with pytest.raises(FrameTooLarge) as caught:
        parser.feed(b"\xff\xff\xff\xff")
    elapsed = time.perf_counter() - started

    assert caught.value.size == MAX_FRAME_SIZE
    assert caught.value.max_size == DEFAULT_MAX_REQUEST_SIZE
    assert elapsed < 0.5


def test_parser_max_header_split(framing):
    parser = framing.FrameParser()
    parser.feed(b"\xff\xff")

    with pytest.raises(FrameTooLarge):
        parser.feed(b"\xff\xff")


def test_parser_unusable_after_error(framing):
    parser = framing.FrameParser(max_size=3)
    with pytest.raises(FrameTooLarge):
        parser.feed(encode_all([b"ok", b"four"]))

    for call in [
        lambda: parser.feed(encode(b"a")),
        lambda: parser.feed(b""),
        parser.get_buffer,
        lambda: parser.buffer_updated(0),
    ]:
        error = raised(call)
        assert type(error) is FrameError
        assert str(error) == UNUSABLE_MESSAGE

    # Payloads completed before the error can still be read.
    assert list(parser) == [b"ok"]
    assert parser.frame_size == 4
    assert parser.buffered == 4


def test_parser_unusable_after_buffer_error(framing):
    parser = framing.FrameParser(max_size=3)
    view = parser.get_buffer()
    view[:] = (4).to_bytes(4, "big")

    with pytest.raises(FrameTooLarge):
        parser.buffer_updated(4)

    with pytest.raises(FrameError, match=UNUSABLE_MESSAGE):
        parser.get_buffer()


# get_buffer and buffer_updated


def test_parser_get_buffer_header_split(framing):
    parser = framing.FrameParser()

    view = parser.get_buffer()
    assert len(view) == 4
    assert not view.readonly
    view[:2] = b"\x00\x00"
    parser.buffer_updated(2)
    assert (parser.buffered, parser.frame_size) == (2, -1)

    view = parser.get_buffer()
    assert len(view) == 2
    view[:1] = b"\x00"
    parser.buffer_updated(1)
    assert (parser.buffered, parser.frame_size) == (3, -1)

    view = parser.get_buffer()
    assert len(view) == 1
    view[:] = b"\x03"
    parser.buffer_updated(1)
    assert (parser.buffered, parser.frame_size) == (4, 3)

    view = parser.get_buffer()
    assert len(view) == 3
    view[:] = b"abc"
    parser.buffer_updated(3)
    assert (parser.buffered, parser.frame_size) == (0, -1)
    assert parser.next_frame() == b"abc"


def test_parser_get_buffer_body_many_reads(framing):
    payload = bytes(range(256)) * 40
    parser = framing.FrameParser()
    receive_with_buffers(parser, encode(payload)[:HEADER_SIZE], read_size=4)

    received = 0
    while received < len(payload):
        view = parser.get_buffer()
        assert len(view) == len(payload) - received
        count = min(len(view), 97)
        view[:count] = payload[received : received + count]
        parser.buffer_updated(count)
        received += count
        if received < len(payload):
            assert parser.buffered == HEADER_SIZE + received
            assert parser.frame_size == len(payload)

    assert parser.buffered == 0
    assert list(parser) == [payload]


def test_parser_payload_is_body_buffer(framing):
    # The payload is the bytearray that recv_into() wrote, not a copy.
    parser = framing.FrameParser()
    receive_with_buffers(parser, encode(b"abc")[:HEADER_SIZE], read_size=4)

    view = parser.get_buffer()
    view[:] = b"abc"
    parser.buffer_updated(3)
    payload = parser.next_frame()

    assert payload == b"abc"
    assert view.obj is payload


def test_parser_get_buffer_zero_length(framing):
    parser = framing.FrameParser()
    view = parser.get_buffer()
    view[:] = encode(b"")

    parser.buffer_updated(4)

    assert parser.buffered == 0
    assert parser.next_frame() == b""
    assert len(parser.get_buffer()) == 4


def test_parser_get_buffer_repeated(framing):
    # A second get_buffer() replaces the first view, as in asyncio.
    parser = framing.FrameParser()
    parser.feed(b"\x00")

    assert len(parser.get_buffer()) == 3
    assert len(parser.get_buffer()) == 3
    assert parser.buffered == 1


def test_parser_feed_then_recv_into(framing):
    payloads = [b"a" * 100, b"b" * 70_000, b"", b"c"]
    stream = encode_all(payloads)
    parser = framing.FrameParser()

    parser.feed(stream[:1000])
    receive_with_buffers(parser, stream[1000:50_000], read_size=4096)
    parser.feed(stream[50_000:50_003])
    receive_with_buffers(parser, stream[50_003:], read_size=7)

    assert list(parser) == payloads
    assert parser.buffered == 0


def test_parser_recv_into_then_feed(framing):
    payloads = [b"x" * 10, b"y" * 10]
    stream = encode_all(payloads)
    parser = framing.FrameParser()

    receive_with_buffers(parser, stream[:2], read_size=2)
    parser.feed(stream[2:9])
    receive_with_buffers(parser, stream[9:20], read_size=3)
    parser.feed(stream[20:])

    assert list(parser) == payloads


def test_parser_buffer_updated_zero(framing):
    parser = framing.FrameParser()
    parser.feed(encode(b"abc")[:5])

    parser.get_buffer()
    parser.buffer_updated(0)

    assert (parser.buffered, parser.frame_size) == (5, 3)
    assert len(parser.get_buffer()) == 2


@pytest.mark.parametrize("nbytes", [-1, 4, 2**64])
def test_parser_buffer_updated_out_of_range(framing, nbytes):
    parser = framing.FrameParser()
    parser.feed(b"\x00")
    parser.get_buffer()

    with pytest.raises(ValueError) as caught:
        parser.buffer_updated(nbytes)

    message = str(caught.value)
    assert str(nbytes) in message
    assert "between 0 and 3" in message
    assert parser.buffered == 1


@pytest.mark.parametrize("nbytes", [True, 1.0, None])
def test_parser_buffer_updated_wrong_type(framing, nbytes):
    parser = framing.FrameParser()
    parser.get_buffer()

    with pytest.raises(TypeError, match=f"nbytes must be an int, not {type(nbytes).__name__}"):
        parser.buffer_updated(nbytes)


def test_parser_buffer_updated_without_view(framing):
    parser = framing.FrameParser()

    with pytest.raises(FrameError, match="Call get_buffer\\(\\) first"):
        parser.buffer_updated(0)


def test_parser_buffer_updated_once_per_view(framing):
    parser = framing.FrameParser()
    parser.get_buffer()
    parser.buffer_updated(1)

    with pytest.raises(FrameError, match="Call get_buffer\\(\\) first"):
        parser.buffer_updated(1)
    assert parser.buffered == 1


def test_parser_feed_drops_view(framing):
    # feed() moves the position, so a view taken before it is stale.
    parser = framing.FrameParser()
    parser.get_buffer()
    parser.feed(b"\x00")

    with pytest.raises(FrameError, match="Call get_buffer\\(\\) first"):
        parser.buffer_updated(1)

    # Errors in the arguments do not make the parser unusable.
    parser.feed(b"\x00\x00\x01z")
    assert list(parser) == [b"z"]


def test_parser_socketpair(framing):
    # Mirror the daemon: one 64 KiB recv() fed, then recv_into() until EOF.
    payloads = [os.urandom(size) for size in [0, 1, 100, 70_000, 0, 5, 300_000, 3]]
    stream = encode_all(payloads)
    receiver, sender = socket.socketpair()
    receiver.settimeout(10)
    sender.settimeout(10)

    def send_in_pieces():
        with sender:
            for start in range(0, len(stream), 12_345):
                sender.sendall(stream[start : start + 12_345])

    thread = threading.Thread(target=send_in_pieces)
    thread.start()
    try:
        with receiver:
            parser = framing.FrameParser()
            parser.feed(receiver.recv(65536))
            while True:
                count = receiver.recv_into(parser.get_buffer())
                parser.buffer_updated(count)
                if count == 0:
                    break
    finally:
        thread.join(timeout=10)

    assert not thread.is_alive()
    assert parser.buffered == 0
    assert list(parser) == payloads


# Randomised streams

payload_lists = st.lists(st.binary(max_size=3000), max_size=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads=payload_lists, data=st.data())
def test_parser_random_splits(framing, payloads, data):
    stream = encode_all(payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[start:end] for start, end in zip(bounds, bounds[1:])]

    result = list(feed_chunks(framing, chunks))
    twin_result = list(feed_chunks(_framing_py, chunks))

    assert result == payloads
    assert twin_result == payloads


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads=payload_lists, data=st.data())
def test_parser_random_mixed_delivery(framing, payloads, data):
    stream = encode_all(payloads)
    parser = framing.FrameParser()
    position = 0

    while position < len(stream):
        count = data.draw(st.integers(1, len(stream) - position), label="count")
        if data.draw(st.booleans(), label="feed"):
            parser.feed(stream[position : position + count])
        else:
            view = parser.get_buffer()
            count = min(count, len(view))
            view[:count] = stream[position : position + count]
            parser.buffer_updated(count)
        position += count

    assert parser.buffered == 0
    assert list(parser) == payloads


# Agreement between the implementations


def make_broken_parser(module):
    parser = module.FrameParser(max_size=1)
    try:
        parser.feed(b"\x00\x00\x00\x02")
    except FrameTooLarge:
        return parser
    pytest.fail("a 2-byte frame with max_size=1 did not raise FrameTooLarge")


def parser_with_view(module):
    parser = module.FrameParser()
    parser.feed(b"\x00")
    parser.get_buffer()
    return parser


ERROR_CASES = {
    "pack_str": lambda m: m.pack("text"),
    "pack_int": lambda m: m.pack(5),
    "pack_none": lambda m: m.pack(None),
    "pack_strided": lambda m: m.pack(memoryview(b"abcdef")[::2]),
    "unpack_empty": lambda m: m.unpack_header(b""),
    "unpack_three": lambda m: m.unpack_header(b"abc"),
    "unpack_str": lambda m: m.unpack_header("abcd"),
    "unpack_none": lambda m: m.unpack_header(None),
    "max_size_negative": lambda m: m.FrameParser(-1),
    "max_size_huge": lambda m: m.FrameParser(MAX_FRAME_SIZE + 1),
    "max_size_bool": lambda m: m.FrameParser(True),
    "max_size_float": lambda m: m.FrameParser(1.5),
    "max_size_str": lambda m: m.FrameParser("64"),
    "feed_str": lambda m: m.FrameParser().feed("text"),
    "feed_none": lambda m: m.FrameParser().feed(None),
    "feed_strided": lambda m: m.FrameParser().feed(memoryview(b"abcdef")[::2]),
    "feed_too_large": lambda m: m.FrameParser(max_size=5).feed(encode(b"123456")),
    "header_too_large": lambda m: m.FrameParser().feed(b"\xff\xff\xff\xff"),
    "updated_no_view": lambda m: m.FrameParser().buffer_updated(0),
    "updated_negative": lambda m: parser_with_view(m).buffer_updated(-1),
    "updated_too_many": lambda m: parser_with_view(m).buffer_updated(4),
    "updated_bool": lambda m: parser_with_view(m).buffer_updated(False),
    "updated_float": lambda m: parser_with_view(m).buffer_updated(1.0),
    "broken_feed": lambda m: make_broken_parser(m).feed(b""),
    "broken_get_buffer": lambda m: make_broken_parser(m).get_buffer(),
    "broken_updated": lambda m: make_broken_parser(m).buffer_updated(0),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_match_twin(framing, case):
    error = raised(lambda: ERROR_CASES[case](framing))
    twin_error = raised(lambda: ERROR_CASES[case](_framing_py))

    assert type(error) is type(twin_error)
    assert str(error) == str(twin_error)
    assert error.args == twin_error.args


def test_results_match_twin(framing):
    payloads = [b"", b"a", bytes(range(256)), b"\x00" * 70_000]
    stream = encode_all(payloads)

    for payload in payloads:
        assert framing.pack(payload) == _framing_py.pack(payload)
    assert framing.unpack_header(stream) == _framing_py.unpack_header(stream)

    parser = framing.FrameParser()
    twin = _framing_py.FrameParser()
    for start in range(0, len(stream), 999):
        parser.feed(stream[start : start + 999])
        twin.feed(stream[start : start + 999])
        assert (parser.buffered, parser.frame_size) == (twin.buffered, twin.frame_size)
    assert list(parser) == list(twin) == payloads


# The public switch in gaspar.framing


def run_python(code: str, **environment: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **environment},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.skipif(platform.python_implementation() != "CPython", reason="the C core needs CPython")
def test_framing_implementation_live():
    if os.environ.get("GASPAR_NO_EXTENSIONS") == "1":
        assert gaspar.framing.IMPLEMENTATION == "python"
        assert gaspar.framing.FrameParser is _framing_py.FrameParser
    else:
        from gaspar import _framing

        assert gaspar.framing.IMPLEMENTATION == "c"
        assert gaspar.framing.FrameParser is _framing.FrameParser
        assert gaspar.framing.pack is _framing.pack
        assert gaspar.framing.unpack_header is _framing.unpack_header


def test_framing_env_forces_python():
    code = "import gaspar.framing as f; print(f.IMPLEMENTATION, f.FrameParser.__module__)"

    assert run_python(code, GASPAR_NO_EXTENSIONS="1") == "python gaspar._framing_py"


def test_framing_missing_extension_fallback():
    # A None entry in sys.modules makes `from gaspar import _framing` raise ImportError.
    code = (
        "import sys; sys.modules['gaspar._framing'] = None; "
        "import gaspar.framing as f; print(f.IMPLEMENTATION)"
    )

    assert run_python(code, GASPAR_NO_EXTENSIONS="0") == "python"


def test_framing_benchmark_quick():
    output = run_python("from benchmarks.framing_bench import main; main(['--quick'])")

    assert "parse 10,000 16 B frames" in output
    assert "µs/op" in output
