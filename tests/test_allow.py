"""allow= can extend the allowlist with value types, and never with code execution.

The gadget corpus is what pickle scanners and their bypass reports collect: every name in it
must be refused by ``parse_allow`` with a UsageError that says why, and a peer's pickle naming
it gets a ForbiddenGlobalError that suggests neither allow= nor trusted=True."""

from __future__ import annotations

import array
import collections
import dataclasses
import datetime
import decimal
import enum
import fractions
import functools
import http
import io
import ipaddress
import operator
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time
import types
import uuid

import numpy as np
import pytest

from streampickle import ForbiddenGlobalError, UsageError
from streampickle._allow import (
    ALLOWABLE_IN_DENIED,
    DENIED,
    DENIED_IN_PACKAGE,
    denied_object_reason,
    denied_reason,
    parse_allow,
)
from streampickle._safe import DEFAULT_ALLOWED

# fmt: off
GADGETS = [
    # builtins that run code, reach attributes, build classes or touch the terminal and files
    "builtins.eval", "builtins.exec", "builtins.compile", "builtins.getattr", "builtins.setattr",
    "builtins.delattr", "builtins.hasattr", "builtins.__import__", "builtins.open", "builtins.globals",
    "builtins.locals", "builtins.vars", "builtins.breakpoint", "builtins.input", "builtins.help",
    "builtins.exit", "builtins.quit", "builtins.license", "builtins.type", "builtins.object",
    "builtins.super", "builtins.classmethod", "builtins.staticmethod", "builtins.property",
    "builtins.memoryview", "builtins.dir", "builtins.print", "builtins.str.format",
    "builtins.str.format_map", "builtins.__builtins__", "builtins.__build_class__",
    "__builtin__.eval", "__builtin__.getattr",
    # dunder walks
    "builtins.object.__subclasses__", "builtins.type.__subclasses__", "builtins.int.__subclasses__",
    "collections.OrderedDict.__init__.__globals__", "collections.OrderedDict.__reduce__",
    "datetime.datetime.__reduce_ex__", "enum.Enum.__new__", "mymod.Foo.__init__",
    "mymod.Foo.__init__.__globals__", "__main__.Foo.__globals__", "__future__.annotations",
    # processes and the operating system
    "os.system", "os.popen", "os.execv", "os.spawnl", "os.fork", "os.remove", "os.environ",
    "os.path.join", "posix.system", "nt.system", "posixpath.expanduser", "ntpath.realpath",
    "genericpath.exists", "subprocess.Popen", "subprocess.run", "subprocess.check_output",
    "subprocess.getoutput", "_posixsubprocess.fork_exec", "_winapi.CreateProcess", "pty.spawn",
    "signal.raise_signal", "signal.signal", "platform.architecture", "platform._syscmd_file",
    "resource.setrlimit", "pwd.getpwall", "getpass.getpass", "_osx_support._read_output",
    "_aix_support._read_cmd_output", "uuid._get_command_stdout", "uuid.getnode", "uuid.uuid1",
    "time.sleep", "psutil.Process",
    # native code and memory
    "ctypes.CDLL", "ctypes.cdll", "ctypes.util.find_library", "_ctypes.dlopen", "cffi.FFI",
    "mmap.mmap",
    # imports and code
    "runpy._run_code", "runpy.run_path", "runpy.run_module", "importlib.import_module",
    "importlib.util.spec_from_file_location", "importlib.machinery.SourceFileLoader",
    "pkgutil.resolve_name", "pkgutil.get_data", "zipimport.zipimporter", "imp.load_source",
    "code.InteractiveInterpreter", "code.InteractiveConsole", "codeop.compile_command",
    "compileall.compile_dir", "py_compile.compile", "types.FunctionType", "types.CodeType",
    "types.ModuleType", "types.MethodType", "builtins.function", "builtins.code", "sys.exit",
    "sys.modules", "sys.settrace",
    "site.addsitedir", "_sitebuiltins.Quitter", "_sitebuiltins._Helper", "sysconfig.get_paths",
    "distutils.file_util.write_file", "distutils.spawn.spawn", "setuptools.sandbox.run_setup",
    "doctest.run_docstring_examples", "unittest.mock.patch",
    "test.support.script_helper.run_python_until_end",
    "rlcompleter.Completer", "readline.read_history_file", "tkinter.Tcl", "idlelib.run.main",
    "typing.get_type_hints", "typing.ForwardRef", "string.Formatter", "codecs.open", "codecs.decode",
    "codecs.register", "_codecs.encode", "jinja2.Template", "numexpr.evaluate", "this.s",
    "IPython.core.interactiveshell.InteractiveShell", "re._compile",
    "subprocess._args_from_interpreter_flags",
    # nested loaders
    "pickle.loads", "pickle.load", "pickle.Unpickler", "_pickle.loads", "_pickle.Unpickler",
    "cPickle.loads", "pickletools.dis", "copyreg._reconstructor", "copyreg.__newobj__",
    "copy_reg._reconstructor", "shelve.open", "marshal.loads", "dill.loads", "cloudpickle.loads",
    "joblib.load", "jsonpickle.decode", "yaml.unsafe_load",
    # call and attribute gadgets
    "operator.attrgetter", "operator.itemgetter", "operator.methodcaller", "operator.call",
    "operator.getitem", "operator.setitem", "operator.delitem", "_operator.attrgetter",
    "_operator.methodcaller", "functools.partial", "functools.partialmethod", "functools.reduce",
    "functools.update_wrapper", "functools.total_ordering", "_functools.reduce",
    # debuggers, profilers, interpreter state
    "cProfile.run", "profile.run", "pdb.run", "bdb.Bdb", "timeit.timeit", "trace.Trace",
    "pydoc.pipepager", "pydoc.locate", "inspect.getsource", "gc.get_objects", "gc.get_referrers",
    "atexit.register", "warnings.simplefilter", "random.seed", "weakref.finalize",
    "decimal.setcontext", "faulthandler.enable", "tracemalloc.start",
    # files
    "io.FileIO", "io.open", "_io.FileIO", "_io.open", "_pyio.open", "pathlib.Path",
    "pathlib.PosixPath", "pathlib.Path.write_text", "tempfile.mkstemp", "shutil.rmtree",
    "shutil.copyfile", "glob.glob", "fileinput.input", "linecache.getline", "zipfile.ZipFile",
    "tarfile.open", "tarfile.TarFile.extractall", "sqlite3.connect", "gzip.open", "bz2.BZ2File",
    "lzma.open", "tokenize.open", "netrc.netrc", "mimetypes.init", "logging.FileHandler",
    "logging.basicConfig", "logging.config.listen", "logging.config.fileConfig",
    "logging.handlers.SocketHandler", "xml.etree.ElementTree.parse", "xml.dom.minidom.parse",
    "xml.sax.parse", "zoneinfo.reset_tzpath",
    # the network
    "socket.socket", "socket.create_connection", "ssl.wrap_socket", "http.client.HTTPConnection",
    "http.server.HTTPServer", "urllib.request.urlopen", "urllib.request.urlretrieve",
    "urllib.robotparser.RobotFileParser", "ftplib.FTP", "smtplib.SMTP", "telnetlib.Telnet",
    "xmlrpc.client.ServerProxy", "webbrowser.open", "antigravity.geohash", "requests.get",
    # threads and event loops
    "threading.Thread", "threading.Timer", "_thread.start_new_thread", "multiprocessing.Process",
    "multiprocessing.util.spawnv_passfds", "concurrent.futures.ProcessPoolExecutor",
    "asyncio.create_subprocess_exec", "asyncio.create_subprocess_shell",
    "asyncio.subprocess.create_subprocess_exec", "asyncio.run", "anyio.run_process",
    "anyio.open_file", "trio.run_process",
    # numpy, pandas, torch, sympy
    "numpy.f2py.diagnose.run_command", "numpy.f2py.crackfortran.crackfortran",
    "numpy.distutils.exec_command.exec_command", "numpy.ctypeslib.load_library",
    "numpy.lib.format.read_array", "numpy.lib._format_impl.read_array", "numpy.load",
    "numpy.save", "numpy.fromfile", "numpy.memmap", "numpy.loadtxt", "numpy.genfromtxt",
    "numpy.testing.assert_equal", "numpy.testing._private.utils.runstring",
    "numpy.lib.npyio.load", "numpy.lib._npyio_impl.load", "numpy.lib._datasource.open",
    "numpy.ndarray.tofile", "numpy.ndarray.dump", "numpy._core.multiarray.fromfile",
    "numpy.core.records.fromfile", "numpy.seterrcall", "numpy.random.seed",
    "numpy.random.mtrand.seed", "pandas.read_csv", "pandas.read_pickle",
    "pandas.io.pickle.read_pickle", "pandas.io.parsers.readers.read_csv",
    "pandas.io.clipboards.read_clipboard", "pandas.DataFrame.to_pickle", "pandas.DataFrame.to_csv",
    "pandas.core.frame.DataFrame.to_clipboard", "pandas.eval", "pandas.DataFrame.query",
    "pandas.set_option", "pandas.plotting.scatter_matrix", "torch.load", "torch.save",
    "torch.utils.collect_env.run", "torch.storage._load_from_bytes", "torch.serialization.load",
    "torch.hub.load", "torch.jit.load", "torch.ops.load_library", "torch.from_file",
    "sympy.sympify", "sympy.core.sympify.sympify", "sympy.parsing.sympy_parser.parse_expr",
    "sympy.lambdify",
    # the guard itself
    "streampickle._rebuild.Rebuilder", "streampickle._safe.Loader", "streampickle.loads",
    "streampickle._allow.parse_allow", "streampickle._rebuild.ndarray", "fickling.fickle.Pickled",
    "picklescan.scanner.scan_pickle_bytes", "modelscan.modelscan.ModelScan",
]

