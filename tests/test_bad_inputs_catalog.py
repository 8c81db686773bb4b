"""Hostile messages that the other test files did not yet pin, each with its safe outcome.

Every test here decodes messages whose bytes a peer (or whoever controls the channel) chose,
and checks the one outcome that is safe for them: the message *dropped alone* (a typed error,
the stream still usable, the next message decoded normally), the stream *poisoned* (a framing
limit), or the message *delivered* within a stated bound. They complete what
``test_bad_inputs.py``, ``test_attacks.py`` and ``test_safe.py`` cover:

* framing: genuine keyed messages replayed, dropped or reordered on the channel;
* opcodes: strings holding a lone UTF-16 surrogate (loaded as the str Python allows), and an
  unknown opcode in safe and trusted mode;
* code execution: the builtins that run code or open files, the alternative process, import,
  code, native-code, file and nested-loader primitives published bypasses use, the copyreg
  extension registry (``EXT1/2/4``), persistent ids, the guard's own modules, ``BUILD`` on
  allowed globals and on allowed instances, mutation opcodes on containers of the wrong type,
  and all of these again from a peer that holds the key (a MAC proves origin, not benign
  content);
* resource exhaustion: callables that allocate from a size argument, a memo DAG with 2**60
  paths (decoded without ever walking the result), a megabyte of empty containers (within
  the documented memory bound of 512 bytes per message byte), a million ``MARK``s,
  unhashable keys, a 10 MB ``LONG4`` and 10**5
  one-element numpy arrays (one side chunk each).

No test asserts timing: inputs are sized so that the unsafe behaviour (a recursive walk of
2**60 nodes) would never finish.
"""

from __future__ import annotations

import copyreg
import pickle
import struct
from typing import Any

import numpy as np
import pytest

import streampickle
from _util import make_message
from streampickle import (
    AuthenticationError,
    Decoder,
    ForbiddenGlobalError,
    LimitExceededError,
    Limits,
    MalformedPickleError,
    StreamPickleError,
    UsageError,
)
from test_bad_inputs import (
    AFTER_OBJ,
    HEADER_SIZE,
    P5,
    assert_dropped_alone,
    assert_poisoned,
    feed_bytewise,
    glob,
    s,
    traced,
)
from test_safe import canary  # noqa: F401 - a fixture: the file an attack would create

KEY = b"keyed peer secret"
KiB = 1 << 10
MiB = 1 << 20

def memo_get(index: int) -> bytes:  # BINGET / LONG_BINGET
    return b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)


def rebuild(name: str) -> bytes:  # one of streampickle's own reconstructors, by its wire name
    return glob("streampickle._rebuild", name)


# -- classes a receiving user might allow ------------------------------------------------------


class Reading:
    """An allowed value type that validates the state ``BUILD`` hands it, as a type must if a
    peer may send it: exactly the attributes ``sensor`` (str) and ``value`` (float)."""

    def __init__(self, sensor: str, value: float) -> None:
        self.__setstate__({"sensor": sensor, "value": value})

    def __setstate__(self, state: Any) -> None:
        if type(state) is not dict or set(state) != {"sensor", "value"}:
            raise ValueError("a Reading's state is exactly {'sensor', 'value'}")
        if type(state["sensor"]) is not str or type(state["value"]) is not float:
            raise TypeError("a Reading's sensor is a str and its value a float")
        self.__dict__.update(state)


# =============================================================================================
# Framing: keyed messages replayed, dropped or reordered
# =============================================================================================


def _three_keyed_messages() -> list[bytes]:
    encoder = streampickle.Encoder(key=KEY)
    return [b"".join(bytes(c) for c in encoder.encode(f"message {i}")) for i in range(3)]


@pytest.mark.parametrize("order", [(0, 0), (0, 2), (1, 0), (0, 1, 0)],
                         ids=["replayed", "one-dropped", "reordered", "replayed-later"])
@pytest.mark.parametrize("whole", [True, False], ids=["whole", "bytewise"])
def test_a_keyed_message_out_of_sequence_is_an_authentication_error(order: tuple[int, ...], whole: bool) -> None:
    """Someone between the peers re-sends a genuine keyed message, drops one, or swaps two. The
    tags are all genuine, so only a sequence number inside the MAC input can tell; the safe
    outcome is an AuthenticationError on the first out-of-sequence message, before any of it
    is unpickled, and a poisoned decoder."""
    messages = _three_keyed_messages()
    decoder = Decoder(key=KEY)
    for due, index in enumerate(order):
        if index != due:
            break
        if whole:
            decoder.feed(messages[index])
        else:
            assert feed_bytewise(decoder, messages[index]) is None
        assert next(decoder) == f"message {index}"
    refused = f"message number {index} of the stream arrived where number {due} was due"
    if whole:
        with pytest.raises(AuthenticationError, match=refused):
            decoder.feed(messages[index])
    else:  # refused as its header tag completes, before a byte of its pickle is taken
        position, error = feed_bytewise(decoder, messages[index]) or (None, None)
        assert isinstance(error, AuthenticationError) and refused in str(error)
        assert position == HEADER_SIZE + 16 + 32 - 1
    assert decoder.failed and decoder.pending == 0


# =============================================================================================
# Malformed opcodes: strings that are not valid text
# =============================================================================================


@pytest.mark.parametrize("raw", [b"\xed\xa0\x80", b"\xed\xbf\xbf", b"a\xed\xb0\x80b"],
                         ids=["high-d800", "low-dfff", "low-inside-text"])
