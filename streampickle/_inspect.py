"""The stream inspector behind ``python -m streampickle inspect``: what a captured stream holds,
message by message (or standard pickle by standard pickle), without unpickling anything.

Why: when a peer's messages are refused, or a capture must be audited, the question is what
the bytes say (sizes, flags, tags, the globals each pickle names and whether the safe loader
would take them), and answering it must not run the peer's code or hold its arrays.

Theory of operation. The work is split by job, each module saying why at its top:

* ``_inspect_source``: the input, read forwards in bounded pieces with every byte's offset;
  side chunks are seeked or read past, and the one part held whole (a pickle, for the
  verifier) is collected into one buffer, never a second copy;
* ``_inspect_walk``: one pickle's opcodes walked to its ``STOP`` with a model of the stack
  and memo that names the globals it uses statically, and ``--dis`` lines;
* ``_inspect_judge``: the safe loader's verdicts on each global and on the whole pickle,
  asked of the loader's own resolver and verifier, under the rules of the format the pickle
  came in (a message's pickle part, or a standard pickle of any protocol);
* ``_inspect_messages`` and ``_inspect_pickles``: the two readers, streampickle messages
  (``inspect_messages``) and standard pickle streams (``inspect_pickles``), returning records;
* ``_inspect_render``: records as text lines and JSON, and the run's summary;
* ``__main__``: the command line (arguments, output, exit status) and nothing else.

This module is the one import for all of it: the names below are the inspector's interface
inside the package.
"""

from __future__ import annotations

from ._inspect_messages import MessageRecord, analyze_pickle, inspect_messages
from ._inspect_pickles import PickleRecord, inspect_pickles
from ._inspect_render import Summary, render_text, summarize, to_json
from ._inspect_source import InspectError
from ._inspect_walk import DIS_LIMIT, GlobalUse, PickleInfo

__all__ = [
    "DIS_LIMIT",
    "GlobalUse",
    "InspectError",
    "MessageRecord",
    "PickleInfo",
    "PickleRecord",
    "Summary",
    "analyze_pickle",
    "inspect_messages",
    "inspect_pickles",
    "render_text",
    "summarize",
    "to_json",
]
