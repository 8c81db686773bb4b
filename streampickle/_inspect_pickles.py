"""The inspector's reading of standard pickle streams (``--pickle``): the concatenated pickles
``pickle.dump`` writes (protocols 0-5, with or without ``FRAME``), one :class:`PickleRecord`
each.

Why apart from messages: a standard pickle has no header, so its end is found by walking it
to its ``STOP``, and it is judged by the rules of :class:`streampickle.PickleDecoder`, not of
the framed format's ``Decoder``: ``GLOBAL`` and the opcodes of protocols 0-4 are admitted, and
numpy's own reducers and ``_codecs.encode`` resolve to streampickle's validating
reconstructors (``Judge(standard=True)``). The whole-pickle verdict needs the pickle's bytes,
so the walk records what it reads into one buffer, as the decoder holds it, up to
``Limits.max_pickle_size``; a pickle over that is an error where the decoder stops, and the
listing stops there too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from ._inspect_judge import Judge
from ._inspect_source import Source, Truncated
from ._inspect_walk import PickleInfo, Walk
from ._limits import Limits
from ._safe import Loader

__all__ = ["PickleRecord", "inspect_pickles"]


@dataclass
class PickleRecord:
    """One pickle of a stream of standard pickles (as ``pickle.dump`` writes them)."""

    index: int
    offset: int
    info: PickleInfo

    @property
    def ok(self) -> bool:
        return self.info.error is None


def inspect_pickles(file: IO[bytes], *, allow: Iterable[Any] = (), dis_limit: int = 0,
                    limits: Limits | None = None) -> Iterator[PickleRecord]:
    """The concatenated standard pickles in ``file`` (protocols 0 to 5), one record each, each
    walked to its STOP and judged as ``PickleDecoder(allow=allow)`` would judge it. A pickle
    that doesn't stop before the input ends, whose opcodes can't be read, or that is over
    ``limits.max_pickle_size`` is the last record, with its ``info.error`` set. Nothing is
    unpickled; a pickle is held once, for the verifier, and only up to the limit."""
    judge = Judge(Loader(allow=allow) if allow else Loader.shared(False), standard=True)
    limit = (limits or Limits()).max_pickle_size
    source = Source(file)
    index = 0
    while not source.at_end():
        offset = source.offset
        source.record(limit)
        walk = Walk(source, judge, dis_limit)
        try:
            info = walk.run()
        except Truncated:
            info = walk.info
            info.error = f"truncated: the input ends inside the pickle, before its STOP ({info.opcodes} opcodes read)"
        data = source.recorded()
        if info.error is None:
            if data is None:
                info.error = (
                    f"the pickle is {info.size} bytes, over Limits.max_pickle_size={limit}: a PickleDecoder "
                    f"refuses it and stops there (raise the limit with --max-pickle-size if the producer "
                    f"legitimately writes pickles this large)"
                )
            else:
                info.verdict = judge.pickle(data, 0)
        del data
        if info.error is not None:
            info.error = f"at offset {offset}: {info.error}"
        yield PickleRecord(index, offset, info)
        if info.error is not None:
            return
        index += 1