@pytest.mark.parametrize("opcode", [b"\x8c", b"X", b"\x8d"], ids=["short_binunicode", "binunicode", "binunicode8"])
def test_a_lone_surrogate_in_a_string_loads_as_the_str_python_allows(raw: bytes, opcode: bytes) -> None:
    """A Python str may hold a lone surrogate (U+D800-U+DFFF), and pickle writes one as its
    3-byte "surrogatepass" form; ``streampickle.dumps`` does too, and such a str must come
    back. So this is not refused: it loads as exactly that str (whose ``.encode()`` raises in
    the application, as it would have in the sender's). docs/security.md says so."""
    width = {b"\x8c": 1, b"X": 4, b"\x8d": 8}[opcode]
    pickled = P5 + opcode + len(raw).to_bytes(width, "little") + raw + b"."
    text = raw.decode("utf-8", "surrogatepass")
    assert streampickle.loads(make_message(pickled)) == text
    assert streampickle.loads(streampickle.dumps(text)) == text


@pytest.mark.parametrize("trusted", [False, True], ids=["safe", "trusted"])
def test_an_unknown_opcode_drops_the_message_with_the_unpicklers_error_chained_when_it_runs(trusted: bool) -> None:
    """0xff is no opcode. The safe loader refuses it before unpickling, naming it and its
    offset; a trusted loader hands the pickle to the unpickler, whose "invalid load key"
    arrives chained. Either way only this message is lost."""
    err = assert_dropped_alone(make_message(P5 + b"N\xff."), trusted=trusted)
    if trusted:
        assert isinstance(err.__cause__, pickle.UnpicklingError) and "invalid load key" in str(err.__cause__)
    else:
        assert "at byte 3: unknown opcode 0xff" in str(err)


# =============================================================================================
# Code execution in the safe loader
# =============================================================================================


def _forbidden(pickled: bytes, module: str, name: str, **options: Any) -> None:
    """The message is dropped alone with a ForbiddenGlobalError naming exactly ``module.name``
    (the pair find_class would have been given), with the stream still usable after it."""
    err = assert_dropped_alone(make_message(pickled), ForbiddenGlobalError, **options)
    assert (err.module, err.name) == (module, name)  # type: ignore[attr-defined]


BUILTIN_CALLS = {
    "eval": lambda c: s(f"open({str(c)!r}, 'w').close()") + b"\x85",
    "exec": lambda c: s(f"open({str(c)!r}, 'w').close()") + b"\x85",
    "compile": lambda c: s(f"open({str(c)!r}, 'w')") + s("<peer>") + s("exec") + b"\x87",
    "__import__": lambda c: s("os") + b"\x85",
    "getattr": lambda c: rebuild("ellipsis") + s("__call__") + b"\x86",
    "setattr": lambda c: rebuild("ellipsis") + s("_func") + b"N\x87",
    "open": lambda c: s(str(c)) + s("w") + b"\x86",
}


@pytest.mark.parametrize("name", BUILTIN_CALLS)
def test_reduce_on_a_builtin_that_runs_code_or_opens_files_is_forbidden(name: str, canary) -> None:  # noqa: F811
    """``REDUCE`` of ``builtins.<name>`` with arguments that would create the canary file (or
    reach an attribute of the guard): refused at the ``STACK_GLOBAL``, before any call, with or
    without other names allowed."""
    pickled = P5 + glob("builtins", name) + BUILTIN_CALLS[name](canary) + b"R."
    _forbidden(pickled, "builtins", name)
    _forbidden(pickled, "builtins", name, allow=[Reading])


# What published bypasses of pickle scanners and restricted unpicklers call instead of
# os.system: other process, import, code, native-code, file and nested-loader primitives.
ALTERNATIVE_PRIMITIVES = [
    ("posix", "system"), ("nt", "system"), ("os", "popen"), ("os", "execv"), ("subprocess", "Popen"),
    ("subprocess", "run"), ("subprocess", "check_output"), ("subprocess", "getoutput"), ("pty", "spawn"),
    ("runpy", "_run_code"), ("runpy", "run_path"), ("importlib", "import_module"), ("pkgutil", "resolve_name"),
    ("marshal", "loads"), ("types", "FunctionType"), ("types", "CodeType"), ("ctypes", "CDLL"),
    ("ctypes", "cdll"), ("ctypes", "memmove"), ("ctypes", "string_at"), ("pickle", "loads"), ("_pickle", "loads"),
    ("operator", "attrgetter"), ("operator", "methodcaller"), ("_operator", "methodcaller"), ("functools", "partial"),
    ("code", "InteractiveInterpreter"), ("asyncio", "create_subprocess_shell"), ("asyncio", "create_subprocess_exec"),
    ("cProfile", "run"), ("pydoc", "pipepager"), ("uuid", "_get_command_stdout"),
    ("distutils.file_util", "write_file"), ("io", "FileIO"), ("_io", "FileIO"), ("torch.utils.collect_env", "run"),
    ("multiprocessing.util", "spawnv_passfds"), ("numpy.f2py.diagnose", "run_command"),
    ("numpy.distutils.exec_command", "exec_command"), ("pandas", "read_csv"),
]


