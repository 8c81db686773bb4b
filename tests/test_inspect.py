"""``python -m streampickle inspect``: real captured streams (numpy arrays, keyed streams,
shared-memory messages, refused globals), standard pickles written by another process, damaged
and hostile input, stdin, --json, --dis and usage errors. Nothing in them is ever unpickled:
the refused-global tests would fail loudly if it were (their classes' reducers record calls)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import streampickle
from streampickle import Encoder, Key, _inspect, _shm, _wire
from streampickle.__main__ import main as streampickle_main
from streampickle._inspect import (
    MessageRecord,
    PickleRecord,
    analyze_pickle,
    inspect_messages,
    inspect_pickles,
)

CALLED: list[str] = []


class Recorded:
    """A class the safe loader refuses; unpickling one would append to CALLED."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __setstate__(self, state: dict[str, Any]) -> None:  # pragma: no cover - must never run
        CALLED.append("setstate")
        self.__dict__.update(state)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m streampickle ...``'s ``main``, in this process (a child per call would cost
    more than the tests); its exit status and output. ``run_cli_bytes`` runs a real child."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = streampickle_main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def run_cli_bytes(args: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "streampickle", *args], input=stdin, capture_output=True, timeout=60)


def messages(path: Path, **kwargs: Any) -> list[MessageRecord]:
    with path.open("rb") as f:
        return list(inspect_messages(f, **kwargs))


def wire(chunks: Any) -> bytes:
    return b"".join(bytes(memoryview(c).cast("B")) for c in chunks)


@pytest.fixture
def arrays_file(tmp_path: Path) -> tuple[Path, list[Any]]:
    """A file written with sync.dump: arrays, a dict of arrays, plain data."""
    objects: list[Any] = [
        np.arange(10, dtype="<i4"),
        {"a": np.ones((3, 4)), "b": np.zeros(0, dtype=np.uint8), "c": "text"},
        [1, 2.5, "three", None],
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
    ]
    path = tmp_path / "arrays.sp"
    with path.open("wb") as f:
        for obj in objects:
            streampickle.sync.dump(obj, f)
    return path, objects


def test_lists_each_message_with_offsets_sizes_and_side_chunks(arrays_file: tuple[Path, list[Any]]) -> None:
    path, objects = arrays_file
    records = messages(path)
    assert len(records) == len(objects)
    offset = 0
    for record, obj in zip(records, objects, strict=True):
        encoded = streampickle.dumps(obj)
        assert record.ok and record.offset == offset and record.size == len(encoded)
        assert (record.version, record.flags, record.mac) == (1, 0, None)
        header = _wire.parse_header(encoded[: _wire.HEADER_SIZE])
        assert record.pickle_length == header.pickle_length
        assert record.pickle is not None and record.pickle.verdict is None and record.pickle.protocol == 5
        offset += record.size
    assert offset == path.stat().st_size
    assert records[0].chunk_lengths == (40,)
    assert sorted(records[1].chunk_lengths) == [0, 96]
    assert records[2].chunk_lengths == () and records[2].pickle is not None and records[2].pickle.globals == []
    for record in (records[0], records[1], records[3]):
        assert record.pickle is not None
        names = {(g.full_name, g.refused, g.admitted_as) for g in record.pickle.globals}
        assert names == {("streampickle._rebuild.ndarray", None, "a streampickle reconstructor")}


def test_the_worked_example_of_the_spec() -> None:
    message = streampickle.dumps({"x": np.arange(3, dtype="<i2")})
    assert len(message) == 107
    (record,) = inspect_messages(io.BytesIO(message))
    assert record.pickle is not None
    (use,) = record.pickle.globals
    assert (use.module, use.name, use.opcode, use.position) == ("streampickle._rebuild", "ndarray", "STACK_GLOBAL", 51)
    assert record.chunk_lengths == (6,) and record.pickle_length == 73 and record.pickle.buffers == 1


