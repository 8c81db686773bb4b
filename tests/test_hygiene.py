"""Structure the design depends on: a sans-IO core, a typed error tree, the public names."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import streampickle

ROOT = Path(__file__).resolve().parent.parent


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


def test_dir_lists_the_lazily_loaded_names_without_loading_them() -> None:
    code = (
        "import sys, streampickle; names = dir(streampickle); "
        "print(all(n in names for n in streampickle.__all__), 'anyio' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]
    assert set(streampickle.__all__) <= set(dir(streampickle))


def test_help_documents_every_public_name() -> None:
    import pydoc

    text = pydoc.render_doc(streampickle, renderer=pydoc.plaintext)
    for name in ("ObjectStream", "MemoryBudget", "ObjectStreamListener"):
        assert f"class {name}" in text, name
    for name in ("connect_tcp", "connect_unix", "create_tcp_listener", "create_unix_listener", "dump", "load"):
        assert f"{name}(" in text, name


def test_the_version_has_one_source() -> None:
    from importlib.metadata import version

    assert streampickle.__version__ == version("streampickle")
    assert streampickle.__version__.count(".") == 2
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]


def _floors_in_pyproject() -> dict[str, str]:
    """``name -> version`` for every ``>=`` bound in [project] dependencies and the test extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(;.*)?", requirement)
        assert match, f"not a plain floor: {requirement!r}"
        floors[match[1].lower()] = match[2]
    return floors


def test_ci_floors_match_pyproject() -> None:
    """.ci/floors.txt pins each declared floor exactly, so CI tests the versions we promise."""
    pinned = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pinned[name.strip().lower()] = version.strip()
    assert pinned == _floors_in_pyproject()