@pytest.mark.parametrize(
    ("module", "name"), ALTERNATIVE_PRIMITIVES, ids=[f"{m}.{n}" for m, n in ALTERNATIVE_PRIMITIVES]
)
def test_alternative_code_execution_primitives_are_forbidden(module: str, name: str, canary) -> None:  # noqa: F811
    pickled = P5 + glob(module, name) + s(f"touch {canary}") + b"\x85R."
    _forbidden(pickled, module, name)
    _forbidden(pickled, module, name, allow=[Reading, "numpy.ndarray"])


def test_an_allowlist_of_numpy_names_admits_no_other_numpy_name(canary) -> None:  # noqa: F811
    """Allowing some numpy names admits exactly them: not a function of a numpy submodule,
    not a method of an allowed class, whatever way the name is split between the two strings
    of STACK_GLOBAL. A bare module can't be allowed at all."""
    allow = ["numpy.ndarray", "numpy.dtype", "numpy.prod"]
    attempts = [
        ("numpy.f2py.diagnose", "run_command"),
        ("numpy", "f2py.diagnose.run_command"),
        ("numpy.f2py", "diagnose.run_command"),
        ("numpy", "ndarray.tofile"),
        ("numpy", "prod.__globals__"),
        ("numpy", "load"),
    ]
    for module, name in attempts:
        _forbidden(P5 + glob(module, name) + s(str(canary)) + b"\x85R.", module, name, allow=allow)
    with pytest.raises(UsageError):
        Decoder(allow=["numpy"])


@pytest.fixture()
def extension_codes():
    """The copyreg extension registry of this process maps one code of each width to a
    function that runs a command: an unpickler that honoured EXT1/EXT2/EXT4 would fetch it
    without asking find_class (the registry caches what it resolved)."""
    codes = {b"\x82": (0xF3, "os", "system"), b"\x83": (0xF3F3, "posix", "system"),
             b"\x84": (0x7FF3F3F3, "subprocess", "getoutput")}
    for code, module, name in codes.values():
        copyreg.add_extension(module, name, code)
    try:
        yield {opcode: code for opcode, (code, _, _) in codes.items()}
    finally:
        for code, module, name in codes.values():
            copyreg.remove_extension(module, name, code)


@pytest.mark.parametrize("opcode", [b"\x82", b"\x83", b"\x84"], ids=["EXT1", "EXT2", "EXT4"])
def test_extension_registry_opcodes_are_not_allowed(opcode: bytes, extension_codes, canary) -> None:  # noqa: F811
    width = {b"\x82": 1, b"\x83": 2, b"\x84": 4}[opcode]
    code = extension_codes[opcode].to_bytes(width, "little")
    pickled = P5 + opcode + code + s(f"touch {canary}") + b"\x85R."
    err = assert_dropped_alone(make_message(pickled))
    name = {1: "EXT1", 2: "EXT2", 4: "EXT4"}[width]
    assert f"at byte 2: opcode {name} is not allowed" in str(err)


@pytest.mark.parametrize("trusted", [False, True], ids=["safe", "trusted"])
@pytest.mark.parametrize("pickled", [P5 + b"Pos.system\n.", P5 + s("os.system") + b"Q."], ids=["PERSID", "BINPERSID"])
def test_persistent_ids_drop_the_message(pickled: bytes, trusted: bool) -> None:
    """No persistent_load exists, in either mode: the safe loader refuses the opcode itself,
    and a trusted one chains the unpickler's own refusal."""
    err = assert_dropped_alone(make_message(pickled), trusted=trusted)
    if trusted:
        assert "persistent_load" in str(err.__cause__)
    else:
        assert "PERSID is not allowed" in str(err)


@pytest.mark.parametrize(
    "target",
    [glob("numpy", "prod"), glob("test_bad_inputs_catalog", "Reading")],
    ids=["allowed-function", "allowed-class"],
)
@pytest.mark.parametrize(
    "state",
    [
        b"}" + s("__doc__") + s("pwned") + b"s",
        b"N}" + s("__kwdefaults__") + b"}s\x86",
        b"N}" + s("__init__") + b"Ns\x86",
    ],
    ids=["dict-state", "slot-state", "slot-state-init"],
)
def test_build_on_an_allowed_function_or_class_object_is_refused(target: bytes, state: bytes) -> None:
    """BUILD sets attributes on whatever is under it: aimed at an allowed global itself (a
    numpy function, a class) rather than at an instance this message made, it would change
    that object for the whole process."""
    doc, kwdefaults = np.prod.__doc__, getattr(np.prod, "__kwdefaults__", None)
    err = assert_dropped_alone(make_message(P5 + target + state + b"b."), allow=["numpy.prod", Reading])
    assert "BUILD on a global" in str(err)
    assert np.prod.__doc__ == doc and getattr(np.prod, "__kwdefaults__", None) == kwdefaults
    assert Reading.__init__.__qualname__ == "Reading.__init__"


def _reading(state: bytes) -> bytes:
    """A Reading made by NEWOBJ, then BUILD with ``state``."""
    return P5 + glob("test_bad_inputs_catalog", "Reading") + b")\x81" + state + b"b."