def test_a_refused_global_is_named_and_nothing_is_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "refused.sp"
    path.write_bytes(streampickle.dumps(Recorded(3)) + streampickle.dumps(os.system) + streampickle.dumps([1]))
    first, second, third = messages(path)
    assert first.ok and first.pickle is not None
    (use,) = first.pickle.globals
    assert use.full_name == f"{__name__}.Recorded" and use.opcode == "STACK_GLOBAL"
    assert use.refused is not None and "allow=" in use.refused
    assert first.pickle.verdict is not None and "Recorded" in first.pickle.verdict
    assert second.pickle is not None
    (system,) = second.pickle.globals
    assert system.refused is not None and system.refused.startswith("never allowable")
    assert third.pickle is not None and third.pickle.verdict is None
    # the same judgement with the class allowed, as allow=[Recorded] would make it
    allowed = messages(path, allow=[Recorded])
    assert allowed[0].pickle is not None and allowed[0].pickle.globals[0].refused is None
    assert allowed[0].pickle.globals[0].admitted_as == "allowed by allow="
    assert CALLED == []
    result = run_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr  # refused is not malformed
    assert "REFUSED" in result.stdout and "never allowable" in result.stdout
    assert "3 messages, 0 with errors, 2 the safe loader would refuse" in result.stdout


def test_keyed_stream_tags_verify_with_the_key_file_and_fail_with_another(tmp_path: Path) -> None:
    macs: list[Any] = ["hmac-sha256"]
    for mac, module in (("blake3", "blake3"), ("poly1305", "cryptography")):
        try:
            __import__(module)
        except ImportError:
            continue
        macs.append(mac)
    key_file, wrong_file = tmp_path / "key", tmp_path / "wrong"
    key_file.write_bytes(b"the secret")
    wrong_file.write_bytes(b"another secret")
    for mac in macs:
        encoder = Encoder(key=Key(b"the secret", mac=mac))
        data = wire(encoder.encode(np.arange(100.0))) + wire(encoder.encode({"n": 1})) + encoder.encode_end()
        path = tmp_path / f"{mac}.sp"
        path.write_bytes(data)
        records = messages(path, key=b"the secret")
        assert [r.sequence for r in records] == [0, 1, 2]
        assert all(r.sender == encoder.sender.hex() and r.mac == mac for r in records)
        assert [r.end_of_stream for r in records] == [False, False, True]
        assert all(r.ok and r.header_tag_ok for r in records)
        assert [r.tag_ok for r in records] == [True, True, None]  # an end has only its header tag
        unchecked = messages(path)
        assert all(r.ok and r.tag_ok is None and r.tag_note for r in unchecked)
        wrong = messages(path, key=b"another secret")
        assert all(r.header_tag_ok is False and not r.ok for r in wrong)
    good = run_cli("inspect", "--key-file", str(key_file), str(tmp_path / "hmac-sha256.sp"))
    assert good.returncode == 0, good.stderr
    assert "tags: 3 verified, 0 failed" in good.stdout
    bad = run_cli("inspect", "--key-file", str(wrong_file), str(tmp_path / "hmac-sha256.sp"))
    assert bad.returncode == 1 and "at offset 0" in bad.stderr and "does not verify" in bad.stderr


def test_an_altered_side_chunk_fails_the_tag(tmp_path: Path) -> None:
    data = bytearray(streampickle.dumps(np.arange(1000, dtype=np.int64), key=b"k"))
    data[-100] ^= 1  # inside the side chunk, before the tag
    (record,) = inspect_messages(io.BytesIO(bytes(data)), key=b"k")
    assert record.header_tag_ok is True and record.tag_ok is False and not record.ok


@pytest.mark.skipif(not _shm.AVAILABLE, reason="no sealed memfds here")
def test_shared_memory_messages_show_their_shared_table(tmp_path: Path) -> None:
    shared = streampickle.shared_empty((1000,), dtype=np.float64)
    shared[:] = 1.5
    chunks = Encoder(shared_memory=True).encode({"shared": shared, "plain": np.arange(4, dtype=np.int8)})
    assert _shm.descriptors_of(chunks)
    path = tmp_path / "shared.sp"
    path.write_bytes(wire(chunks) + streampickle.dumps("after"))
    first, second = messages(path)
    assert first.ok and first.flags is not None and first.flags & _wire.FLAG_SHARED
    assert first.descriptor_count == 1
    by_length = dict(zip(first.chunk_lengths, first.shared, strict=True))
    assert by_length[8000] == (0, by_length[8000][1]) and by_length[4] == (_wire.INLINE, 0)
    assert first.size == len(wire(chunks))  # the shared chunk's bytes are not in the file
    assert second.ok and second.offset == first.size
    result = run_cli("inspect", "--json", str(path))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    table = doc["messages"][0]["shared"]
    assert table["descriptors"] == 1 and None in table["chunks"]
    assert "shared table: 1 descriptor (" in run_cli("inspect", str(path)).stdout


