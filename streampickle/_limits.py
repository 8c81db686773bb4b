"""The decoder's limits: how much a peer may make us hold, for how long, and why each default
is what it is.

Every size in a message header is checked against these before anything is allocated. They
bound what a peer can *claim*; what it actually costs is further bounded by what arrives,
because receive memory is committed only as bytes land (side-chunk destinations are
allocated uninitialised, the pickle part grows geometrically with the bytes received).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["Limits", "open_file_limit"]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def open_file_limit() -> int:
    """This process's soft limit on open files (``RLIMIT_NOFILE``), read each time since a
    program may raise it; unlimited or huge counts as 2**24, and a platform without the limit
    (Windows) as 1024. Shares of it bound what peers can make the process hold."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 1024
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 1 << 24:
        soft = 1 << 24
    return soft


@dataclass(frozen=True)
class Limits:
    """Sizes a peer's message may declare before the decoder refuses it.

    A value of a message that is over a limit raises :class:`LimitExceededError` as soon as the
    header carrying it has arrived; exactly at the limit is accepted. The two ``*_seconds``
    fields are deadlines, enforced by the async adapters (``ObjectStream.receive``, ``load``):
    past one, :class:`DeadlineExceededError` is raised. They run from the arrival of a
    message's first byte, so an idle connection *between* messages is never timed out by them
    (wrap ``receive`` in your own ``anyio.fail_after`` for that). ``None`` switches one off.
    """

    #: Whole message on the wire: header, length table, pickle, side chunks and tag.
    #: Default 64 GiB: this library exists to move arrays of many GiB, so the default must not
    #: be what stops them; it exists to reject nonsense (a 2**63 claim) at the header. A claim
    #: alone costs nothing, since memory is committed as bytes arrive. Lower it on servers that
    #: take connections from peers you don't control.
    max_message_size: int = 64 * GiB

    #: The pickle part (everything in-band). Default 4 GiB: in-band bytes are held twice while
    #: unpickling (the pickle and the objects built from it) and are parsed in one piece, so
    #: bulk data belongs in side chunks (numpy arrays and ``PickleBuffer``), which are free of
    #: this limit. Like h11's 16 KiB header cap, this keeps the parsed part bounded apart from
    #: the bulk data.
    max_pickle_size: int = 4 * GiB

    #: Side chunks (out-of-band buffers) in one message. Default 65,536: each costs 8 bytes
    #: in the length table (512 KiB at the cap) and one allocation, so a peer can't make us do
    #: millions of tiny allocations; a dict of thousands of arrays still fits.
    max_side_chunks: int = 65_536

    #: Descriptors (shared-memory files, on a ``shared_memory=True`` Unix socket) that one
    #: message may hand over, or that may wait unclaimed at once. Default 253, Linux's cap on
    #: the descriptors one ``sendmsg`` carries (``SCM_MAX_FD``): each is closed as soon as its
    #: ranges are mapped, so what this bounds is the descriptors a peer makes us hold at a time.
    max_descriptors: int = 253

    #: Dict keys and set items, in one message, whose hash the verifier can't compute: values a
    #: reconstructor built (UUIDs, Fractions, numpy scalars...), frozensets, tuples holding a
    #: str longer than 256 bytes, and instances of allowed classes. Keys whose hashes collide
    #: cost time quadratic in their number, and these are the keys a peer could make collide
    #: unseen (str and bytes hashes are salted; ints, floats and tuples the verifier hashes
    #: itself). Default 256: even if all of them collide, 256**2 / 2 comparisons at about
    #: 0.3 us each (a Fraction's ``__eq__``) cost about 10 ms, and costlier compares are
    #: charged to the work budget; raise it for peers you trust with more CPU.
    max_opaque_keys: int = 256

    #: Seconds a message's header (the fixed header and the length table) may take to arrive,
    #: counted from its first byte. Default 30: a header is at most 20 bytes plus 8 per side
    #: chunk, one round trip on any working link, so this only ever closes a peer that started
    #: a message and stalled (or a slowloris sending a byte now and then), which would
    #: otherwise hold its connection and what arrived for ever. Raise it for very slow links.
    #: A message that hands over descriptors (shared memory) is held to it whole, plus one
    #: second per 64 MiB that arrived of it (its ordinary arrays travel inline): what it
    #: holds meanwhile counts against a process-wide cap on descriptors.
    max_header_seconds: float | None = 30.0

    #: Seconds a whole message may take to arrive, counted from its first byte. Default 600
    #: (ten minutes): a peer that stalls inside a message is let go in bounded time, while a
    #: message near ``max_message_size`` still fits at about gigabit speed (64 GiB at 110
    #: MB/s is about 600 s). Raise it, or set ``None``, if your peers send messages of many
    #: GiB over slower links.
    max_message_seconds: float | None = 600.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_seconds"):
                if value is not None and (type(value) not in (int, float) or not value > 0):
                    raise ValueError(f"Limits.{f.name} must be a positive number of seconds or None, not {value!r}")
            elif type(value) is not int or value < 0:
                raise ValueError(f"Limits.{f.name} must be a non-negative int, not {value!r}")