@pytest.mark.parametrize(
    ("state", "cause"),
    [
        (b"}(" + s("sensor") + s("t1") + s("value") + b"G" + struct.pack(">d", 1.5) + s("admin") + b"\x88u",
         ValueError),
        (b"}(" + s("sensor") + s("t1") + s("value") + s("1.5") + b"u", TypeError),
        (b"}(" + s("sensor") + b"K\x01" + s("value") + b"G" + struct.pack(">d", 1.5) + b"u", TypeError),
        (b"N", ValueError),
        (b"]", ValueError),
    ],
    ids=["unknown-attribute", "value-not-a-float", "sensor-not-a-str", "none", "list"],
)
def test_build_with_state_an_allowed_type_rejects_drops_the_message(state: bytes, cause: type) -> None:
    """BUILD bypasses ``__init__``: the peer chooses the state. A type safe to allow validates
    it in ``__setstate__``; its refusal drops the message, with the type's error chained."""
    good = streampickle.loads(make_message(_reading(b"}(" + s("sensor") + s("t1") + s("value")
                                                     + b"G" + struct.pack(">d", 1.5) + b"u")), allow=[Reading])
    assert (type(good), good.sensor, good.value) == (Reading, "t1", 1.5)
    err = assert_dropped_alone(make_message(_reading(state)), allow=[Reading])
    assert isinstance(err.__cause__, cause)


MUTATIONS = {
    "setitem-into-list": b"]NaK\x00K\x05s",
    "setitems-into-list": b"](NNe(K\x00K\x05K\x01K\x06u",
    "setitem-into-tuple": b")K\x00Ns",
    "setitem-into-str": s("ab") + b"K\x00Ns",
    "setitem-into-bytearray": b"\x96" + struct.pack("<Q", 2) + b"abK\x00K\x01s",
    "append-into-dict": b"}Na",
    "append-into-tuple": b")Na",
    "appends-into-set": b"\x8f(Ne",
    "appends-into-str": s("a") + b"(Ne",
    "appends-into-bytearray": b"\x96" + struct.pack("<Q", 1) + b"a(K\x41e",
    "additems-into-list": b"](N\x90",
    "additems-into-frozenset": b"(\x91(N\x90",
}


@pytest.mark.parametrize("via_global", [False, True], ids=["plain", "with-a-global"])
@pytest.mark.parametrize("name", MUTATIONS)
def test_mutation_opcodes_on_the_wrong_kind_of_container_drop_the_message(name: str, via_global: bool) -> None:
    """SETITEM(S), APPEND(S) and ADDITEMS call ``__setitem__``, ``append``/``extend`` and
    ``add`` on their target: only a dict, list or set this pickle made may be one (a list's
    and a bytearray's ``__setitem__`` work on int keys, a bytearray has ``extend``: an
    unchecked unpickler accepts those). Checked on the plain fast path and on the full
    verifier (which a global in the pickle brings in)."""
    prefix = rebuild("ellipsis") + b")R0" if via_global else b""
    err = assert_dropped_alone(make_message(P5 + prefix + MUTATIONS[name] + b"."))
    assert "into a" in str(err)


GUARD_NAMES = [
    ("streampickle", "loads"), ("streampickle._safe", "Loader"), ("streampickle._allow", "parse_allow"),
    ("streampickle._allow", "DENIED"), ("streampickle._verify", "MAX_OPEN_MARKS"), ("streampickle._scan", "scan_py"),
    ("streampickle._rebuild", "Rebuilder"), ("streampickle._rebuild", "np"), ("streampickle", "_rebuild.np.load"),
    ("fickling", "always_check_safety"), ("fickling.fickle", "Pickled"), ("picklescan.scanner", "scan_pickle_bytes"),
    ("modelscan.modelscan", "ModelScan"),
]


@pytest.mark.parametrize(("module", "name"), GUARD_NAMES, ids=[f"{m}.{n}" for m, n in GUARD_NAMES])
def test_a_pickle_naming_the_guard_itself_is_forbidden(module: str, name: str) -> None:
    """A pickle that reaches the safe loader's own modules (or a scanner's) could switch the
    checks off for the rest of the process; streampickle's reconstructors are the only names
    of it a pickle may use."""
    pickled = P5 + glob(module, name) + b"N\x85R."
    _forbidden(pickled, module, name)
    _forbidden(pickled, module, name, allow=[Reading])
    with pytest.raises(UsageError, match="can never be allowed"):
        Decoder(allow=[f"{module}.{name}"])


def _keyed_dropped_alone(pickled: bytes, error: type[StreamPickleError], **options: Any) -> None:
    """A genuine keyed message (its tag right) carrying ``pickled`` is dropped alone with
    exactly ``error``: the keyed message after it decodes, fed whole and byte by byte."""
    encoder = streampickle.Encoder(key=KEY)  # the stream the attack is the first message of
    # tagged by hand, independently of the library
    attack = make_message(pickled, key=KEY, sender=encoder._sender, sequence=0)
    encoder._sequence = 1
    after = b"".join(encoder.encode(AFTER_OBJ))
    with pytest.raises(error) as info:
        streampickle.loads(attack, key=KEY, **options)
    assert type(info.value) is error
    for whole in (True, False):
        decoder = Decoder(key=KEY, **options)
        if whole:
            decoder.feed(attack + after)
        else:
            assert feed_bytewise(decoder, attack + after) is None  # the tag verified
        with pytest.raises(error) as info:
            next(decoder)
        assert type(info.value) is error and not decoder.failed
        out = next(decoder)
        assert out.keys() == AFTER_OBJ.keys() and np.array_equal(out["after"], AFTER_OBJ["after"])


