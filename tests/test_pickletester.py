"""CPython's own pickle test battery, run through ``streampickle.dumps`` / ``loads``.

``Lib/test/pickletester.py`` is written once and bound to each pickler by giving it ``dumps``
and ``loads``; here they are streampickle's (``loads`` with ``trusted=True``: the battery
pickles its own classes, which the safe loader refuses by design). What it checks that is ours
to keep: every object the battery round-trips comes back equal, and every error it expects
from ``dumps`` is raised as that type (``TypeError`` for a ``staticmethod``, ``RuntimeError``
for a dict that changes while pickled...), being an :class:`EncodeError` as well.

The tests that can't pass are listed by name below, each with why; all are about pickle's
other protocols or about reading the result as a bare pickle, none about what comes back.
Without CPython's ``test`` package (some distributions leave it out) the module is skipped;
tests/test_encoder.py checks the error types without it.
"""

from __future__ import annotations

import unittest
from typing import Any

import pytest

import streampickle

pickletester = pytest.importorskip(
    "test.pickletester", reason="CPython's test package (Lib/test) is not installed with this Python"
)

_BARE_PICKLE = (
    "reads the result as a bare pickle (its opcodes, first bytes or exact bytes): a "
    "streampickle message starts with its 20-byte header"
)
_OLD_PROTOCOLS = (
    "expects what pickle writes at protocols 0-4 (opcodes, Python 2 names, the protocol "
    "passed to __reduce_ex__, errors only those protocols raise); dumps always writes protocol 5"
)
_OWN_BUFFERS = (
    "passes buffer_callback= to dumps or buffers= to loads: streampickle takes the out-of-band "
    "buffers itself and sends them as side chunks"
)

#: AbstractPickleTests that can't pass through dumps/loads, by name, with why.
EXCLUDED = {
    "test_appends_on_non_lists": _BARE_PICKLE,
    "test_setitems_on_non_dicts": _BARE_PICKLE,
    "test_simple_newobj": _BARE_PICKLE,
    "test_complex_newobj": _BARE_PICKLE,
    "test_complex_newobj_ex": _BARE_PICKLE,
    "test_dict_chunking": _BARE_PICKLE,
    "test_list_chunking": _BARE_PICKLE,
    "test_set_chunking": _BARE_PICKLE,
    "test_framing_large_objects": _BARE_PICKLE,
    "test_framing_many_objects": _BARE_PICKLE,
    "test_optional_frames": _BARE_PICKLE,
    "test_in_band_buffers": _BARE_PICKLE,
    "test_int_pickling_efficiency": _BARE_PICKLE,
    "test_long1": _BARE_PICKLE,
    "test_long4": _BARE_PICKLE,
    "test_proto": _BARE_PICKLE,
    "test_short_tuples": _BARE_PICKLE,
    "test_singletons": _BARE_PICKLE,
    "test_bytearray": _OLD_PROTOCOLS,
    "test_float_format": _OLD_PROTOCOLS,
    "test_global_ext1": _OLD_PROTOCOLS,
    "test_global_ext2": _OLD_PROTOCOLS,
    "test_global_ext4": _OLD_PROTOCOLS,
    "test_compat_pickle": _OLD_PROTOCOLS,
    "test_pickle_to_2x": _OLD_PROTOCOLS,
    "test_reduce_ex_called": _OLD_PROTOCOLS,
    "test_reduce_ex_calls_base": _OLD_PROTOCOLS,
    "test_reduce_ex_overrides_reduce": _OLD_PROTOCOLS,
    "test_bad_getattr": _OLD_PROTOCOLS,  # RuntimeError at protocols 0 and 1 only
    "test_builtin_exceptions": _OLD_PROTOCOLS,  # OSError's subclasses load as OSError at 0-2
    "test_picklebuffer_error": _OLD_PROTOCOLS,  # a PickleBuffer refused below protocol 5
    "test_oob_buffers": _OWN_BUFFERS,
    "test_buffer_callback_error": _OWN_BUFFERS,
    "test_buffers_error": _OWN_BUFFERS,
    "test_oob_buffers_writable_to_readonly": _OWN_BUFFERS,
    "test_inband_accept_default_buffers_argument": _OWN_BUFFERS,
    "test_buffers_numpy": (
        "expects the loaded array to share the original's memory (buffer_callback in one "
        "process); dumps joins a message into one bytes, so loads gets a copy"
    ),
    "test_framed_write_sizes_with_delayed_writer": (
        "drives a pickle.Pickler class (self.pickler) with its own file; streampickle has none"
    ),
    "test_newobj_not_class": (
        "expects loads to raise TypeError or pickle.UnpicklingError; streampickle raises "
        "MalformedPickleError (the message is dropped, the stream goes on), the original chained"
    ),
}

#: The tests this binding is here for: errors from dumps keep pickle's types.
ERROR_TYPE_TESTS = ("test_c_methods", "test_py_methods", "test_evil_class_mutating_dict")


class TestPickletesterThroughStreampickle(pickletester.AbstractPickleTests, unittest.TestCase):
    """AbstractPickleTests with streampickle's dumps (``proto`` is ignored: always 5) and
    trusted loads."""

    def dumps(self, arg: Any, proto: int | None = None, **kwargs: Any) -> bytes:
        if kwargs:  # buffer_callback=: the tests that pass it are excluded above
            raise TypeError(f"streampickle.dumps takes no {', '.join(kwargs)}")
        return streampickle.dumps(arg)

    def loads(self, buf: bytes, **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError(f"streampickle.loads takes no {', '.join(kwargs)}")
        return streampickle.loads(buf, trusted=True)


for _name, _reason in EXCLUDED.items():
    if hasattr(pickletester.AbstractPickleTests, _name):  # another Python may have renamed it
        setattr(TestPickletesterThroughStreampickle, _name, unittest.skip(_reason)(lambda self: None))


def test_the_error_type_tests_run_and_are_not_excluded() -> None:
    for name in ERROR_TYPE_TESTS:
        assert hasattr(pickletester.AbstractPickleTests, name) and name not in EXCLUDED


def test_the_binding_is_streampickle() -> None:
    """The battery really goes through the wire format: what dumps returns is a message."""
    case = TestPickletesterThroughStreampickle()
    data = case.dumps([1, "two", 3.0], 5)
    assert data.startswith(b"\x93SPK") and case.loads(data) == [1, "two", 3.0]
    with pytest.raises(TypeError) as info:
        case.dumps(staticmethod(len), 5)
    assert isinstance(info.value, streampickle.EncodeError)