def corrupt_cases() -> list[tuple[str, bytes, int, str]]:
    """(name, bytes, offset of the bad message, text the error says)."""
    good = streampickle.dumps(np.arange(50, dtype=np.int32))
    second = streampickle.dumps({"k": np.ones(8)})
    header = _wire.pack_header(0, 1, 10)
    return [
        ("bad magic", good + b"GET / HTTP/1.1\r\n\r\n", len(good), "not a streampickle stream"),
        ("short header", good + second[:7], len(good), "truncated"),
        ("truncated side chunk", good + second[:-5], len(good), "side chunk"),
        ("truncated pickle", good[:40], 0, "pickle part"),
        ("unknown version", good + b"\x93SPK\x07" + second[5:], len(good), "version 7"),
        ("reserved bits", good + second[:5] + b"\x40" + second[6:], len(good), "reserved header bits"),
        ("chunk count over the limit", _wire.pack_header(0, 70_000, 10), 0, "max_side_chunks"),
        ("pickle over the limit", _wire.pack_header(0, 0, 5 << 30), 0, "max_pickle_size"),
        ("chunks over the limit", header + struct.pack("<Q", 1 << 40), 0, "max_message_size"),
    ]


@pytest.mark.parametrize("case", corrupt_cases(), ids=lambda c: c[0])
def test_damaged_input_is_an_error_naming_its_offset(case: tuple[str, bytes, int, str]) -> None:
    _, data, offset, text = case
    records = list(inspect_messages(io.BytesIO(data)))
    last = records[-1]
    assert last.fatal and last.offset == offset and last.error is not None
    assert f"at offset {offset}" in last.error and text in last.error
    assert all(r.ok for r in records[:-1])


def test_damaged_file_from_the_command_line(tmp_path: Path) -> None:
    _, data, offset, _ = corrupt_cases()[2]
    path = tmp_path / "cut.sp"
    path.write_bytes(data)
    result = run_cli_bytes(["inspect", str(path)], b"")
    assert result.returncode == 1
    assert f"at offset {offset}".encode() in result.stderr and b"Traceback" not in result.stderr
    assert b"ERROR" in result.stdout and b"1 with errors" in result.stdout


def test_a_malformed_pickle_is_reported_and_the_listing_goes_on() -> None:
    good = streampickle.dumps([1, 2])
    body = pickle.dumps([1, 2], protocol=5) + b"extra"
    bad = _wire.pack_header(0, 0, len(body)) + body
    no_stop = _wire.pack_header(0, 0, 3) + b"\x80\x05N"
    buffers = _wire.pack_header(0, 1, len(body) - 5) + _wire.pack_lengths([2]) + body[:-5] + b"ab"
    records = list(inspect_messages(io.BytesIO(good + bad + no_stop + buffers + good)))
    assert [r.ok for r in records] == [True, False, False, False, True]
    assert records[1].error is not None and "5 bytes follow the pickle's STOP" in records[1].error
    assert records[2].error is not None and "without a STOP" in records[2].error
    assert records[3].error is not None and "NEXT_BUFFER" in records[3].error
    assert records[4].offset == len(good + bad + no_stop + buffers)


def test_a_claimed_length_is_never_allocated_before_the_bytes_arrive() -> None:
    """A header that claims a 3 GiB pickle and 2**40-byte chunks, in a file of a few bytes, with
    limits raised so that the claim passes: the answer is "truncated", read in pieces."""
    claim = _wire.pack_header(0, 1, 3 << 30) + struct.pack("<Q", 1 << 40) + b"\x80\x05"
    for file in (io.BytesIO(claim), _Unseekable(claim)):
        (record,) = inspect_messages(file, limits=streampickle.Limits(max_message_size=1 << 62))
        assert record.fatal and record.error is not None and "truncated" in record.error
        assert "pickle part" in record.error