KEYED_ATTACKS = {
    "global-opcode-os-system": (b"cos\nsystem\n(S'true'\ntR.", MalformedPickleError, {}),
    "stack-global-os-system": (P5 + glob("os", "system") + s("true") + b"\x85R.", ForbiddenGlobalError, {}),
    "memoized-names": (P5 + s("os") + b"\x94" + s("system") + b"\x9400h\x00h\x01\x93" + s("true") + b"\x85R.",
                       ForbiddenGlobalError, {}),
    "builtins-eval": (P5 + glob("builtins", "eval") + s("1") + b"\x85R.", ForbiddenGlobalError, {}),
    "subprocess-popen": (P5 + glob("subprocess", "Popen") + s("true") + b"\x85R.", ForbiddenGlobalError, {}),
    "numpy-f2py-under-numpy-allow": (P5 + glob("numpy.f2py.diagnose", "run_command") + s("true") + b"\x85R.",
                                     ForbiddenGlobalError, {"allow": ["numpy.ndarray"]}),
    "dotted-subclasses": (P5 + glob("builtins", "object.__subclasses__") + b")R.", ForbiddenGlobalError, {}),
    "inst": (P5 + b"(ios\nsystem\n.", MalformedPickleError, {}),
    "obj": (P5 + b"(" + rebuild("ellipsis") + b"o.", MalformedPickleError, {}),
    "ext1": (P5 + b"\x82\x01)R.", MalformedPickleError, {}),
    "binpersid": (P5 + s("x") + b"Q.", MalformedPickleError, {}),
    "build-on-allowed-function": (P5 + glob("numpy", "prod") + b"}" + s("__doc__") + s("x") + b"sb.",
                                  MalformedPickleError, {"allow": ["numpy.prod"]}),
    "build-with-bad-state": (_reading(b"}(" + s("sensor") + s("t") + s("admin") + b"\x88u"), MalformedPickleError,
                             {"allow": [Reading]}),
    "setitem-into-list": (P5 + b"]K\x00Ns.", MalformedPickleError, {}),
    "guard-itself": (P5 + glob("streampickle._safe", "Loader") + b")R.", ForbiddenGlobalError, {}),
}


@pytest.mark.parametrize("name", KEYED_ATTACKS)
def test_an_authenticated_peer_gets_the_same_refusals(name: str) -> None:
    """A MAC proves who sent a message, not that it is harmless: with a key configured (and
    trusted left False) every code-execution attempt is refused exactly as from an
    unauthenticated peer, after its tag verified, and the keyed stream goes on."""
    pickled, error, options = KEYED_ATTACKS[name]
    _keyed_dropped_alone(pickled, error, **options)


# =============================================================================================
# Resource exhaustion through pickle semantics
# =============================================================================================


def _memo_dag(levels: int, kind: str) -> bytes:
    """A str, then ``levels`` containers each holding the one below twice, through the memo:
    2**levels paths from the top to the str, in a few bytes per level."""
    body = s("leaf") + b"\x940"  # memo 0
    for i in range(levels):
        if kind == "tuple":
            body += memo_get(i) + memo_get(i) + b"\x86\x940"
        else:
            body += b"](" + memo_get(i) + memo_get(i) + b"e\x940"
    return body + memo_get(levels)


@pytest.mark.parametrize("kind", ["tuple", "list"])
@pytest.mark.parametrize("how", ["loads", "decoder", "full-verifier", "trusted"])
def test_a_memo_dag_with_2_60_paths_decodes_without_walking_the_result(kind: str, how: str) -> None:
    """60 levels of a container holding the level below twice: about 500 bytes, 2**60 paths.
    Anything that walks the result recursively (a copy, a check, an equality) would never
    finish; this test's own check follows one path and compares identities."""
    dag = _memo_dag(60, kind)
    if how == "full-verifier":  # a global in the pickle sends it through the typed walk
        message = make_message(P5 + rebuild("ellipsis") + b")R" + dag + b"\x86.")
    else:
        message = make_message(P5 + dag + b".")
    assert len(message) < 700
    if how == "decoder":
        decoder = Decoder()
        decoder.feed(message)
        out = next(decoder)
    else:
        out = streampickle.loads(message, trusted=how == "trusted")
    if how == "full-verifier":
        assert out[0] is Ellipsis
        out = out[1]
    node = out
    for level in range(60):
        assert type(node).__name__ == kind and len(node) == 2, level
        assert node[0] is node[1], level  # one object, shared: never copied apart
        node = node[0]
    assert node == "leaf"


def test_the_memo_dag_written_with_protocol_1_memo_opcodes_is_refused() -> None:
    """The same bomb as a protocol-1 pickler would write it (LONG_BINGET i twice, TUPLE2,
    LONG_BINPUT i+1, POP): LONG_BINPUT is not an opcode a protocol-5 pickler writes."""
    body = s("leaf") + b"r" + struct.pack("<I", 0) + b"0"
    for i in range(60):
        body += b"j" + struct.pack("<I", i) + b"j" + struct.pack("<I", i) + b"\x86r" + struct.pack("<I", i + 1) + b"0"
    err = assert_dropped_alone(make_message(P5 + body + b"j" + struct.pack("<I", 60) + b"."))
    assert "LONG_BINPUT is not allowed" in str(err)