# names that share a prefix or a component with a denied one and must not be confused with it
LOOKALIKES = [
    "osx.thing", "myos.system", "os_helpers.run", "posixx.system", "subprocess2.Popen",
    "sysx.exit", "iox.Reader", "typesafe.Thing", "codex.Snippet", "pickleable.Thing",
    "numpyro.distributions.Normal", "pandas_ta.momentum.RSI", "torchvision.models.ResNet",
    "streampickles.Thing", "mylib.io.Reader", "myapp.types.Point", "myapp.signal.Filter",
    "myapp.code.Snippet", "myapp.Loader.load", "mymod.read_csv", "mymod.SomeClass.from_x",
    "numpy.loads_nothing.Thing", "pandas.Timestamp", "numpy.ndarray", "operatorx.attrgetter",
]

# names real value pickles use, and value types inside denied modules
ORDINARY = [
    "__main__.Point", "__mp_main__.Point", "collections.OrderedDict", "collections.Counter",
    "datetime.datetime", "decimal.Decimal", "fractions.Fraction", "enum.Enum", "uuid.UUID",
    "ipaddress.IPv4Address", "urllib.parse.SplitResult", "_operator.add", "_struct.pack",
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.dtype",
    "numpy.random._pickle.__bit_generator_ctor", "numpy.ma.core._mareconstruct",
    "pandas._libs.tslibs.timestamps._unpickle_timestamp", "pandas._libs.arrays.__pyx_unpickle_NDArrayBacked",
    "torch._utils._rebuild_tensor_v2", *sorted(ALLOWABLE_IN_DENIED),
]
# fmt: on


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int

    @classmethod
    def from_pair(cls, pair: tuple[int, int]) -> Point:
        return cls(*pair)