class _Unseekable(io.RawIOBase):
    """A pipe-like file: reads only, and at most 4096 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(min(len(buffer), 4096))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_stdin_with_large_side_chunks(tmp_path: Path) -> None:
    """Through a pipe (no seek): side chunks over the piece size are read past in pieces."""
    key = b"pipe key"
    encoder = Encoder(key=key)
    big = np.arange(600_000, dtype=np.float64)  # 4.8 MB: several pieces
    data = wire(Encoder().encode(big)) + wire(Encoder().encode([big[:10], "x"]))
    keyed = wire(encoder.encode(big)) + encoder.encode_end()
    key_file = tmp_path / "key"
    key_file.write_bytes(key)
    result = run_cli_bytes(["inspect", "-"], data)
    assert result.returncode == 0, result.stderr
    assert b"message 1 at offset" in result.stdout and b"(4800000)" in result.stdout
    result = run_cli_bytes(["inspect", "--key-file", str(key_file), "-"], keyed)
    assert result.returncode == 0, result.stderr
    assert b"tags: 2 verified, 0 failed" in result.stdout
    for file in (_Unseekable(data), _Unseekable(data[:-10])):
        records = list(inspect_messages(file))  # type: ignore[arg-type]
        assert records[0].ok and records[0].chunk_lengths == (4_800_000,)
    assert records[-1].fatal and records[-1].error is not None and "truncated" in records[-1].error


def test_json_is_one_document_with_records_and_a_summary(arrays_file: tuple[Path, list[Any]]) -> None:
    path, objects = arrays_file
    result = run_cli("inspect", "--json", str(path))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert len(doc["messages"]) == len(objects)
    first = doc["messages"][0]
    assert first["offset"] == 0 and first["version"] == 1 and first["chunk_lengths"] == [40]
    assert first["pickle"]["globals"][0]["name"] == "ndarray" and first["pickle"]["safe_loader_refuses"] is None
    assert doc["summary"]["messages"] == len(objects) and doc["summary"]["errors"] == 0
    cut = path.read_bytes()[:-3]
    broken = run_cli_bytes(["inspect", "--json", "-"], cut)
    assert broken.returncode == 1
    doc = json.loads(broken.stdout)
    assert doc["summary"]["errors"] == 1 and "truncated" in doc["messages"][-1]["error"]


def test_dis_lists_opcodes_and_is_bounded(arrays_file: tuple[Path, list[Any]]) -> None:
    path, _ = arrays_file
    result = run_cli("inspect", "--dis", str(path))
    assert result.returncode == 0, result.stderr
    for name in ("PROTO", "STACK_GLOBAL", "NEXT_BUFFER", "REDUCE", "STOP"):
        assert name in result.stdout
    short = run_cli("inspect", "--dis", "--dis-limit", "3", str(path))
    assert "more opcodes" in short.stdout and "NEXT_BUFFER" not in short.stdout
    assert "STACK_GLOBAL" not in run_cli("inspect", str(path)).stdout.replace("(STACK_GLOBAL", "")


CHILD = """
import collections, pickle, sys
with open(sys.argv[1], "wb") as f:
    for protocol in range(6):
        pickle.dump({"d": collections.OrderedDict(a=1), "t": "x" * 5, "b": b"y" * 70000, "p": protocol},
                    f, protocol=protocol)
    pickle.dump([1, 2, 3], f, protocol=5)
