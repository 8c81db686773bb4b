"""Shared memory in the sans-IO core: shared_empty/shared_copy, the encoder's references, and
the decoder's checks of every descriptor a peer hands it, with real memfds, pipes and files.

The transports that carry the descriptors over Unix sockets between processes are tested in
test_shared_transport.py; here a test plays the socket: it hands the decoder descriptors with
``feed_descriptors`` and the bytes with ``feed``, as a transport does after ``recvmsg``.
Every refusal is checked to leave no descriptor open and the decoder failed for good.
"""

from __future__ import annotations

import fcntl
import gc
import os
import pickle
import struct
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import streampickle
from _util import smaps_kib, smaps_of
from streampickle import (
    Decoder,
    Encoder,
    LimitExceededError,
    Limits,
    ProtocolError,
    UsageError,
    _shm,
    _wire,
)

pytestmark = pytest.mark.skipif(not _shm.AVAILABLE, reason="needs memfd and file seals (Linux)")

PAGE = os.sysconf("SC_PAGE_SIZE")
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def open_fds() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_leak() -> Iterator[None]:
    """The test leaves exactly as many descriptors open as it found."""
    before = open_fds()
    yield
    assert open_fds() == before


def wire_of(chunks: list[Any]) -> bytes:
    return b"".join(bytes(memoryview(c).cast("B")) for c in chunks)


def send(obj: Any, decoder: Decoder | None = None) -> Any:
    """Encode ``obj`` with shared memory and decode it as a peer would: the descriptors are
    duplicated (as the kernel does when they cross a socket) and handed over first."""
    chunks = Encoder(shared_memory=True).encode(obj)
    decoder = decoder or Decoder(shared_memory=True)
    decoder.feed_descriptors([os.dup(fd) for fd in _shm.descriptors_of(chunks)])
    decoder.feed(wire_of(chunks))
    return next(decoder)


def in_shared_memory(array: np.ndarray[Any, Any]) -> bool:
    return _shm.find([memoryview(array.ravel(order="K")).cast("B")])[0] is not None


def address_of(buffer: Any) -> int:
    return int(np.frombuffer(buffer, dtype=np.uint8).__array_interface__["data"][0])


