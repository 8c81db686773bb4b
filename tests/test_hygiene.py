"""Structure the design depends on: a sans-IO core, a typed error tree, the public names."""

from __future__ import annotations

import subprocess
import sys

import streampickle


def test_core_imports_no_io_or_event_loop() -> None:
    code = (
        "import sys, numpy; before = set(sys.modules); import streampickle; "
        "new = set(sys.modules) - before; "
        "print(sorted({'anyio', 'socket', 'selectors', 'asyncio', 'trio', 'threading'} & new))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_error_is_a_streampickle_error() -> None:
    for name in streampickle.__all__:
        obj = getattr(streampickle, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, streampickle.StreamPickleError), name


def test_public_names_of_the_core_issue() -> None:
    for name in (
        "Encoder", "Decoder", "dumps", "loads", "Limits", "StreamPickleError", "ProtocolError",
        "LimitExceededError", "IncompleteMessageError", "AuthenticationError", "ForbiddenGlobalError",
    ):
        assert name in streampickle.__all__
    assert callable(streampickle.sync.dump) and callable(streampickle.sync.load)


def test_py_typed_ships() -> None:
    from importlib.resources import files

    assert files("streampickle").joinpath("py.typed").is_file()