"""


def test_standard_pickles_of_every_protocol_from_a_child_process(tmp_path: Path) -> None:
    path = tmp_path / "std.pkl"
    subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, timeout=60)
    with path.open("rb") as f:
        records = list(inspect_pickles(f))
    assert [r.info.protocol for r in records] == [0, 1, 2, 3, 4, 5, 5]
    assert all(r.ok and r.info.stopped for r in records)
    data = path.read_bytes()
    offset = 0
    for record in records:
        assert record.offset == offset
        assert pickle.loads(data[offset : offset + record.info.size]) is not None  # our own data: a check
        offset += record.info.size
    assert offset == len(data)
    for record in records[:6]:
        names = {g.full_name for g in record.info.globals}
        assert "collections.OrderedDict" in names
        # only OrderedDict is refused: protocols 0-2 spell bytes as _codecs.encode, which a
        # PickleDecoder rebuilds safely
        assert [g.full_name for g in record.info.refused] == ["collections.OrderedDict"]
        assert ("_codecs.encode" in names) == (record.info.protocol in (0, 1, 2))
        assert record.info.verdict is not None and "OrderedDict" in record.info.verdict
    assert records[0].info.globals[0].opcode == "GLOBAL"
    assert records[5].info.globals[0].opcode == "STACK_GLOBAL"
    assert records[6].info.globals == []
    result = run_cli("inspect", "--pickle", str(path))
    assert result.returncode == 0, result.stderr
    assert "pickle 6 at offset" in result.stdout and "protocol 3" in result.stdout
    stdin = run_cli_bytes(["inspect", "--pickle", "--json", "-"], data)
    assert stdin.returncode == 0
    assert [p["protocol"] for p in json.loads(stdin.stdout)["pickles"]] == [0, 1, 2, 3, 4, 5, 5]
    cut = run_cli_bytes(["inspect", "--pickle", "-"], data[:-2])
    assert cut.returncode == 1 and f"at offset {records[6].offset}".encode() in cut.stderr
    assert b"truncated" in cut.stderr


def test_pickle_mode_refuses_garbage_without_a_traceback() -> None:
    (record,) = inspect_pickles(io.BytesIO(b"\x80\x05\xff\xff"))
    assert not record.ok and record.info.error is not None and "is not a pickle opcode" in record.info.error
    (record,) = inspect_pickles(io.BytesIO(b"(" * 5000))  # never stops
    assert not record.ok and record.info.error is not None and "truncated" in record.info.error
    result = run_cli_bytes(["inspect", "--pickle", "-"], b"\x80\x05\x8c\x02ab" + b"\x94" * 10)
    assert result.returncode == 1 and b"Traceback" not in result.stderr


def test_stack_global_names_through_the_memo_and_unknown_ones() -> None:
    # the module and name through BINGET, as a pickler's memo writes them the second time
    data = (b"\x80\x05\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94\x8c\x08builtins\x8c\x03int\x93"
            b"h\x00h\x01\x93" b"\x8c\x02ab\x85\x8c\x01c\x93" b"\x87.")
    info = analyze_pickle(data)
    names = [(g.full_name, g.count) for g in info.globals]
    assert names == [("builtins.eval", 2), ("builtins.int", 1), ("<not statically known>", 1)]
    assert all(g.refused for g in info.globals)
    assert info.globals[2].refused is not None and "str literals" in info.globals[2].refused


def test_hostile_mutations_never_crash() -> None:
    rng = random.Random(1234)
    encoder = Encoder(key=b"k")
    base = [
        streampickle.dumps({"x": np.arange(5), "y": [Recorded(1)]}) + streampickle.dumps("s"),
        wire(encoder.encode(np.ones(3))) + encoder.encode_end(),
        pickle.dumps({"a": [1, 2.0, "x"]}, protocol=2) + pickle.dumps(None, protocol=0),
    ]
    for i in range(600):
        data = bytearray(base[i % 3])
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.randint(0, len(data))] if i % 5 == 0 else data
        for record in inspect_messages(io.BytesIO(bytes(data)), key=b"k"):
            assert record.ok or (record.error or record.tag_ok is False or record.header_tag_ok is False)
            _inspect.render_text(record)
            json.dumps(_inspect.to_json(record))
        for pickled in inspect_pickles(io.BytesIO(bytes(data))):
            _inspect.render_text(pickled)
            json.dumps(_inspect.to_json(pickled))
    assert CALLED == []


def test_render_and_json_agree_on_a_record() -> None:
    (record,) = inspect_messages(io.BytesIO(streampickle.dumps(Recorded(1))))
    text = "\n".join(_inspect.render_text(record))
    doc = _inspect.to_json(record)
    assert doc["pickle"]["globals"][0]["refused"] in text
    assert isinstance(PickleRecord(0, 0, _inspect.PickleInfo()).ok, bool)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["inspect"],
        ["inspect", "--nope", "FILE"],
        ["inspect", "/no/such/file"],
        ["inspect", "--dis-limit", "-1", "FILE"],
        ["inspect", "--key-file", "/no/such/key", "FILE"],
        ["inspect", "--key-file", "EMPTY", "FILE"],
        ["inspect", "--allow", "os.system", "FILE"],
        ["inspect", "--max-pickle-size", "lots", "FILE"],
    ],
    ids=["no command", "no file", "unknown option", "missing file", "negative dis limit", "missing key",
         "empty key", "denied allow", "not a number"],
)
def test_usage_errors_exit_2(args: list[str], tmp_path: Path) -> None:
    (tmp_path / "EMPTY").write_bytes(b"")
    (tmp_path / "FILE").write_bytes(streampickle.dumps(1))
    args = [str(tmp_path / a) if a in ("FILE", "EMPTY") else a for a in args]
    result = run_cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("usage:") and result.stdout == ""


def test_a_usage_error_from_a_real_child_exits_2() -> None:
    result = run_cli_bytes(["inspect", "--allow", "os.system", "-"], b"")
    assert result.returncode == 2 and b"can never be allowed" in result.stderr and b"Traceback" not in result.stderr


def test_an_empty_input_is_an_empty_stream() -> None:
    result = run_cli_bytes(["inspect", "-"], b"")
    assert result.returncode == 0 and b"0 messages, 0 with errors" in result.stdout


def test_an_unsigned_message_under_a_key_file_is_an_error(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"k")
    path = tmp_path / "mixed.sp"
    path.write_bytes(streampickle.dumps(1, key=b"k") + streampickle.dumps(2))
    signed, unsigned = messages(path, key=b"k")
    assert signed.ok and signed.tag_ok
    assert not unsigned.ok and unsigned.tag_note is not None and "no tag" in unsigned.tag_note
    assert all(r.ok for r in messages(path))  # without a key there is nothing to hold it to
    result = run_cli("inspect", "--key-file", str(key_file), str(path))
    assert result.returncode == 1 and f"at offset {signed.size}" in result.stderr


def test_allow_on_the_command_line_judges_as_that_loader_would(tmp_path: Path) -> None:
    import uuid

    path = tmp_path / "enum.sp"
    path.write_bytes(streampickle.dumps(uuid.SafeUUID.safe))
    refused = run_cli("inspect", str(path))
    allowed = run_cli("inspect", "--allow", "uuid.SafeUUID", str(path))
    assert refused.returncode == allowed.returncode == 0
    assert "global uuid.SafeUUID" in refused.stdout and "REFUSED" in refused.stdout
    assert "admitted (allowed by allow=)" in allowed.stdout and "safe loader: accepts" in allowed.stdout


def test_a_stream_message_out_of_order_is_noted() -> None:
    encoder = Encoder(key=b"k")
    first, second, third = (wire(encoder.encode(i)) for i in range(3))
    end = encoder.encode_end()
    records = list(inspect_messages(io.BytesIO(first + third + second + end + first), key=b"k"))
    assert [r.sequence for r in records] == [0, 2, 1, 3, 0]
    notes = [r.stream_note for r in records]
    assert notes[0] is None and notes[3] is None
    assert notes[1] is not None and "sequence 2 where 1 was due" in notes[1]
    assert notes[2] is not None and "sequence 1 where 3 was due" in notes[2]
    assert notes[4] is not None and "after this sender's end" in notes[4]
    assert all(r.ok for r in records)  # each one authentic; the order is the stream decoder's business
    alone = streampickle.dumps(1, key=b"k")
    assert [r.stream_note for r in inspect_messages(io.BytesIO(alone * 3))] == [None] * 3


def test_pop_on_an_empty_frame_drops_the_mark_as_the_unpickler_does() -> None:
    data = b"\x80\x05(0\x8c\x0bcollections\x8c\x0bOrderedDict\x93."
    assert pickle.loads(data) is __import__("collections").OrderedDict  # our own bytes: a check of the premise
    info = analyze_pickle(data)
    assert [g.full_name for g in info.globals] == ["collections.OrderedDict"] and info.error is None


def test_a_version_1_keyed_message_of_the_spec_verifies() -> None:
    """The spec's worked example as written before version 2: flag bit 0 and a tag at the end."""
    body = bytearray(streampickle.dumps({"x": np.arange(3, dtype="<i2")}))
    body[5] = _wire.FLAG_MAC
    tag = bytes.fromhex("264e564cc6d82d6681bc85dd0ed1263c8d3197dd09709412d002fd4939315e8c")
    (record,) = inspect_messages(io.BytesIO(bytes(body) + tag), key=b"k")
    assert (record.version, record.mac, record.tag_ok, record.header_tag_ok) == (1, "hmac-sha256", True, None)
    assert record.size == 107 + 32 and record.ok
    (forged,) = inspect_messages(io.BytesIO(bytes(body) + bytes(32)), key=b"k")
    assert forged.tag_ok is False and not forged.ok