def mapping_of(address: int) -> str | None:
    """The line of /proc/self/maps whose range holds ``address``, if any."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= address < end:
                return line
    return None


def memfd(size: int, seals: int = SEALS) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def shared_message(lengths: list[int], entries: list[tuple[int, int]], count: int) -> bytes:
    """A hand-made message with a shared table: one side chunk per entry, all shared unless
    their index is INLINE (whose bytes, zeros, follow the pickle)."""
    pickle_part = _pickle_of_buffers(len(lengths))
    inline = b"".join(bytes(n) for n, (i, _) in zip(lengths, entries, strict=True) if i == _wire.INLINE)
    return (
        _wire.pack_header(_wire.FLAG_SHARED, len(lengths), len(pickle_part))
        + _wire.pack_lengths(lengths)
        + _wire.pack_shared_table(count, entries)
        + pickle_part
        + inline
    )


def _pickle_of_buffers(n: int) -> bytes:
    """A pickle of a list of ``n`` out-of-band buffers (NEXT_BUFFER each)."""
    import pickle

    buffers = [pickle.PickleBuffer(bytearray(1)) for _ in range(n)]
    return pickle.dumps(buffers, protocol=5, buffer_callback=lambda b: False)


# -- shared_empty and shared_copy -------------------------------------------------------------


def test_shared_empty_is_an_ordinary_aligned_writable_zeroed_array() -> None:
    a = streampickle.shared_empty((3, 5), dtype=np.int32)
    assert type(a) is np.ndarray and a.shape == (3, 5) and a.dtype == np.int32
    assert a.flags.writeable and a.flags.c_contiguous
    assert a.ctypes.data % 64 == 0
    assert not a.any()
    f = streampickle.shared_empty([4, 2], order="F")
    assert f.flags.f_contiguous and f.dtype == np.float64
    assert streampickle.shared_empty(0).size == 0
    assert streampickle.shared_empty(7).shape == (7,)


def test_shared_empty_refuses_what_cannot_live_in_shared_memory() -> None:
    with pytest.raises(UsageError, match="Python objects"):
        streampickle.shared_empty(3, dtype=object)
    with pytest.raises(UsageError, match="shape"):
        streampickle.shared_empty((2, -1))
    with pytest.raises(UsageError, match="order"):
        streampickle.shared_empty(3, order="K")
    with pytest.raises(UsageError, match="dtype"):
        streampickle.shared_empty(3, dtype="not a dtype")


def test_shared_copy_copies_values_dtype_and_order() -> None:
    source = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    copy = streampickle.shared_copy(source)
    assert np.array_equal(copy, source) and copy.dtype == source.dtype and copy.flags.f_contiguous
    assert in_shared_memory(copy)
    assert streampickle.shared_copy([1, 2, 3]).tolist() == [1, 2, 3]


def test_the_senders_file_is_sealed_against_shrinking_growing_and_new_seals() -> None:
    a = streampickle.shared_empty(1000)
    fd, _, _ = _shm.find([memoryview(a).cast("B")])[0]  # type: ignore[misc]
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & SEALS == SEALS and seals & fcntl.F_SEAL_SEAL
    with pytest.raises(PermissionError):
        os.ftruncate(fd, PAGE // 2)
    with pytest.raises(PermissionError):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)


def test_memory_and_descriptor_are_freed_with_the_last_array(no_leak: None) -> None:
    a = streampickle.shared_empty(1 << 20, dtype=np.uint8)
    view = a[100:200]
    address = address_of(a)
    del a
    gc.collect()
    assert in_shared_memory(view)  # the view keeps it
    assert mapping_of(address) is not None
    del view
    gc.collect()
    assert mapping_of(address) is None


def test_ordinary_memory_is_not_shared() -> None:
    assert _shm.find([memoryview(np.arange(10.0)).cast("B")])[0] is None
    assert _shm.find([memoryview(bytearray(100))])[0] is None
    assert _shm.find([memoryview(b"")])[0] is None


# -- round trips ------------------------------------------------------------------------------


def test_a_shared_array_arrives_as_the_same_memory(no_leak: None) -> None:
    a = streampickle.shared_empty((100, 10), dtype=np.int64)
    a[:] = np.arange(1000).reshape(100, 10)
    got = send({"a": a, "tail": a[90:], "plain": np.arange(4.0), "n": 1})
    assert np.array_equal(got["a"], a) and np.array_equal(got["tail"], a[90:])
    assert got["plain"].tolist() == [0.0, 1.0, 2.0, 3.0] and got["n"] == 1
    assert got["a"].flags.writeable and type(got["a"]) is np.ndarray
    got["a"][0, 0] = -1  # the receiver's writes are the sender's...
    assert a[0, 0] == -1
    a[99, 9] = -2  # ...and the other way round
    assert got["a"][99, 9] == -2 and got["tail"][9, 9] == -2
    del got
    gc.collect()


def test_the_message_carries_references_not_bytes_one_descriptor_per_file() -> None:
    a = streampickle.shared_empty(1 << 20, dtype=np.uint8)  # 1 MiB
    b = streampickle.shared_empty(10)
    chunks = Encoder(shared_memory=True).encode([a[: 1 << 19], a[1 << 19 :], b, np.zeros(3)])
    assert type(chunks) is _shm.SharedChunks
    assert len(chunks.descriptors) == 2  # the two halves of a share one
    assert len(wire_of(chunks)) < 1024  # only the ordinary array's 24 bytes travel
    assert chunks.shared_bytes == (1 << 20) + 80


_BUFFERS = {}


def _buffers() -> dict[str, Any]:
    """Two shared buffers (adjacent in the address space where the kernel put them so) and
    ordinary memory, made once for the test below."""
    if not _BUFFERS:
        _BUFFERS.update(a=streampickle.shared_empty(3 * PAGE, np.uint8),
                        b=streampickle.shared_empty(3 * PAGE, np.uint8), plain=np.zeros(3 * PAGE, np.uint8))
    return _BUFFERS


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "plain"]), st.integers(0, 3 * PAGE), st.integers(0, 3 * PAGE)),
                min_size=1, max_size=8))
def test_the_one_file_look_up_agrees_with_looking_up_each_buffer(slices: list[tuple[str, int, int]]) -> None:
    """The encoder's look-up for a message whose buffers all lie in one file answers exactly
    when ``find`` puts every buffer in that file, with the same offsets."""
    buffers = _buffers()
    views = [memoryview(buffers[name][min(i, j) : max(i, j)]) for name, i, j in slices]
    each = _shm.find(views)
    one = _shm.in_one_file(views, [view.nbytes for view in views])
    files = {found[0] for found in each if found is not None}
    if None in each or len(files) != 1:
        assert one is None
    else:
        assert one is not None
        fd, offsets, mapping = one
        assert [(fd, offset) for offset in offsets] == [found[:2] for found in each]
        assert all(found[2] is mapping for found in each)


def test_ordinary_messages_are_unchanged_on_a_shared_memory_encoder() -> None:
    for obj in (1, "x" * 100_000, {"a": np.arange(100_000)}):
        shared = Encoder(shared_memory=True).encode(obj)
        assert type(shared) is list and _shm.descriptors_of(shared) == ()
        assert wire_of(shared) == wire_of(Encoder().encode(obj))


def test_past_max_descriptors_files_the_rest_go_inline(no_leak: None) -> None:
    arrays = [streampickle.shared_empty(4, dtype=np.int32) + 0 for _ in range(3)]  # ordinary copies
    shared = [streampickle.shared_copy(np.full(4, i, dtype=np.int32)) for i in range(_shm.MAX_DESCRIPTORS + 3)]
    chunks = Encoder(shared_memory=True).encode(shared + arrays)
    assert len(chunks.descriptors) == _shm.MAX_DESCRIPTORS
    got = send(shared + arrays)
    assert [int(x[0]) for x in got[: len(shared)]] == list(range(len(shared)))
    del got, chunks
    gc.collect()


def test_a_readonly_view_arrives_readonly() -> None:
    a = streampickle.shared_empty(8)
    view = a[:]
    view.flags.writeable = False
    got = send(view)
    assert not got.flags.writeable and np.array_equal(got, a)


def test_shared_memory_and_a_key_do_not_mix() -> None:
    with pytest.raises(UsageError, match="key"):
        Encoder(shared_memory=True, key=b"secret")


def test_without_memfd_arrays_are_refused_and_encoders_send_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    a = streampickle.shared_empty(4)
    monkeypatch.setattr(_shm, "AVAILABLE", False)
    with pytest.raises(UsageError, match="memfd"):
        streampickle.shared_empty(4)
    chunks = Encoder(shared_memory=True).encode(a)
    assert _shm.descriptors_of(chunks) == ()
    assert np.array_equal(streampickle.loads(wire_of(chunks)), a)


# -- what a receiver refuses ------------------------------------------------------------------


def test_a_decoder_that_did_not_opt_in_refuses_and_names_the_option(no_leak: None) -> None:
    a = streampickle.shared_empty(10)
    message = wire_of(Encoder(shared_memory=True).encode(a))
    with pytest.raises(ProtocolError, match="shared_memory=True"):
        streampickle.loads(message)
    decoder = Decoder()
    with pytest.raises(ProtocolError, match="did not opt in"):
        decoder.feed_descriptors([memfd(PAGE)])
    assert decoder.failed


def refuse(
    message: bytes, fds: list[int], error: type[Exception] = ProtocolError, match: str | None = None, **kw: Any
) -> Decoder:
    decoder = Decoder(shared_memory=True, **kw)
    with pytest.raises(error, match=match):
        decoder.feed_descriptors(fds)
        decoder.feed(message)
    assert decoder.failed
    return decoder


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: _read_end_of_a_pipe(), "not a shared-memory file"),
        (lambda: _unlinked_file(), "not a sealable"),
        (lambda: memfd(PAGE, seals=0), "not sealed against shrinking"),
        (lambda: memfd(PAGE, seals=fcntl.F_SEAL_SHRINK), "not sealed against shrinking"),
        (lambda: memfd(10, SEALS), "of 10 bytes"),
        (lambda: memfd(PAGE, SEALS | fcntl.F_SEAL_WRITE), "sealed against writing"),
        (lambda: _huge_page_memfd(), "huge pages"),
    ],
    ids=["pipe", "regular-file", "unsealed", "shrink-only", "too-small", "write-sealed", "huge-pages"],
)
def test_each_descriptor_is_checked_before_it_is_mapped(no_leak: None, make: Any, match: str) -> None:
    refuse(shared_message([100], [(0, 0)], 1), [make()], match=match)


def _huge_page_memfd() -> int:
    """A sealed memfd of huge pages (hugetlbfs): creating it needs no huge page reserved. Were
    it mapped (on a host with huge pages reserved), its mapping would span a whole huge page
    that unmapping the announced length can't remove: a mapping left behind per message."""
    fd = os.memfd_create("test-huge", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
    os.ftruncate(fd, 2 << 20)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


def _read_end_of_a_pipe() -> int:
    read, write = os.pipe()
    os.close(write)
    return read


def _unlinked_file() -> int:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    os.ftruncate(fd, PAGE)
    return fd


def test_a_range_past_the_files_end_is_refused(no_leak: None) -> None:
    refuse(shared_message([PAGE], [(0, 1)], 1), [memfd(PAGE)], match="offset 1")
    refuse(shared_message([8], [(0, 2**64 - 4)], 1), [memfd(PAGE)], match="past any file's end")


@pytest.mark.parametrize(
    "entries, count, match",
    [
        ([(1, 0)], 1, "lies in descriptor 1"),
        ([(0, 0)], 2, "lie in 1 of"),
        ([(0, 0)], 0, "lies in descriptor 0"),
    ],
)
def test_the_shared_table_must_be_consistent(
    no_leak: None, entries: list[tuple[int, int]], count: int, match: str
) -> None:
    refuse(shared_message([8], entries, count), [memfd(PAGE), memfd(PAGE)], match=match)


def test_reserved_words_of_the_shared_table_are_refused(no_leak: None) -> None:
    message = bytearray(shared_message([8], [(0, 0)], 1))
    table = _wire.HEADER_SIZE + _wire.LENGTH_SIZE
    struct.pack_into("<I", message, table + 4, 1)
    refuse(bytes(message), [memfd(PAGE)], match="reserved")
    message = bytearray(shared_message([8], [(0, 0)], 1))
    struct.pack_into("<I", message, table + _wire.SHARED_HEAD_SIZE + 4, 1)
    refuse(bytes(message), [memfd(PAGE)], match="reserved")


def _table_reference(count: int, entries: list[tuple[int, int, int]], lengths: tuple[int, ...]) -> Any:
    """What a shared table means, checked entry by entry in order (the wire format's rules):
    (count, [(index, offset)]) or the first fault's message."""
    used = set()
    for i, ((index, reserved, offset), length) in enumerate(zip(entries, lengths, strict=True)):
        if reserved:
            return f"side chunk {i}'s shared-table entry has reserved bits set ({reserved:#x})"
        if index != _wire.INLINE:
            if index >= count:
                return f"side chunk {i} lies in descriptor {index}, but the message carries {count}"
            if offset + length > 1 << 63:
                return f"side chunk {i} claims {length} bytes at offset {offset}: past any file's end"
            used.add(index)
    if len(used) != count:
        return f"the message carries {count} descriptors but its side chunks lie in {len(used)} of them"
    return count, [(index, offset) for index, _, offset in entries]


@settings(max_examples=1000, deadline=None)
# The edges of each rule, besides what the search finds: a range ending at 2**63 and one past
# it, an index equal to the count, a descriptor no chunk lies in, reserved bits (on an inline
# entry too).
@example(count=1, rows=[(0, 0, 2**63 - 8, 8)])
@example(count=1, rows=[(0, 0, 2**63 - 8, 9)])
@example(count=1, rows=[(0, 0, 0, 8), (_wire.INLINE, 0, 2**64 - 1, 8)])
@example(count=1, rows=[(1, 0, 0, 8)])
@example(count=2, rows=[(0, 0, 0, 8), (0, 0, 8, 8)])
@example(count=1, rows=[(0, 0, 0, 8), (0, 1, 8, 8)])
@example(count=1, rows=[(0, 0, 0, 8), (_wire.INLINE, 2**32 - 1, 8, 8)])  # index and reserved read as one word
@example(count=0, rows=[])
@given(
    count=st.integers(0, 4),
    rows=st.lists(
        st.tuples(
            st.one_of(st.integers(0, 5), st.just(_wire.INLINE)),
            # Mostly valid fields, so that whole tables pass often enough for a fault in one
            # entry among valid ones to be what is tested.
            st.sampled_from([0] * 7 + [1, 2**31, 2**32 - 1]),
            st.one_of(st.integers(0, 2**20), st.integers(0, 2**20), st.integers(0, 2**20),
                      st.integers(2**63 - 2**20, 2**64 - 1)),
            st.one_of(st.integers(0, 2**20), st.integers(0, 2**20), st.integers(0, 2**20),
                      st.integers(2**62, 2**63)),
        ),
        max_size=12,
    ),
)
def test_the_shared_tables_column_checks_agree_with_checking_entry_by_entry(
    count: int, rows: list[tuple[int, int, int, int]]
) -> None:
    entries = [(index, reserved, offset) for index, reserved, offset, _ in rows]
    lengths = tuple(length for *_, length in rows)
    table = struct.pack("<II", count, 0) + b"".join(struct.pack("<IIQ", *e) for e in entries)
    want = _table_reference(count, entries, lengths)
    if isinstance(want, str):
        with pytest.raises(ProtocolError) as info:
            _wire.unpack_shared_table(table, lengths)
        assert str(info.value).startswith(want)
    else:
        assert _wire.unpack_shared_table(table, lengths) == want


def test_fewer_descriptors_than_the_message_needs(no_leak: None) -> None:
    refuse(shared_message([8, 8], [(0, 0), (1, 0)], 2), [memfd(PAGE)], match="2 shared-memory files, but 1")


def test_descriptors_no_message_claims_are_refused_and_closed(no_leak: None) -> None:
    refuse(streampickle.dumps(1), [memfd(PAGE)], match="no message claimed")
    refuse(shared_message([8], [(0, 0)], 1), [memfd(PAGE), memfd(PAGE)], match="no message claimed")


def test_a_peer_cannot_make_us_hold_many_descriptors(no_leak: None) -> None:
    limits = Limits(max_descriptors=4)
    decoder = refuse(b"", [memfd(PAGE) for _ in range(5)], LimitExceededError, "max_descriptors=4", limits=limits)
    with pytest.raises(LimitExceededError):
        decoder.feed_descriptors([memfd(PAGE)])  # closed too: the decoder failed


def test_the_message_size_limit_counts_shared_bytes(no_leak: None) -> None:
    fd = memfd(1 << 30)  # sparse: costs nothing
    limits = Limits(max_message_size=1 << 29)
    refuse(shared_message([1 << 30], [(0, 0)], 1), [fd], LimitExceededError, "max_message_size", limits=limits)


def test_shared_flag_with_a_tag_or_without_side_chunks_is_refused() -> None:
    for flags, count in ((_wire.FLAG_SHARED | _wire.FLAG_MAC, 1), (_wire.FLAG_SHARED, 0)):
        with pytest.raises(ProtocolError, match="shared-memory side chunks"):
            _wire.parse_header(_wire.pack_header(flags, count, 5))


def test_a_keyed_decoder_refuses_shared_messages(no_leak: None) -> None:
    refuse(shared_message([8], [(0, 0)], 1), [memfd(PAGE)], streampickle.AuthenticationError, "key", key=b"k")


def test_only_the_announced_pages_are_mapped(no_leak: None) -> None:
    """A peer announcing 8 bytes of a 1 GiB file gets one page of our address space."""
    fd = memfd(1 << 30)
    decoder = Decoder(shared_memory=True)
    decoder.feed_descriptors([fd])
    decoder.feed(shared_message([8], [(0, (1 << 29) + 3)], 1))
    (buffer,) = next(decoder)
    line = mapping_of(address_of(buffer))
    assert line is not None and "memfd:test" in line
    start, end = (int(x, 16) for x in line.split()[0].split("-"))
    assert end - start == PAGE
    del buffer
    gc.collect()


def test_a_decoder_dropped_holding_descriptors_closes_them(no_leak: None) -> None:
    decoder = Decoder(shared_memory=True)
    decoder.feed_descriptors([memfd(PAGE)])
    decoder.feed(shared_message([8], [(0, 0)], 1)[:5])  # inside the header: still unclaimed
    del decoder


def test_close_descriptors_and_eof_close_what_waits(no_leak: None) -> None:
    decoder = Decoder(shared_memory=True)
    decoder.feed_descriptors([memfd(PAGE)])
    decoder.close_descriptors()
    decoder = Decoder(shared_memory=True)
    decoder.feed_descriptors([memfd(PAGE)])
    decoder.feed(shared_message([8], [(0, 0)], 1)[:5])
    with pytest.raises(streampickle.IncompleteMessageError):
        decoder.feed_eof()


@pytest.mark.parametrize("split", [1, 7, 29, 100])
def test_any_split_of_the_bytes(no_leak: None, split: int) -> None:
    a = streampickle.shared_copy(np.arange(50, dtype=np.int16))
    chunks = Encoder(shared_memory=True).encode((a, np.ones(3), a[::2].copy()))
    data = wire_of(chunks)
    decoder = Decoder(shared_memory=True)
    decoder.feed_descriptors([os.dup(fd) for fd in chunks.descriptors])
    for i in range(0, len(data), split):
        decoder.feed(data[i : i + split])
    got = next(decoder)
    assert np.array_equal(got[0], a) and got[1].tolist() == [1.0, 1.0, 1.0] and np.array_equal(got[2], a[::2])
    del got
    gc.collect()


def test_text_arrays_in_shared_memory_are_checked_on_a_private_copy(no_leak: None) -> None:
    """numpy doesn't check UCS-4 data, so the decoder does; the peer could rewrite shared
    memory after that check, so a U array arrives as a checked copy, not shared."""
    a = streampickle.shared_copy(np.array(["ab", "cd"]))
    got = send(a)
    assert got.tolist() == ["ab", "cd"] and got.flags.writeable
    a[0] = "zz"
    assert got[0] == "ab"  # a copy: the sender's later writes don't reach it
    bad = streampickle.shared_copy(np.array(["ab"]))
    bad.view(np.uint32)[0] = 0x110000
    with pytest.raises(streampickle.MalformedPickleError, match="U\\+10FFFF"):
        send(bad)
    numbers = streampickle.shared_copy(np.arange(3))
    assert not send(numbers).flags.owndata  # everything else is the shared memory itself
    del got
    gc.collect()


def test_ranges_on_adjacent_pages_of_one_file_share_one_mapping(no_leak: None) -> None:
    """Arrays of one buffer sent together cost one mapping, still exactly the announced
    pages; a page between two ranges that no chunk announced is not mapped."""
    fd = memfd(16 * PAGE)
    os.pwrite(fd, bytes(range(256)) * (16 * PAGE // 256), 0)
    # Out of order, overlapping, adjacent, then a gap of one page before the last range.
    entries = [(0, PAGE + 8), (0, 8), (0, 3 * PAGE), (0, PAGE), (0, 10 * PAGE)]
    lengths = [PAGE, 2 * PAGE - 8, 16, PAGE, 8]
    decoder = Decoder(shared_memory=True)
    decoder.feed_descriptors([fd])
    decoder.feed(shared_message(lengths, entries, 1))
    buffers = next(decoder)
    expected = bytes(range(256)) * (16 * PAGE // 256)
    for buffer, (_, offset), length in zip(buffers, entries, lengths, strict=True):
        assert bytes(buffer) == expected[offset : offset + length]
    lines = [mapping_of(address_of(buffer)) for buffer in buffers]
    assert all(line is not None and "memfd:test" in line for line in lines)
    spans = {tuple(int(x, 16) for x in line.split()[0].split("-")) for line in lines if line}
    assert sorted(end - start for start, end in spans) == [PAGE, 4 * PAGE]  # pages 0-3, then page 10
    assert len({lines[0], lines[1], lines[2], lines[3]}) == 1
    buffers[1][PAGE] = 99  # one mapping: the overlapping range sees the write
    assert buffers[0][0] == 99 and buffers[0].readonly is False
    del buffers, buffer
    gc.collect()


def test_the_address_twins_agree() -> None:
    """C ``address`` and its Python twin find the same first byte, readonly buffers too."""
    from streampickle._accel import speedups

    if not speedups:
        pytest.skip("the C extension is not loaded (pure-Python run): its twin is the one in use")
    array = np.arange(100.0)
    buffers = [
        memoryview(array).cast("B"),
        memoryview(array).cast("B")[24:80],
        memoryview(pickle.PickleBuffer(array)).cast("B").toreadonly(),
        memoryview(b"bytes are readonly"),
        memoryview(bytearray(10))[3:],
    ]
    for view in buffers:
        assert speedups.address(view) == _shm._address_py(view)
    assert _shm._address_py(buffers[1]) - _shm._address_py(buffers[0]) == 24


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping (/proc/self/smaps) whose range holds ``address``."""
    return smaps_of(address)["VmFlags"].split()


HUGE = 2 << 20


def kernel_collapses_shared_memory() -> bool:
    """Whether this kernel builds huge pages of a shared-memory file on request
    (``MADV_COLLAPSE``, Linux 6.1, refused where the host's shmem setting is ``deny``), tried
    on a memfd mapped here without streampickle's code."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fd = memfd(HUGE)
    try:
        with mmap.mmap(-1, 2 * HUGE) as space:  # a mapping's worth of room, 2 MiB aligned inside
            start = address_of(space)
        aligned = -(-start // HUGE) * HUGE
        address = libc.mmap(aligned, HUGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        try:
            if address != aligned:
                return False
            ctypes.c_char.from_address(address).value = b"\0"
            return libc.madvise(address, HUGE, 25) == 0 and smaps_kib(address, "ShmemPmdMapped") == HUGE // 1024
        finally:
            libc.munmap(address, HUGE)
    finally:
        os.close(fd)


@pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/transparent_hugepage"), reason="no transparent huge pages here")
def test_large_shared_arrays_ask_for_huge_pages() -> None:
    """Arrays of 2 MiB or more ask for huge pages (``MADV_HUGEPAGE``, for hosts that give them
    as pages are written); smaller ones don't, so they never take a 2 MiB page for a few bytes."""
    large = streampickle.shared_empty(HUGE, np.uint8, huge_pages=False)
    small = streampickle.shared_empty(HUGE - 4096, np.uint8)
    assert "hg" in vm_flags(address_of(large))
    assert "hg" not in vm_flags(address_of(small))


@pytest.mark.skipif(
    not (_shm.AVAILABLE and kernel_collapses_shared_memory()),
    reason=f"this kernel ({os.uname().release}) gives shared memory no huge pages on request",
)
def test_a_large_shared_array_gets_its_memory_at_once_in_huge_pages() -> None:
    """Every whole 2 MiB of the file is a huge page as soon as it is made; the tail past
    the last 2 MiB stays in ordinary pages, made as they are first touched. The contents
    are zeros."""
    array = streampickle.shared_empty(2 * HUGE + 3 * PAGE + 5, np.uint8)
    address = address_of(array)
    assert address % HUGE == 0
    assert smaps_kib(address, "ShmemPmdMapped") == 2 * HUGE // 1024
    assert smaps_kib(address, "Rss") == 2 * HUGE // 1024  # the tail's 4 pages aren't touched yet
    assert not array.any()


def test_with_huge_pages_false_memory_comes_as_it_is_written() -> None:
    array = streampickle.shared_empty(4 * HUGE, np.uint8, huge_pages=False)
    address = address_of(array)
    assert smaps_kib(address, "Rss") == 0
    array[0] = 1
    # one page, or one huge page where the host gives them as pages are written
    assert 0 < smaps_kib(address, "Rss") <= HUGE // 1024
    assert not array[1:].any()


def test_an_array_larger_than_half_the_available_memory_takes_it_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared memory taken at once can't be reclaimed: an array that would take more than
    half of what is left is not given its memory up front (numpy.empty of more than there is
    raises MemoryError; this one at least doesn't take it all before the first write)."""
    monkeypatch.setattr(_shm, "_available_memory", lambda: 7 * HUGE)
    array = streampickle.shared_empty(4 * HUGE, np.uint8)
    assert smaps_kib(address_of(array), "Rss") == 0
    array[-1] = 1
    assert array[-1] == 1 and not array[:-1].any()


@pytest.mark.parametrize("offset", [0, 5 * PAGE, HUGE + PAGE])
def test_a_large_received_range_is_mapped_where_the_files_huge_pages_fit(no_leak: None, offset: int) -> None:
    """A range of 2 MiB or more lies as far past a 2 MiB boundary of our address space as
    of the file, so that the file's huge pages map whole (one entry each, not 512)."""
    fd = memfd(4 * HUGE)
    decoder = Decoder(shared_memory=True)
    decoder.feed_descriptors([fd])
    decoder.feed(shared_message([HUGE + 8], [(0, offset)], 1))
    (buffer,) = next(decoder)
    assert address_of(buffer) % HUGE == offset % HUGE
    line = mapping_of(address_of(buffer))
    assert line is not None and "memfd:test" in line
    start, end = (int(x, 16) for x in line.split()[0].split("-"))
    assert end - start == -(-(offset % PAGE + HUGE + 8) // PAGE) * PAGE  # still only the announced pages
    del buffer
    gc.collect()


# -- mappings: a message can't take the process's map entries ----------------------------------


def map_entries() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def test_side_chunks_scattered_over_too_many_parts_of_a_file_are_refused_before_mapping(no_leak: None) -> None:
    # One byte on every other page: each a mapping of its own. A process has about 65,530 map
    # entries; a message of 60,000 such chunks once took 60,000 of them.
    n = _shm.MAX_MAPPINGS + 1
    fd = memfd(2 * n * PAGE)
    message = shared_message([1] * n, [(0, 2 * i * PAGE) for i in range(n)], 1)
    before = map_entries()
    refuse(message, [fd], match=f"{n} separate parts.*at most {_shm.MAX_MAPPINGS} are mapped")
    assert map_entries() <= before + 2  # nothing mapped (the count moves by the allocator's own)
    # As many as the bound: mapped, one mapping each.
    fd = memfd(2 * _shm.MAX_MAPPINGS * PAGE)
    message = shared_message([1] * _shm.MAX_MAPPINGS, [(0, 2 * i * PAGE) for i in range(_shm.MAX_MAPPINGS)], 1)
    decoder = Decoder(shared_memory=True)
    decoder.feed_descriptors([fd])
    decoder.feed(message)
    got = next(decoder)
    assert len(got) == _shm.MAX_MAPPINGS and all(len(b) == 1 for b in got)
    del got, decoder


def test_a_sender_sends_scattered_side_chunks_as_bytes(no_leak: None) -> None:
    buffer = streampickle.shared_empty(2 * (_shm.MAX_MAPPINGS + 1) * PAGE, np.uint8)
    buffer[::PAGE] = 7
    scattered = [buffer[2 * i * PAGE : 2 * i * PAGE + 8] for i in range(_shm.MAX_MAPPINGS + 1)]
    chunks = Encoder(shared_memory=True).encode(scattered)
    assert _shm.descriptors_of(chunks) == ()  # no references: every side chunk as bytes
    got = send(scattered)
    assert [a.tolist() for a in got] == [[7, 0, 0, 0, 0, 0, 0, 0]] * len(scattered)
    assert not any(in_shared_memory(a) for a in got)
    bounded = scattered[:-1]  # as many parts as a receiver maps: references
    assert len(_shm.descriptors_of(Encoder(shared_memory=True).encode(bounded))) == 1
    got = send(bounded)
    assert all(a[0] == 7 for a in got)
    del got, chunks, buffer, scattered, bounded


# -- what a message in flight holds ------------------------------------------------------------


def memfd_mappings() -> int:
    """How many of this process's mappings are of the tests' memfds."""
    with open("/proc/self/maps") as maps:
        return sum("memfd:test" in line for line in maps)


def test_a_message_in_flight_holds_descriptors_never_mappings(no_leak: None) -> None:
    # A peer that sends a message's tables and then stalls (until the message deadline, ten
    # minutes by default) once kept MAX_MAPPINGS map entries per connection: 70 connections
    # took the process's ~65,530, and with them its next allocation of any kind.
    n = 64
    held = _shm.HELD.count
    message = shared_message([1] * n, [(0, 2 * i * PAGE) for i in range(n)], 1)
    decoder = Decoder(shared_memory=True)
    decoder.feed_descriptors([memfd(2 * n * PAGE)])
    decoder.feed(message[:-1])  # all but the pickle's last byte: the file was checked
    assert memfd_mappings() == 0 and _shm.HELD.count == held + 1
    decoder.feed(message[-1:])
    got = next(decoder)
    assert memfd_mappings() == n and _shm.HELD.count == held  # mapped, and the descriptor closed
    assert all(len(b) == 1 for b in got)
    del got, decoder


def test_a_descriptor_is_checked_as_soon_as_its_shared_table_arrives(no_leak: None) -> None:
    message = shared_message([2 * PAGE], [(0, 0)], 1)
    tables = len(message) - len(_pickle_of_buffers(1))
    held = _shm.HELD.count
    decoder = Decoder(shared_memory=True)
    decoder.feed_descriptors([memfd(PAGE)])  # smaller than announced
    with pytest.raises(ProtocolError, match="announced"):
        decoder.feed(message[:tables])  # no byte of the pickle yet
    assert _shm.HELD.count == held  # closed


def test_descriptors_that_come_with_a_byte_inside_a_message_are_refused(no_leak: None) -> None:
    data = streampickle.dumps(list(range(2000)))
    decoder = Decoder(shared_memory=True)
    decoder.feed(data[:100])
    decoder.feed_descriptors([memfd(PAGE)], 1)
    with pytest.raises(ProtocolError, match="inside a message"):
        decoder.feed(data[100:101])  # the message is far from complete: no need to wait for it


def test_descriptors_with_a_message_that_has_no_shared_table_are_refused_once_its_header_is_in(
    no_leak: None,
) -> None:
    data = streampickle.dumps(list(range(2000)))
    decoder = Decoder(shared_memory=True)
    decoder.feed_descriptors([memfd(PAGE)], 30)
    with pytest.raises(ProtocolError, match="left unclaimed"):
        decoder.feed(data[:30])


def test_descriptors_for_the_next_message_wait_for_all_the_bytes_they_came_with(no_leak: None) -> None:
    # One read can bring the end of a message and the start of the next, whose descriptors
    # come with it; fed in pieces (as a progress meter feeds a read ahead), the first piece
    # ends at a message boundary with the descriptors not yet claimed, and that is no error.
    plain = b"x" * 100
    array = streampickle.shared_copy(np.arange(100))
    chunks = Encoder(shared_memory=True).encode(array)
    first = streampickle.dumps(plain)
    decoder = Decoder(shared_memory=True)
    decoder.feed(first[:10])
    read = first[10:] + wire_of(chunks)
    decoder.feed_descriptors([os.dup(fd) for fd in _shm.descriptors_of(chunks)], len(read))
    for i in range(0, len(read), 7):
        decoder.feed(read[i : i + 7])
    got = list(decoder)
    assert got[0] == plain and np.array_equal(got[1], array)
    del got, chunks


def test_the_process_holds_at_most_its_share_of_descriptors_for_messages_in_flight(
    no_leak: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each connection may hold up to max_descriptors (253) for as long as its message is in
    # flight: a few stalled peers once filled the file table, and then no listener accepted
    # anyone. The whole process holds at most held_limit() (a quarter of RLIMIT_NOFILE).
    assert _shm.MAX_DESCRIPTORS <= _shm.held_limit() < 1 << 24
    limit = _shm.HELD.count + 4
    monkeypatch.setattr(_shm, "held_limit", lambda: limit)
    stalled = Decoder(shared_memory=True)
    stalled.feed_descriptors([memfd(PAGE) for _ in range(3)])
    stalled.feed(shared_message([8], [(0, 0)], 1)[:5])  # inside the header: waiting
    refused = Decoder(shared_memory=True)
    with pytest.raises(LimitExceededError, match="open-file limit"):
        refused.feed_descriptors([memfd(PAGE), memfd(PAGE)])  # closed at once, not counted
    assert _shm.HELD.count == limit - 1
    stalled.close_descriptors()
    assert _shm.HELD.count == limit - 4
    a, b = streampickle.shared_copy(np.arange(10)), streampickle.shared_copy(np.arange(20))
    got = send([a, b])  # two descriptors: within the limit again
    assert np.array_equal(got[0], a) and np.array_equal(got[1], b)
    del got
