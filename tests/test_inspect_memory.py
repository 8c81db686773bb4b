"""The inspector holds a pickle once: a message whose pickle part is 64 MiB (a bytes literal
in-band), from a file and through a real pipe, and a 64 MiB standard pickle, are inspected
with tracemalloc's peak under 1.5 times the part (two copies, the pieces and their join, made
it 2.0)."""

from __future__ import annotations

import io
import pickle
import subprocess
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

import streampickle
from streampickle import _wire
from streampickle._inspect import inspect_messages, inspect_pickles

PART = 64 << 20


def peak_of(inspect: Callable[[IO[bytes]], Iterator[Any]], file: IO[bytes]) -> tuple[int, list[Any]]:
    """tracemalloc's peak while ``inspect`` reads all of ``file``, and its records."""
    tracemalloc.start()
    try:
        records = list(inspect(file))
        return tracemalloc.get_traced_memory()[1], records
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def big_message(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A keyed message whose pickle part holds a 64 MiB bytes literal, then a small one."""
    path = tmp_path_factory.mktemp("big") / "big.sp"
    message = streampickle.dumps(b"\x01" * PART, key=b"k")
    header = _wire.parse_header(message[: _wire.HEADER_SIZE])
    assert header.chunk_count == 0 and header.pickle_length > PART  # all of it in the pickle part
    path.write_bytes(message + streampickle.dumps([1, 2], key=b"k"))
    return path, header.pickle_length


def check(records: list[Any], part: int) -> None:
    first, second = records
    assert first.ok and first.tag_ok and first.pickle_length == part
    assert first.pickle.verdict is None and first.pickle.size == part
    assert second.ok and second.tag_ok


def test_a_large_pickle_part_from_a_file_is_held_once(big_message: tuple[Path, int]) -> None:
    path, part = big_message
    with path.open("rb") as f:
        peak, records = peak_of(lambda file: inspect_messages(file, key=b"k"), f)
    check(records, part)
    assert peak < 1.5 * part, f"peak {peak / part:.2f} times the pickle part"


def test_a_large_pickle_part_through_a_pipe_is_held_once(big_message: tuple[Path, int]) -> None:
    path, part = big_message
    with subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE) as producer:
        assert producer.stdout is not None
        peak, records = peak_of(lambda file: inspect_messages(file, key=b"k"), producer.stdout)
    assert producer.returncode == 0
    check(records, part)
    assert peak < 1.5 * part, f"peak {peak / part:.2f} times the pickle part"


def test_a_large_standard_pickle_is_held_once(tmp_path: Path) -> None:
    data = pickle.dumps(b"\x02" * PART, protocol=5)
    path = tmp_path / "big.pkl"
    path.write_bytes(data + pickle.dumps(None, protocol=2))
    del data
    size = path.stat().st_size - len(pickle.dumps(None, protocol=2))
    for opener in (lambda: path.open("rb"), lambda: io.BufferedReader(_Pipe(path))):
        with opener() as f:
            peak, records = peak_of(inspect_pickles, f)
        assert [r.ok for r in records] == [True, True]
        assert records[0].info.size == size and records[0].info.verdict is None
        assert peak < 1.5 * size, f"peak {peak / size:.2f} times the pickle"


class _Pipe(io.RawIOBase):
    """A file that can't seek (a pipe's interface), reading ``path`` 64 KiB at a time."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)[: 1 << 16]
        return self._file.readinto(view) or 0

    def close(self) -> None:
        self._file.close()
        super().close()