@pytest.mark.parametrize("op", [b"\x8f", b"}", b"]"], ids=["EMPTY_SET", "EMPTY_DICT", "EMPTY_LIST"])
def test_a_megabyte_of_empty_containers_stays_within_512_bytes_per_message_byte(op: bytes) -> None:
    """One byte each, an empty set costs 216 bytes of memory, a dict 64, a list 56. Accepted
    as data, their cost is bounded by the receiver's memory bound of 512 bytes per message
    byte (there is no opcode budget): measured as the traced peak, result included."""
    message = make_message(P5 + b"](" + op * MiB + b"e.")
    with traced() as peak:
        out = streampickle.loads(message)
        assert len(out) == MiB and type(out[-1]) is {b"\x8f": set, b"}": dict, b"]": list}[op]
        del out
    assert peak[0] <= 512 * len(message), peak[0] / len(message)


def _int(value: int) -> bytes:  # BININT or LONG1
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


SIZE_TAKING_CALLS = {
    "bytearray-of-1-gib": (glob("builtins", "bytearray") + _int(2**30) + b"\x85R", ForbiddenGlobalError),
    "numpy-reconstruct-256-mib": (glob("numpy._core.multiarray", "_reconstruct") + glob("numpy", "ndarray")
                                  + _int(2**28) + b"\x85C\x01b\x87R", ForbiddenGlobalError),
    "numpy-core-reconstruct-256-mib": (glob("numpy.core.multiarray", "_reconstruct") + glob("numpy", "ndarray")
                                       + _int(2**28) + b"\x85C\x01b\x87R", ForbiddenGlobalError),
    "numpy-empty": (glob("numpy", "empty") + _int(2**28) + b"\x85R", ForbiddenGlobalError),
    "numpy-zeros": (glob("numpy", "zeros") + _int(2**28) + b"\x85R", ForbiddenGlobalError),
    "numpy-ones": (glob("numpy", "ones") + _int(2**28) + b"\x85R", ForbiddenGlobalError),
    "numpy-full": (glob("numpy", "full") + _int(2**28) + b"K\x07\x86R", ForbiddenGlobalError),
    "range-then-list": (glob("builtins", "list") + glob("builtins", "range") + _int(2**40) + b"\x85R\x85R",
                        ForbiddenGlobalError),
    # streampickle's own reconstructors, asked for more than the bytes that arrived
    "ndarray-of-256-mib-over-0-bytes": (rebuild("ndarray") + b"(" + s("|i1") + b"]" + _int(2**28) + b"a\x89C\x00tR",
                                        MalformedPickleError),
    "ndarray-of-2-dims-over-0-bytes": (rebuild("ndarray") + b"(" + s("<f8") + b"](" + _int(2**31) + _int(2**31)
                                       + b"e\x89C\x00tR", MalformedPickleError),
    "object-ndarray-of-2-28-items-from-none": (rebuild("object_ndarray") + b"(]" + _int(2**28) + b"a\x89\x88]tR",
                                               MalformedPickleError),
    "scalar-of-1-gib-over-0-bytes": (rebuild("scalar") + s("|V1073741824") + b"C\x00\x86R", MalformedPickleError),
}


@pytest.mark.parametrize("name", SIZE_TAKING_CALLS)
def test_callables_that_allocate_from_a_size_argument_are_refused_before_allocating(name: str) -> None:
    """A few bytes naming a size (``bytearray(2**30)``, numpy's ``_reconstruct`` without its
    BUILD, which would expose whatever the heap held, ``numpy.empty/zeros/ones/full``,
    ``list(range(...))``) would allocate out of proportion to the message. None of those
    names is allowed; streampickle's own reconstructors build arrays only over bytes that
    arrived, exactly ``prod(shape) * itemsize`` of them. Refused with memory to match."""
    call, error = SIZE_TAKING_CALLS[name]
    with traced() as peak:
        assert_dropped_alone(make_message(P5 + call + b"."), error)
    assert peak[0] < 1 * MiB


def test_a_million_marks_drop_the_message_and_1024_open_marks_are_the_limit() -> None:
    """Each MARK is one byte and one entry on the unpickler's mark stack: more than 1,024 open
    at once are refused before unpickling (the message alone: its framing is sound)."""
    err = assert_dropped_alone(make_message(P5 + b"(" * 10**6 + b"N."))
    assert "more than 1024 MARKs open at once" in str(err)
    assert streampickle.loads(make_message(P5 + b"(" * 1024 + b"N" + b"1" * 1024 + b"N.")) is None
    err = assert_dropped_alone(make_message(P5 + b"(" * 1025 + b"N" + b"1" * 1025 + b"N."))
    assert "more than 1024 MARKs open at once" in str(err)


UNHASHABLE = {
    "list-key-setitems": P5 + b"}(]Nu.",
    "dict-key": P5 + b"}}Ns.",
    "set-key": P5 + b"}\x8fNs.",
    "bytearray-key": P5 + b"}\x96" + struct.pack("<Q", 1) + b"aNs.",
    "tuple-holding-a-list-key": P5 + b"}]\x85Ns.",
    "list-set-item": P5 + b"\x8f(]\x90.",
    "list-frozenset-item": P5 + b"(]\x91.",
}


@pytest.mark.parametrize("trusted", [False, True], ids=["safe", "trusted"])
@pytest.mark.parametrize("name", UNHASHABLE)
def test_unhashable_keys_and_set_items_drop_the_message(name: str, trusted: bool) -> None:
    """The safe loader refuses them before unpickling, naming the opcode; a trusted one chains
    the unpickler's TypeError. Either way only this message is lost."""
    err = assert_dropped_alone(make_message(UNHASHABLE[name]), trusted=trusted)
    if trusted:
        assert isinstance(err.__cause__, TypeError) and "unhashable" in str(err.__cause__)
    else:
        assert "can't be a dict key or set item" in str(err)


