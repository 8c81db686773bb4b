"""The inspector's verdicts: whether the safe loader would take a global a pickle names, and
the whole pickle, asked of the loader's own resolver and verifier, never of a copy of their
rules.

Why: the inspector's answer is only worth having if it is the loader's. Two kinds of pickle
are judged by two sets of rules, as the loaders judge them:

* a message's pickle part (``Decoder``): protocol 5 only, globals named by ``STACK_GLOBAL``
  and resolved by ``Loader.resolve`` (streampickle's reconstructors and ``allow=``), the
  whole pickle by ``Loader._verify`` (the fast scan, then the typed verifier);
* a standard pickle (``PickleDecoder``, ``load_pickle``): protocols 0-5, where ``GLOBAL`` is
  admitted too and names resolve through ``Loader.resolve_standard``, which adds numpy's own
  reducers (``numpy.core`` and ``numpy._core`` spellings), ``_codecs.encode`` and the other
  protocol 0-3 spellings (``_rebuild.STANDARD_NAMES``); the whole pickle by
  ``_verify.verify_standard``.

Neither calls anything a pickle names: the resolver imports only names the user allowed, and
the verifier runs the pickle machine on kinds, not objects. What the loader checks only while
unpickling (a reconstructor refusing its arguments' values: an array whose data is shorter
than its shape, a dtype state with a flipped bit) is not judged here.
"""

from __future__ import annotations

import pickle

from . import _verify
from ._allow import denied_reason
from ._errors import ForbiddenGlobalError, StreamPickleError
from ._inspect_source import cut
from ._safe import Loader

__all__ = ["Judge"]

#: Opcodes outside protocol 5's (the safe loader refuses them in a message's pickle part).
_FRAMED_REFUSED = frozenset(_verify._FORBIDDEN)
#: What stays refused in a standard pickle: the verifier admits the opcodes of protocols 0-4
#: (``_verify._STANDARD``) except those that name the copyreg registry or instantiate by name.
_STANDARD_REFUSED = frozenset(_verify._FORBIDDEN - _verify._STANDARD)


class Judge:
    """The safe loader's rules for one kind of pickle: a message's pickle part, or (with
    ``standard``) a standard pickle of any protocol."""

    def __init__(self, loader: Loader, *, standard: bool) -> None:
        self.loader = loader
        self.standard = standard
        self._resolve = loader.resolve_standard if standard else loader.resolve
        self._refused_ops = _STANDARD_REFUSED if standard else _FRAMED_REFUSED

    def name(self, module: str | None, name: str | None, opcode: str, position: int,
             unknown: str | None) -> tuple[str | None, str | None]:
        """Why the safe loader would refuse the global ``module.name``, named by ``opcode`` at
        pickle byte ``position`` (or None), and how it would admit it (or None). ``unknown``:
        why the walk could not tell the name (the loader refuses what it can't resolve)."""
        if unknown is not None or module is None or name is None:
            return f"{unknown or 'its name is not statically known'}: the safe loader refuses it", None
        full = f"{module}.{name}"
        code = getattr(pickle, opcode, b"")
        opcode_refused = None
        if isinstance(code, bytes) and code and code[0] in self._refused_ops:
            opcode_refused = (
                f"{opcode} is refused in standard pickles too: it instantiates a class by name, and "
                f"the safe loader names globals only with GLOBAL and STACK_GLOBAL" if self.standard else
                f"{opcode} is not a protocol-5 pickler's opcode, and the safe loader names globals only "
                f"with STACK_GLOBAL"
            )
        try:
            found = self._resolve(module, name, position)
        except ForbiddenGlobalError:
            why = denied_reason(full)
            name_refused = (
                f"never allowable: {why}" if why is not None
                else f"not allowed (allow=[{cut(full)!r}] would admit it)"
            )
            return (f"{opcode_refused}; and it is {name_refused}" if opcode_refused else name_refused), None
        except StreamPickleError as exc:
            return cut(str(exc), 300), None
        if found.rebuilder is not None:
            admitted = "a streampickle reconstructor"
        elif found.attribute_of:
            admitted = "only as getattr(allowed class, 'name') for an allowed 'module.Class.name'"
        else:
            admitted = "allowed by allow="
        return opcode_refused, admitted

    def pickle(self, data: bytes, chunk_count: int) -> str | None:
        """The safe loader's refusal of the whole pickle ``data``, from its verifier (None if
        it would accept it). ``chunk_count``: the side chunks of the message (0 for a
        standard pickle, which has none)."""
        loader = self.loader
        try:
            if self.standard:
                _verify.verify_standard(data, loader.resolve_standard, loader.max_opaque_keys,
                                        persistent=loader.persistent_load is not None)
            else:
                loader._verify(data, chunk_count)
        except _verify.Refused as refused:
            return cut(str(_verify.refusal(refused)), 400)
        except StreamPickleError as exc:
            return cut(str(exc), 400)
        except Exception as exc:  # noqa: BLE001 - the verifier's own failure is reported, not raised
            return f"the verifier failed: {type(exc).__name__}: {cut(str(exc))}"
        return None
