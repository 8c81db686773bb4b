"""The inspector's output: records as the listing's text lines (``render_text``), as JSON-ready
data (``to_json``), and the counts over a run (:class:`Summary`).

Why apart: the readers return plain records, so that tests and scripts can use them directly
and the two renderings can't disagree about a fact (both read the same fields). Every name or
message shown comes from the input and is shown bounded (``cut``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import _wire
from ._inspect_messages import MessageRecord, mac_name
from ._inspect_pickles import PickleRecord
from ._inspect_source import cut
from ._inspect_walk import PickleInfo

__all__ = ["Summary", "render_text", "summarize", "to_json"]


def _flag_names(flags: int, version: int) -> str:
    names = []
    if flags & _wire.FLAG_MAC:
        names.append({"blake3": "blake3 tag", "poly1305": "poly1305 tag"}.get(mac_name(flags), "HMAC-SHA256 tag"))
    if version == _wire.VERSION_KEYED and flags & _wire.FLAG_END:
        names.append("end of stream")
    if version == _wire.VERSION and flags & _wire.FLAG_SHARED:
        names.append("shared memory")
    return ", ".join(names) or "no tag"


def _pickle_lines(info: PickleInfo, indent: str) -> list[str]:
    lines = []
    for use in info.globals:
        times = f", {use.count} times" if use.count > 1 else ""
        where = f"{use.opcode} at pickle byte {use.position}{times}"
        verdict = f"REFUSED: {use.refused}" if use.refused else f"admitted ({use.admitted_as})"
        lines.append(f"{indent}global {cut(use.full_name)} ({where}): {verdict}")
    if info.more_globals:
        lines.append(f"{indent}... and {info.more_globals} more globals, not listed")
    return lines


def render_text(record: MessageRecord | PickleRecord) -> list[str]:
    """The listing's lines for one record."""
    if isinstance(record, PickleRecord):
        info = record.info
        lines = [
            f"pickle {record.index} at offset {record.offset}: {info.size} bytes, protocol {info.protocol}, "
            f"{info.opcodes} opcodes, {len(info.globals)} globals"
        ]
        lines += _pickle_lines(info, "  ")
        if info.error:
            lines.append(f"  ERROR {info.error}")
        else:
            lines.append("  safe loader: " + ("accepts" if info.verdict is None else f"REFUSES: {info.verdict}"))
        lines += ["  " + line for line in info.dis]
        return lines
    r = record
    if r.version is None:
        return [f"message {r.index} at offset {r.offset}: ERROR {r.error}"]
    assert r.flags is not None
    lines = [
        f"message {r.index} at offset {r.offset}: version {r.version}, flags {r.flags:#04x} "
        f"({_flag_names(r.flags, r.version)}), {r.size} bytes"
    ]
    if r.sender is not None:
        lines.append(f"  stream: sender {r.sender}{' (stands alone)' if r.sender == '00' * 8 else ''}, "
                     f"sequence {r.sequence}" + (f"; NOTE: {r.stream_note}" if r.stream_note else ""))
    if not r.end_of_stream:
        shown = ", ".join(map(str, r.chunk_lengths[:16])) + (", ..." if r.chunk_count > 16 else "")
        lines.append(f"  pickle part: {r.pickle_length} bytes; side chunks: {r.chunk_count}"
                     + (f" ({shown})" if r.chunk_count else ""))
    if r.descriptor_count is not None:
        lines.append(
            f"  shared table: {r.descriptor_count} descriptor{'' if r.descriptor_count == 1 else 's'} (they travel "
            f"beside the bytes, not in this file; only a shared_memory=True decoder takes such a message)"
        )
        for i, (index, offset) in enumerate(r.shared[:16]):
            where = "inline" if index == _wire.INLINE else f"descriptor {index}, offset {offset}"
            lines.append(f"    side chunk {i}: {where}")
        if len(r.shared) > 16:
            lines.append(f"    ... {len(r.shared) - 16} more")
    if r.mac is not None or r.tag_note is not None:
        lines.append(f"  tag: {r.mac or 'none'}: {_tag_text(r)}")
    if r.pickle is not None:
        info = r.pickle
        lines.append(f"  pickle: protocol {info.protocol}, {info.opcodes} opcodes, {len(info.globals)} globals")
        lines += _pickle_lines(info, "    ")
        lines.append("  safe loader: " + ("accepts" if info.verdict is None else f"REFUSES: {info.verdict}"))
    if r.error:
        lines.append(f"  ERROR {r.error}")
    if r.pickle is not None:
        lines += ["    " + line for line in r.pickle.dis]
    return lines