def test_a_10_mb_long4_integer_is_bounded_by_max_pickle_size_and_left_to_the_application() -> None:
    """A LONG4 literal is plain data: 10 MB of it is one 80-million-bit int, accepted. What
    bounds it is max_pickle_size, from the header; what the application does with it (``str``
    raises ValueError beyond 4,300 digits) is the application's concern."""
    size = 10 * 10**6
    value = (1 << (8 * size - 9)) + 12345
    pickled = P5 + b"\x8b" + struct.pack("<i", size) + value.to_bytes(size, "little", signed=True) + b"."
    message = make_message(pickled)
    out = streampickle.loads(message, limits=Limits(max_pickle_size=len(pickled)))
    assert out == value
    with pytest.raises(ValueError):
        str(out)
    del out
    decoder = Decoder(limits=Limits(max_pickle_size=len(pickled) - 1))
    at, exc = feed_bytewise(decoder, message[: HEADER_SIZE + 8])  # type: ignore[misc]
    assert type(exc) is LimitExceededError and at == HEADER_SIZE - 1  # at the header, not after 10 MB
    assert_poisoned(decoder, LimitExceededError)


def test_a_hundred_thousand_one_element_arrays_are_refused_on_their_side_chunk_count() -> None:
    """Each array travels as its own side chunk: 10**5 of them is over the default
    max_side_chunks (65,536), refused from the header before the 800 KB length table is taken,
    and the stream is poisoned; a receiver that raises the limit gets them all."""
    arrays = [np.full(1, i, dtype=np.float64) for i in range(10**5)]
    message = streampickle.dumps(arrays)
    assert int.from_bytes(message[8:12], "little") == 10**5
    decoder = Decoder()
    with traced() as peak:
        at, exc = feed_bytewise(decoder, message[: HEADER_SIZE + 64])  # type: ignore[misc]
    assert type(exc) is LimitExceededError and "max_side_chunks" in str(exc)
    assert at == HEADER_SIZE - 1 and peak[0] < 64 * KiB
    assert_poisoned(decoder, LimitExceededError)
    with pytest.raises(LimitExceededError):
        streampickle.loads(message)
    out = streampickle.loads(message, limits=Limits(max_side_chunks=10**5))
    assert len(out) == 10**5 and all(type(a) is np.ndarray and a.shape == (1,) for a in out)
    assert np.array_equal(np.concatenate(out), np.arange(10**5, dtype=np.float64))


# =============================================================================================
# Integrity and authentication: keyed messages tampered with
# =============================================================================================

EVERY_MAC = {
    "hmac-sha256": streampickle.Key(KEY),
    "blake3": streampickle.Key(KEY, mac="blake3"),
    "poly1305": streampickle.Key(KEY, mac="poly1305"),
}
TAG_SIZE = 32


def _keyed(obj: Any, key: Any = KEY) -> bytes:
    return b"".join(bytes(c) for c in streampickle.Encoder(key=key).encode(obj))


class LoaderCalls:
    """Records every call of the safe loader's ``load`` (the first step that reads pickle
    opcodes) while active."""

    def __enter__(self) -> list[Any]:
        from streampickle import _safe

        self.calls: list[Any] = []
        self._loader = _safe.Loader
        self._real = _safe.Loader.load
        real, calls = self._real, self.calls
        self._loader.load = lambda self, *a: calls.append(a) or real(self, *a)  # type: ignore[method-assign]
        return self.calls

    def __exit__(self, *exc: Any) -> None:
        self._loader.load = self._real  # type: ignore[method-assign]


@pytest.mark.parametrize("mac", list(EVERY_MAC))
def test_a_wrong_key_fails_a_constant_time_compare_before_any_pickle_byte_and_poisons(mac: str, monkeypatch) -> None:
    """A message signed under another secret (same MAC): refused by ``hmac.compare_digest``
    (constant time), with nothing unpickled, and the stream can't be used again."""
    compared: list[int] = []
    real = __import__("hmac").compare_digest
    monkeypatch.setattr("hmac.compare_digest", lambda a, b: compared.append(len(b)) or real(a, b))
    forged = _keyed({"run": "os.system"}, streampickle.Key(b"the attacker's secret", mac=mac))
    decoder = Decoder(key=EVERY_MAC[mac])
    with LoaderCalls() as loaded, pytest.raises(AuthenticationError, match="mismatch"):
        decoder.feed(forged)
    assert compared and loaded == []
    assert_poisoned(decoder, AuthenticationError)


# About 1 KiB: header, a two-entry length table, the pickle, two side chunks and the tag.
SWEPT = _keyed({"a": np.arange(64, dtype=np.int64), "b": np.arange(200, dtype=np.uint8), "s": "x" * 100})
SWEPT_TABLE = struct.pack("<QQ", 512, 200)  # found in the message, not computed from a layout