Pair = collections.namedtuple("Pair", "a b")


class Colour(enum.Enum):
    RED = 1


def split(full: str) -> tuple[str, str]:
    module, _, name = full.partition(".")
    return module, name


@pytest.mark.parametrize("name", GADGETS)
def test_a_gadget_name_is_refused_and_the_error_says_why(name: str) -> None:
    reason = denied_reason(name)
    assert reason
    with pytest.raises(UsageError, match="can never be allowed") as info:
        parse_allow([name])
    assert reason in str(info.value)
    with pytest.raises(UsageError, match="can never be allowed"):
        parse_allow(["test_allow.Point", name])  # one bad name refuses the whole list


@pytest.mark.parametrize("name", GADGETS)
def test_forbidden_global_error_never_suggests_allowing_a_gadget(name: str) -> None:
    message = str(ForbiddenGlobalError(*split(name)))
    assert "can never be allowed" in message
    assert denied_reason(name) in message
    assert "allow=" not in message and "trusted" not in message


@pytest.mark.parametrize("name", LOOKALIKES + ORDINARY)
def test_lookalikes_and_ordinary_names_are_allowed(name: str) -> None:
    assert denied_reason(name) is None
    assert parse_allow([name]) == {name: None}
    message = str(ForbiddenGlobalError(*split(name)))
    assert f"allow=[{name!r}]" in message and "trusted=True" in message