def _tag_text(r: MessageRecord) -> str:
    if r.tag_note is not None:
        return r.tag_note if r.tag_ok is not False else f"REFUSED: {r.tag_note}"
    parts = []
    if r.header_tag_ok is not None:
        parts.append("header tag " + ("verifies" if r.header_tag_ok else "DOES NOT VERIFY"))
    if r.tag_ok is not None:
        parts.append("tag " + ("verifies" if r.tag_ok else "DOES NOT VERIFY"))
    return ", ".join(parts) or "not checked"


def _pickle_json(info: PickleInfo) -> dict[str, Any]:
    return {
        "size": info.size,
        "protocol": info.protocol,
        "opcodes": info.opcodes,
        "buffers": info.buffers,
        "globals": [
            {"module": g.module, "name": g.name, "opcode": g.opcode, "position": g.position, "count": g.count,
             "refused": g.refused, "admitted_as": g.admitted_as}
            for g in info.globals
        ],
        "more_globals": info.more_globals,
        "error": info.error,
        "dis": info.dis,
    }


def to_json(record: MessageRecord | PickleRecord) -> dict[str, Any]:
    """One record as JSON-ready data."""
    if isinstance(record, PickleRecord):
        return {"index": record.index, "offset": record.offset, "ok": record.ok, **_pickle_json(record.info),
                "safe_loader_refuses": record.info.verdict}
    r = record
    out: dict[str, Any] = {
        "index": r.index, "offset": r.offset, "size": r.size, "ok": r.ok, "error": r.error,
        "version": r.version, "flags": r.flags, "chunk_count": r.chunk_count, "pickle_length": r.pickle_length,
        "chunk_lengths": list(r.chunk_lengths), "end_of_stream": r.end_of_stream,
        "sender": r.sender, "sequence": r.sequence, "stream_note": r.stream_note,
        "tag": None if r.mac is None and r.tag_note is None else {
            "mac": r.mac, "header_tag_ok": r.header_tag_ok, "tag_ok": r.tag_ok, "note": r.tag_note,
        },
        "shared": None if r.descriptor_count is None else {
            "descriptors": r.descriptor_count,
            "chunks": [None if i == _wire.INLINE else {"descriptor": i, "offset": o} for i, o in r.shared],
        },
        "pickle": None,
    }
    if r.pickle is not None:
        out["pickle"] = {**_pickle_json(r.pickle), "safe_loader_refuses": r.pickle.verdict}
    return out


@dataclass
class Summary:
    """Counts over the records of one run."""

    records: int = 0
    errors: int = 0
    refused: int = 0
    tags_verified: int = 0
    tags_failed: int = 0
    tags_unchecked: int = 0
    first_error: str | None = None

    def add(self, record: MessageRecord | PickleRecord) -> None:
        self.records += 1
        info = record.info if isinstance(record, PickleRecord) else record.pickle
        if info is not None and (info.refused or info.verdict):
            self.refused += 1
        if isinstance(record, MessageRecord) and (record.mac is not None or record.tag_ok is not None):
            if record.tag_ok is None and record.header_tag_ok is None:
                self.tags_unchecked += 1
            elif record.header_tag_ok is False or record.tag_ok is False:
                self.tags_failed += 1
            else:
                self.tags_verified += 1
        if not record.ok:
            self.errors += 1
            if self.first_error is None:
                self.first_error = _error_of(record)

    def as_json(self, kind: str) -> dict[str, Any]:
        return {
            kind: self.records, "errors": self.errors, "refused_by_safe_loader": self.refused,
            "tags_verified": self.tags_verified, "tags_failed": self.tags_failed,
            "tags_unchecked": self.tags_unchecked, "first_error": self.first_error,
        }

    def text(self, kind: str) -> str:
        tags = (f", tags: {self.tags_verified} verified, {self.tags_failed} failed, {self.tags_unchecked} unchecked"
                if self.tags_verified + self.tags_failed + self.tags_unchecked else "")
        return (f"{self.records} {kind}, {self.errors} with errors, {self.refused} the safe loader would refuse"
                f"{tags}")


def _error_of(record: MessageRecord | PickleRecord) -> str:
    if isinstance(record, PickleRecord):
        return record.info.error or ""
    if record.error:
        return record.error
    if record.tag_note is not None:
        return f"at offset {record.offset}: {record.tag_note}"
    return f"at offset {record.offset}: the message's tag does not verify under the key (wrong key, or altered bytes)"


def summarize(records: Iterable[MessageRecord | PickleRecord]) -> Summary:
    summary = Summary()
    for record in records:
        summary.add(record)
    return summary