def test_every_bit_of_a_keyed_kilobyte_flipped_is_refused() -> None:
    """All 8 bits of every byte, one at a time: never an object. From the pickle part on
    (the side chunks and the tag included), always the tag's mismatch; in the header and length
    table, whichever check comes first (a framing error, a limit, an end inside the message,
    or the tag)."""
    assert 900 <= len(SWEPT) <= 1200
    body = SWEPT.index(SWEPT_TABLE) + len(SWEPT_TABLE)  # where the pickle part starts
    for i in range(len(SWEPT)):
        for bit in range(8):
            flipped = bytearray(SWEPT)
            flipped[i] ^= 1 << bit
            with pytest.raises(StreamPickleError) as info:
                streampickle.loads(bytes(flipped), key=KEY)
            if i >= body:
                assert type(info.value) is AuthenticationError, (i, bit, info.value)


def _two_chunk_message(first: int, second: int, key: Any = KEY) -> list[bytes]:
    """head (header, length table, pickle), two side chunks, tag."""
    chunks = [bytes(c) for c in streampickle.Encoder(key=key).encode(
        [np.full(first, 1, dtype=np.uint8), np.full(second, 2, dtype=np.uint8)])]
    assert len(chunks) == 4 and chunks[0].count(struct.pack("<QQ", first, second)) == 1
    return chunks


def _with_table(head: bytes, first: int, second: int) -> bytes:
    """The head of ``_two_chunk_message(8, 16)`` with its length table's entries replaced
    (found in it, wherever the wire format puts the table)."""
    return head.replace(struct.pack("<QQ", 8, 16), struct.pack("<QQ", first, second), 1)


def test_side_chunks_moved_between_messages_reordered_or_resized_are_refused() -> None:
    """The tag covers the header, the length table, the pickle and every chunk in order: a
    chunk taken from another message of the same shape, two chunks of different lengths
    swapped together with their table entries, or a length moved from one chunk to the other
    (same total) all fail it."""
    head, c1, c2, tag = _two_chunk_message(8, 16)
    _, d1, _, _ = (bytes(c) for c in streampickle.Encoder(key=KEY).encode(
        [np.full(8, 7, dtype=np.uint8), np.full(16, 2, dtype=np.uint8)]))
    forgeries = {
        "chunk-from-another-message": head + d1 + c2 + tag,
        "chunks-and-lengths-swapped": _with_table(head, 16, 8) + c2 + c1 + tag,
        "length-moved-between-chunks": _with_table(head, 16, 8) + c1 + c2 + tag,
    }
    for forged in forgeries.values():
        with pytest.raises(AuthenticationError, match="mismatch"):
            streampickle.loads(forged, key=KEY)
    assert streampickle.loads(head + c1 + c2 + tag, key=KEY)[1].tolist() == [2] * 16  # the control


def test_a_tag_one_byte_short_or_long_is_refused() -> None:
    """The tag has no length field: one byte short, it takes the next message's first byte
    (mismatch) or ends inside the message; one byte long, the stray byte is the next
    message's first and is refused as framing. Unsigned messages and other MACs' tags: see
    test_auth (``test_wrong_key_missing_key_and_unexpected_tag``, ``test_each_mac_refuses_the_others``)."""
    while True:  # each encoder's tags are fresh: skip the 1 in 256 whose last byte is the magic's first
        encoder = streampickle.Encoder(key=KEY)
        first, second = (b"".join(bytes(c) for c in encoder.encode(x)) for x in ("first", "second"))
        if first[-1] != second[0]:
            break
    decoder = Decoder(key=KEY)
    with pytest.raises(AuthenticationError, match="mismatch"):
        decoder.feed(first[:-1] + second)
    assert_poisoned(decoder, AuthenticationError)
    with pytest.raises(streampickle.IncompleteMessageError):
        streampickle.loads(first[:-1], key=KEY)
    decoder = Decoder(key=KEY)
    with pytest.raises(streampickle.ProtocolError):
        decoder.feed(first + b"\x00")
    assert decoder.failed


@pytest.mark.parametrize("mac", list(EVERY_MAC))
def test_the_tag_is_a_fixed_32_bytes_that_a_peer_cannot_lengthen(mac: str) -> None:
    """No handshake, and no length for a peer to inflate: the decoder holds the 32 bytes of
    a tag and judges them at the 32nd."""
    message = _keyed({"a": np.arange(10)}, EVERY_MAC[mac])
    decoder = Decoder(key=EVERY_MAC[mac])
    decoder.feed(message[:-TAG_SIZE])
    at, exc = feed_bytewise(decoder, b"\xaa" * (1 << 20))  # type: ignore[misc]
    assert type(exc) is AuthenticationError and at == TAG_SIZE - 1
    assert_poisoned(decoder, AuthenticationError)


def test_there_is_no_checksum_only_mode_every_check_is_a_mac() -> None:
    """A CRC detects accidents, not forgeries; streampickle offers none, so nothing can be
    mistaken for authentication: a checksum name is refused as a MAC."""
    for name in ("crc32c", "crc32", "none"):
        with pytest.raises(UsageError, match="mac must be"):
            streampickle.Key(KEY, mac=name)  # type: ignore[arg-type]


# =============================================================================================
# Time: linear decode paths
# =============================================================================================


def test_16_mib_of_appends_onto_one_list_decodes_in_linear_work() -> None:
    """A list grown by 4 million one-item ``APPENDS``: anything quadratic in the list's
    length (rescanning it, copying it per opcode) would take about 10**13 steps and never
    finish; linear work finishes in well under a second."""
    count = (16 * MiB) // 4
    pickled = P5 + b"]" + b"(K\x07e" * count + b"."
    out = streampickle.loads(make_message(pickled))
    assert len(out) == count and out[0] == out[-1] == 7