def test_every_table_entry_is_denied_and_matched_on_whole_components() -> None:
    for name in DENIED:
        assert denied_reason(name), name
        assert denied_reason(f"{name}.anything.below"), name
        if "._" not in name and f"{name}x" not in DENIED:  # ("httpx" is denied in its own right)
            assert denied_reason(f"{name}x.thing") is None, name  # "osx" is not "os"
    for package, names in DENIED_IN_PACKAGE.items():
        for name in names:
            assert denied_reason(f"{package}.{name}"), name
            assert denied_reason(f"{package}.some.module.{name}"), name  # re-exported anywhere
            assert denied_reason(f"{package}.{name}.method"), name
            assert denied_reason(f"{package}x.{name}") is None, name
            assert denied_reason(f"mypkg.{name}") is None, name


def test_exceptions_are_exact_names() -> None:
    for name in ALLOWABLE_IN_DENIED:
        assert denied_reason(name) is None
        assert denied_reason(f"{name}.__init__")
        assert denied_reason(f"{name}x"), name  # the next name over is denied


def test_the_default_allowlist_passes_the_denylist() -> None:
    # streampickle's own reconstructors are allowed by default and never by the user
    for name in DEFAULT_ALLOWED:
        if name.startswith("streampickle."):
            assert denied_reason(name)
        else:
            assert denied_reason(name) is None, name


class _Recorder(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.names: set[str] = set()

    def find_class(self, module: str, name: str):
        self.names.add(f"{module}.{name}")
        return super().find_class(module, name)


def test_the_globals_real_value_pickles_use_stay_allowable() -> None:
    values = [
        np.arange(3), np.float64(1.5), np.dtype("f8"), np.random.default_rng(1),
        np.random.RandomState(1), np.ma.masked_array([1, 2], mask=[0, 1]),
        datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC), datetime.timedelta(3),
        decimal.Decimal("1.5"), fractions.Fraction(1, 3), collections.OrderedDict(a=1),
        collections.deque([1]), collections.Counter("ab"), collections.defaultdict(int),
        Pair(1, 2), Colour.RED, Point(1, 2), types.SimpleNamespace(a=1), array.array("d", [1.0]),
        pathlib.PurePosixPath("/a/b"), uuid.UUID(int=5), ipaddress.ip_address("10.0.0.1"),
        complex(1, 2), range(3), slice(1, 2), http.HTTPStatus.OK, signal.SIGTERM,
        subprocess.CompletedProcess(["true"], 0), operator.add,
    ]
    for value in values:
        recorder = _Recorder(pickle.dumps(value, protocol=5))
        recorder.load()
        for name in recorder.names:
            assert denied_reason(name) is None, (value, name)


def test_objects_are_vetted_by_their_own_name() -> None:
    import builtins

    for obj in (
        os.system, os.popen, subprocess.Popen, builtins.eval, builtins.getattr, builtins.print,
        memoryview, type, object, functools.partial, functools.reduce, operator.attrgetter,
        operator.methodcaller, io.FileIO, pickle.loads, types.FunctionType, np.load, np.fromfile,
        np.memmap, np.loadtxt, np.lib.format.read_array, pathlib.Path, time.sleep, sys.exit,
        types.CodeType, types.MethodType, types.ModuleType, types.FrameType,
        ForbiddenGlobalError,  # streampickle's own: a pickle must not reach the guard
    ):
        with pytest.raises(UsageError, match="can never be allowed"):
            parse_allow([obj])


def test_ordinary_objects_are_allowed() -> None:
    allowed = parse_allow([Point, Pair, Colour, Point.from_pair, collections.OrderedDict, operator.add])
    assert allowed == {
        f"{__name__}.Point": Point,
        f"{__name__}.Pair": Pair,
        f"{__name__}.Colour": Colour,
        f"{__name__}.Point.from_pair": Point.from_pair,
        "collections.OrderedDict": collections.OrderedDict,
        "_operator.add": operator.add,
    }
    assert parse_allow([f"{__name__}.Point"]) == {f"{__name__}.Point": None}
    assert parse_allow([types.SimpleNamespace, pathlib.PurePosixPath]) == {
        "types.SimpleNamespace": types.SimpleNamespace,
        "pathlib.PurePosixPath": pathlib.PurePosixPath,
    }


def test_resolved_objects_are_judged_by_what_they_are() -> None:
    # what a string entry imports can be an alias: "mymod.os.system" is os.system
    aliases = (os, os.system, os.environ, sys.stdout, functools.partial(print), np.ndarray.tofile, "".format)
    for obj in aliases:
        assert denied_object_reason(obj), obj
    for obj in (object(), Point, Point(1, 2), Colour.RED, np.arange(2), collections.OrderedDict):
        assert denied_object_reason(obj) is None, obj


@pytest.mark.parametrize(
    "entries",
    [["numpy"], [""], [".a"], ["a."], ["a..b"], [3], [lambda: 0], [Point(1, 2)], "a.b", b"a.b", 5],
)
def test_malformed_entries_are_usage_errors(entries) -> None:
    def local() -> None: ...

    with pytest.raises(UsageError):
        parse_allow(entries)
    with pytest.raises(UsageError, match="importable"):
        parse_allow([local])


def test_duplicates() -> None:
    name = f"{__name__}.Point"
    assert parse_allow([Point, name]) == {name: Point}  # the object wins over its name
    assert parse_allow([name, Point]) == {name: Point}
    impostor = type("Point", (), {"__module__": __name__})
    with pytest.raises(UsageError, match="two different objects"):
        parse_allow([Point, impostor])


def test_position_and_opcode_are_reported() -> None:
    err = ForbiddenGlobalError("test_allow", "Point", position=17, opcode="STACK_GLOBAL")
    assert (err.module, err.name, err.position, err.opcode) == ("test_allow", "Point", 17, "STACK_GLOBAL")
    assert "(STACK_GLOBAL at byte 17)" in str(err)
    assert "(at byte 3)" in str(ForbiddenGlobalError("os", "system", position=3))
    plain = ForbiddenGlobalError("test_allow", "Point")
    assert (plain.position, plain.opcode) == (None, None)
    assert "byte" not in str(plain) and "allow=['test_allow.Point']" in str(plain)


def test_peer_chosen_names_cost_linear_work_and_bounded_messages() -> None:
    # sized so that quadratic work would outlast the test's timeout
    many_dots = "a." * 200_000 + "b"
    assert denied_reason(many_dots) is None
    assert denied_reason("mymod" + ".__x__" * 100_000)
    assert denied_reason("uuid." + "_" * 1_000_000)
    err = ForbiddenGlobalError("mymod", "x" * 1_000_000)
    assert len(str(err)) < 1_000 and "allow=[...]" in str(err)
    err = ForbiddenGlobalError("mymod", "__" + "x" * 1_000_000 + "__")
    assert len(str(err)) < 1_000 and "allow=" not in str(err)
