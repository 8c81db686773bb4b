"""Parsing and vetting the names users pass in ``allow=``: the one place that does it.

Why: ``allow=`` extends the safe loader's allowlist with exact names the peer may then call or
construct. An allowlist is only as safe as its names, and some names hand out everything:
``builtins.getattr`` reaches ``os.system`` from any allowed class, ``pickle.loads`` runs a
nested pickle with no guard at all. So a name that runs code or reaches the system can never be
allowed, not even by a user who asks for it; only ``trusted=True`` (which drops every
restriction) loads such pickles. Value types (user classes, dataclasses, namedtuples, enums)
stay allowable.

What can never be allowed (``denied_reason`` says which rule and why):

* **Denied names**, matched on whole dotted components, never on string prefixes (``os``
  covers ``os.system`` and ``os.path.join`` but not ``osx`` or ``myos``). A module entry covers
  the module and everything in or under it. The families (the table ``DENIED`` lists every
  entry and its reason):

  - ``builtins`` that evaluate or compile code (``eval``, ``exec``, ``compile``), read or
    write any attribute (``getattr``, ``hasattr``, ``setattr``, ``delattr``, ``super``,
    ``str.format``, which reads ``{0.__init__.__globals__}``), hand out namespaces
    (``globals``, ``locals``, ``vars``, ``dir``), build classes and descriptors (``type``,
    ``object``, ``classmethod``, ``staticmethod``, ``property``), open files or the terminal
    (``open``, ``input``, ``print``, ``help``, ``breakpoint``, ``exit``, ``quit``,
    ``license``...), the interpreter's own types under the names they report
    (``types.FunctionType`` is ``builtins.function``, ``types.CodeType`` ``builtins.code``),
    and ``memoryview``: no pickler writes it, and a view into another object's memory (a
    reused receive buffer, say) is not a value.
  - the operating system and processes: ``os``, ``posix``, ``nt``, the ``os.path`` modules
    under their real names, ``subprocess``, ``pty``, ``signal``, ``platform`` (runs
    ``uname``), ``ctypes``/``cffi``, ``mmap``...
  - files: ``io``, ``pathlib`` (all but the pure paths), ``tempfile``, ``shutil``,
    ``glob``, ``zipfile``/``tarfile`` (extract to disk), ``linecache``, ``sqlite3``, the
    ``open`` functions of ``gzip``/``bz2``/``lzma``, XML parsers that fetch files or URLs...
  - the network: ``socket``, ``ssl``, ``http``, ``urllib.request``, ``ftplib``, ``smtplib``,
    ``xmlrpc``, ``webbrowser``... (``urllib.parse`` is string processing and stays allowable)
  - imports and code: ``sys``, ``importlib``, ``pkgutil``, ``runpy``, ``code``, ``codeop``,
    ``types`` (``FunctionType``, ``CodeType``), ``site``, ``distutils``/``setuptools``,
    ``doctest``, ``typing.get_type_hints`` (evaluates string annotations), ``codecs``
    (codec lookup imports modules by name; ``register`` installs process-wide callbacks)...
  - interpreter state, debuggers and profilers: ``gc``, ``inspect``, ``pdb``, ``cProfile``,
    ``timeit``, ``trace``, ``atexit``, ``warnings``, ``logging.config`` (``listen`` evaluates
    what it receives), ``random.seed`` (the process-wide generator)...
  - threads and event loops: ``threading``, ``_thread``, ``multiprocessing``,
    ``concurrent``, ``asyncio``, and ``anyio``/``trio`` for the same reason.
  - nested loaders: ``pickle``, ``_pickle``, ``pickletools``, ``copyreg``, ``shelve``,
    ``marshal``, ``dill``, ``cloudpickle``, ``joblib``, ``yaml``, ``jsonpickle``.
  - call and attribute gadgets: ``functools`` (``partial``, ``reduce``, ``update_wrapper``...),
    ``operator.attrgetter``, ``itemgetter``, ``methodcaller``, ``call``, ``getitem``...
  - the guard itself: ``streampickle`` (its reconstructors are allowed by default; nothing
    else of it ever is), ``fickling``, ``picklescan``, ``modelscan``.
  - numpy, pandas, torch and sympy by module (``numpy.f2py``, ``numpy.distutils``,
    ``numpy.ctypeslib``, ``numpy.lib.format``, ``numpy.testing``, ``pandas.io``,
    ``torch.serialization``, ``torch.utils.collect_env``...) and by *name anywhere in the
    package*, because their functions are re-exported under several paths
    (``numpy.load`` is also ``numpy.lib.npyio.load``): see ``DENIED_IN_PACKAGE``. In pandas
    every ``read_*`` and ``to_*`` is denied: they read and write files, URLs, databases and
    the clipboard, and no pandas value pickles through one.

* **Special (dunder) attributes** anywhere in the name (``builtins.object.__subclasses__``,
  ``collections.OrderedDict.__init__.__globals__``, ``builtins.__import__``): they lead to
  globals, code objects, subclasses and the import machinery. A leading ``__main__`` (or
  ``__mp_main__``, the main module in a spawned child) is a module, not an attribute.

* **Private names in the standard library**: a component after the module's first that starts
  with ``_`` (``uuid._get_command_stdout``, ``runpy._run_code``, ``platform._syscmd_file``).
  Private helpers are where the stdlib keeps its command runners, promise nothing, and no
  stdlib value pickles through one (``array._array_reconstructor`` is the exception, below).
  Private *top-level* stdlib modules are not covered by this rule, because many public
  functions report them as their module (``operator.add`` pickles as ``_operator.add``,
  ``struct.pack`` as ``_struct.pack``); the dangerous ones are in the table by name
  (``_posixsubprocess``, ``_winapi``, ``_sitebuiltins``, ``_io``...). Private names outside
  the stdlib stay allowable: numpy, pandas and user packages keep their reconstructors in
  private modules (``numpy._core.multiarray._reconstruct``).

* **Exceptions** (``ALLOWABLE_IN_DENIED``): a few exact names inside denied modules that are
  plain values, such as ``types.SimpleNamespace``, the pure ``pathlib`` paths,
  ``http.HTTPStatus`` and ``subprocess.CompletedProcess`` (a record of a finished run).

This denylist is a backstop, not the proof of safety: the loader's verifier still decides what
each opcode may do, and a name not listed here is only as safe as the class it names. A string
entry is judged by its name alone; the loader should also judge what the name resolves to with
``denied_object_reason``, since ``mymod.os.system`` imports as ``os.system``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

__all__ = [
    "ALLOWABLE_IN_DENIED",
    "DENIED",
    "DENIED_IN_PACKAGE",
    "denied_object_reason",
    "denied_reason",
    "parse_allow",
]

# Why each family is denied; each reads after the name it is about ("os runs processes...").
_OS = "runs processes or reaches the operating system (files, users, the environment, signals)"
_FILES = "opens, reads, writes or deletes files"
_NETWORK = "opens network connections or serves them"
_BROWSER = "opens a web browser (another process, with a URL)"
_CODE = "compiles, evaluates or imports code"
_NATIVE = "calls native code or reads and writes raw memory"
_DEBUG = "runs or inspects code under a debugger, profiler or timer"
_STATE = "reads or changes the interpreter's process-wide state"
_THREADS = "starts threads, processes or event loops that run callbacks"
_TERMINAL = "reads from or drives the terminal or a GUI"
_NESTED = "loads nested pickled, marshalled or YAML data with its own, unrestricted loader"
_ATTRIBUTES = (
    "reads attributes or items, or calls methods, named by the pickle: a step from an "
    "allowed object to everything it references"
)
_MUTATES = "changes attributes or items of existing objects, classes and modules included"
_CALLABLES = "binds, wraps or applies callables and mutates functions and classes"
_GUARD = "is the safe loader or a pickle scanner itself, and a pickle must not reach its guard"


def _each(reason: str, *names: str) -> dict[str, str]:
    return dict.fromkeys(names, reason)


_DENIED: dict[str, str] = {
    # builtins, one by one: the module also holds plain value types (complex, range...)
    **_each("evaluates or executes source code", "builtins.eval", "builtins.exec"),
    "builtins.compile": "compiles source code into code objects (deep input crashes the compiler)",
    "builtins.__import__": "imports any module by name",
    **_each(_ATTRIBUTES, "builtins.getattr", "builtins.hasattr", "builtins.super"),
    **_each(_MUTATES, "builtins.setattr", "builtins.delattr"),
    **_each(
        "hands out a namespace dict (module globals, locals, an object's __dict__)",
        "builtins.globals", "builtins.locals", "builtins.vars",
    ),
    "builtins.dir": "lists the attributes of any object by calling its __dir__",
    "builtins.open": _FILES,
    "builtins.input": "reads from standard input",
    "builtins.print": "writes to standard output, a process-wide stream (terminal escapes, forged logs)",
    "builtins.breakpoint": "starts the debugger, or imports whatever PYTHONBREAKPOINT names",
    "builtins.help": "starts interactive help (pydoc and a pager process)",
    **_each("raises SystemExit and closes standard input", "builtins.exit", "builtins.quit"),
    **_each(
        "reads files and pages them to the terminal",
        "builtins.copyright", "builtins.credits", "builtins.license",
    ),
    "builtins.type": "creates classes from a peer's name, bases and namespace (type(name, bases, dict))",
    "builtins.object": (
        "is the root of every class, where the object.__subclasses__ walk to any loaded class "
        "starts; no value's pickle needs it"
    ),
    **_each(
        "wraps callables into descriptors that run code on attribute access",
        "builtins.classmethod", "builtins.staticmethod", "builtins.property",
    ),
    # the interpreter's own types, under the names they report (types.FunctionType is
    # builtins.function): constructing one from a peer's parts makes functions and code
    **_each(
        "is one of the interpreter's own types (functions, code, frames, modules, descriptors), "
        "built from raw parts",
        "builtins.function", "builtins.code", "builtins.cell", "builtins.generator",
        "builtins.coroutine", "builtins.async_generator", "builtins.method",
        "builtins.builtin_function_or_method", "builtins.wrapper_descriptor",
        "builtins.method-wrapper", "builtins.method_descriptor",
        "builtins.classmethod_descriptor", "builtins.module", "builtins.traceback",
        "builtins.frame", "builtins.getset_descriptor", "builtins.member_descriptor",
    ),
    "builtins.memoryview": (
        "views another object's memory (reused receive buffers included) instead of holding a "
        "value, and no pickler writes it"
    ),
    **_each(
        "reads the attributes and items a format string names ('{0.__init__.__globals__}')",
        "builtins.str.format", "builtins.str.format_map", "string.Formatter",
    ),
    # the operating system and processes
    **_each(
        _OS,
        "os", "posix", "nt", "posixpath", "ntpath", "genericpath", "subprocess", "_posixsubprocess",
        "_bootsubprocess", "_winapi", "_overlapped", "msvcrt", "winreg", "winsound", "_msi", "msilib",
        "pty", "signal", "_signal", "resource", "fcntl", "pwd", "grp", "spwd", "syslog", "nis",
        "platform", "_osx_support", "_aix_support", "getpass", "pipes", "mailcap", "ossaudiodev",
        "commands", "psutil", "pexpect", "sh", "plumbum",
    ),
    "uuid.getnode": "may run ifconfig, ip, arp or netstat to find the MAC address",
    "uuid.uuid1": "may run ifconfig, ip, arp or netstat to find the MAC address",
    "time.sleep": "blocks the loading thread for as long as the peer says",
    **_each(_NATIVE, "ctypes", "_ctypes", "cffi", "_cffi_backend", "mmap", "_posixshmem"),
    # files
    **_each(
        _FILES,
        "io", "_io", "_pyio", "pathlib", "tempfile", "shutil", "glob", "fileinput", "filecmp",
        "linecache", "tokenize.open", "zipfile", "tarfile", "dbm", "_dbm", "_gdbm", "sqlite3",
        "_sqlite3", "mailbox", "mimetypes", "netrc", "wave", "aifc", "sunau", "sndhdr", "imghdr",
        "uu", "tabnanny", "pyclbr", "gettext", "gzip.open", "gzip.GzipFile", "bz2.open",
        "bz2.BZ2File", "lzma.open", "lzma.LZMAFile", "logging.FileHandler", "logging.handlers",
        "zoneinfo.reset_tzpath",
    ),
    **_each(
        "parses documents from file names or URLs it opens itself",
        "xml.dom", "xml.sax", "xml.etree.ElementInclude", "xml.etree.ElementTree.parse",
        "xml.etree.ElementTree.iterparse", "xml.etree.ElementTree.ElementTree", "xml.etree.cElementTree",
    ),
    # the network
    **_each(
        _NETWORK,
        "socket", "_socket", "ssl", "_ssl", "select", "selectors", "socketserver", "asyncore",
        "asynchat", "smtpd", "http", "urllib.request", "urllib.robotparser", "urllib2", "ftplib",
        "smtplib", "imaplib", "poplib", "nntplib", "telnetlib", "xmlrpc", "wsgiref", "requests",
        "urllib3", "httpx", "aiohttp",
    ),
    **_each(_BROWSER, "webbrowser", "antigravity"),
    # imports and code
    **_each(
        _CODE,
        "importlib", "imp", "_imp", "_frozen_importlib", "_frozen_importlib_external",
        "zipimport", "pkgutil", "runpy", "code", "codeop", "compileall", "py_compile", "modulefinder",
        "symtable", "_symtable", "site", "sysconfig", "_sysconfig",
        "distutils", "setuptools", "pkg_resources", "_distutils_hack", "pip", "ensurepip", "venv",
        "zipapp", "lib2to3", "doctest", "unittest", "test", "pytest", "_pytest", "idlelib",
        "rlcompleter", "cgitb", "IPython", "jinja2", "mako", "numexpr", "this", "_sre",
        "_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase", "_testimportmultiple",
        "_testclinic", "_testsinglephase", "_ctypes_test", "_xxsubinterpreters", "_xxinterpchannels",
        "_interpreters", "_interpchannels", "_interpqueues", "_pyrepl", "annotationlib",
        "typing.get_type_hints", "typing.ForwardRef", "typing_extensions.get_type_hints",
        "typing_extensions.ForwardRef", "typing_extensions.get_annotations",
    ),
    "sys": "is the interpreter itself: loaded modules, exit, hooks, frames, the recursion limit",
    "types": "builds functions, code objects, modules and classes from raw parts (FunctionType, CodeType)",
    "_sitebuiltins": "holds exit, quit, help and license: raising SystemExit, starting pydoc, reading files",
    **_each(
        "looks codecs up by name (importing their modules), installs process-wide callbacks and "
        "opens files",
        "codecs", "_codecs",
    ),
    **_each(
        _DEBUG,
        "pdb", "bdb", "cProfile", "profile", "_lsprof", "pstats", "timeit", "trace", "tracemalloc",
        "_tracemalloc", "faulthandler", "pydoc", "pydoc_data", "inspect", "_remote_debugging",
    ),
    **_each(
        _STATE,
        "gc", "atexit", "warnings", "_warnings", "locale", "_locale", "random.seed", "random.setstate",
        "decimal.setcontext", "weakref.finalize", "logging.basicConfig", "logging.disable",
        "logging.shutdown", "logging.captureWarnings", "logging.setLoggerClass",
        "logging.setLogRecordFactory", "logging.addLevelName",
    ),
    "logging.config": "configures logging from files and sockets, and listen() evaluates what it receives",
    **_each(_TERMINAL, "tty", "termios", "readline", "curses", "_curses", "_curses_panel",
            "tkinter", "_tkinter", "turtle", "turtledemo"),
    # threads and event loops
    **_each(
        _THREADS,
        "threading", "_thread", "multiprocessing", "_multiprocessing", "concurrent", "asyncio",
        "_asyncio", "anyio", "trio", "uvloop",
    ),
    # nested loaders
    **_each(
        _NESTED,
        "pickle", "_pickle", "cPickle", "pickletools", "copyreg", "copy_reg", "shelve", "marshal",
        "dill", "cloudpickle", "joblib", "jsonpickle", "yaml",
    ),
    # call and attribute gadgets
    **_each(_CALLABLES, "functools", "_functools"),
    **{
        f"{module}.{name}": _ATTRIBUTES
        for module in ("operator", "_operator")
        for name in ("attrgetter", "itemgetter", "methodcaller", "call", "getitem")
    },
    **{
        f"{module}.{name}": _MUTATES
        for module in ("operator", "_operator")
        for name in ("setitem", "delitem")
    },
    # the guard itself
    **_each(_GUARD, "streampickle", "fickling", "picklescan", "modelscan"),
    # numpy, pandas, torch, sympy: whole modules (their names are in DENIED_IN_PACKAGE)
    **_each(
        "builds, compiles or runs Fortran and C code",
        "numpy.f2py", "numpy.distutils", "numpy.ctypeslib", "numpy.testing", "numpy._pytesttester",
    ),
    **_each(
        "reads and writes .npy and .npz files (and pickles inside them)",
        "numpy.lib.format", "numpy.lib._format_impl", "numpy.lib.npyio", "numpy.lib._npyio_impl",
    ),
    "numpy.lib._datasource": "opens files and URLs",
    **_each(
        "reads and writes files, URLs, databases and the clipboard",
        "pandas.io", "pandas.util._print_versions", "pandas.util._tester",
    ),
    "pandas.core.computation": "evaluates expression strings (pandas.eval, DataFrame.query)",
    "pandas.plotting": "imports the plotting backend a process-wide option names",
    **_each(
        "loads or saves pickles, compiles and loads native code, or runs processes",
        "torch.serialization", "torch.hub", "torch.package", "torch.jit", "torch.utils.collect_env",
        "torch.utils.cpp_extension", "torch.utils.tensorboard", "torch._dynamo", "torch._inductor",
        "torch.compiler", "torch.distributed", "torch.multiprocessing", "torch.library", "torch.ops",
        "torch._ops", "torch.onnx", "torch.export", "torch.testing",
    ),
    **_each(
        "parses strings with eval or compiles generated code",
        "sympy.parsing", "sympy.interactive", "sympy.utilities.lambdify", "sympy.utilities.autowrap",
    ),
}

_FILE_IO = "reads or writes files"
_GLOBAL_STATE = "changes the package's process-wide state"

#: Names denied anywhere inside a package, by the package's top-level name: these packages
#: re-export the same function under several paths (``numpy.load``, ``numpy.lib.npyio.load``,
#: ``numpy.lib._npyio_impl.load``), so a name is the only stable handle.
_IN_PACKAGE: dict[str, dict[str, str]] = {
    "numpy": {
        **_each(
            _FILE_IO,
            "load", "save", "savez", "savez_compressed", "savetxt", "loadtxt", "genfromtxt",
            "fromfile", "tofile", "fromregex", "memmap", "open_memmap", "DataSource", "dump",
            "recfromcsv", "recfromtxt",
        ),
        "load_library": "loads a shared library",
        **_each(
            _GLOBAL_STATE,
            "seterr", "seterrcall", "seterrobj", "setbufsize", "set_printoptions",
            "set_string_function", "seed", "set_state",
        ),
    },
    "pandas": {
        **_each("evaluates expression strings", "eval", "query"),
        **_each(_GLOBAL_STATE, "set_option", "option_context", "reset_option"),
        "show_versions": "imports every optional dependency and queries the platform",
        "plot": "imports the plotting backend a process-wide option names",
    },
    "torch": {
        **_each("loads or saves pickles", "load", "save", "_load_from_bytes", "load_state_dict_from_url"),
        **_each(_FILE_IO, "from_file", "download_url_to_file"),
        **_each("compiles and loads native code", "load_library", "compile"),
        **_each(_GLOBAL_STATE, "manual_seed", "seed", "set_rng_state"),
    },
    "sympy": {
        **_each(
            "parses strings with eval or compiles generated code",
            "sympify", "parse_expr", "lambdify", "S", "autowrap", "ufuncify", "init_session",
        ),
    },
}
#: pandas' readers and writers: read_csv, read_pickle, to_csv, to_pickle, to_clipboard...
_PREFIXES_IN_PACKAGE: dict[str, tuple[tuple[str, str], ...]] = {
    "pandas": (
        ("read_", "reads files, URLs, databases, pickles or the clipboard"),
        # the to_* converters go too: no pandas value pickles through one
        ("to_", "writes files, URLs, databases, pickles or the clipboard"),
    ),
}

#: Exact names inside denied modules that are plain values: constructing one runs nothing and
#: reaches nothing, so they stay allowable.
_ALLOWABLE: frozenset[str] = frozenset(
    {
        "types.SimpleNamespace",  # an attribute bag
        "array._array_reconstructor",  # how array.array pickles: typecode, machine format, bytes
        "pathlib.PurePath",  # pure paths never touch the file system
        "pathlib.PurePosixPath",
        "pathlib.PureWindowsPath",
        "http.HTTPStatus",  # enums
        "http.HTTPMethod",
        "signal.Signals",
        "subprocess.CompletedProcess",  # the record of a finished run, and the errors about one
        "subprocess.CalledProcessError",
        "subprocess.TimeoutExpired",
    }
)

DENIED: Mapping[str, str] = MappingProxyType(_DENIED)
DENIED_IN_PACKAGE: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {package: MappingProxyType(names) for package, names in _IN_PACKAGE.items()}
)
ALLOWABLE_IN_DENIED: frozenset[str] = _ALLOWABLE

# Only this many leading components are ever looked up in the table, so judging a peer's name
# costs time linear in its length however many dots it has.
_MAX_DEPTH = max(name.count(".") for name in _DENIED) + 1
_MAIN_MODULES = frozenset({"__main__", "__mp_main__"})
_STDLIB: frozenset[str] = frozenset(sys.stdlib_module_names)
_SHORT = 80


def _short(text: str) -> str:
    """A bounded rendering of a name part (peers choose names, and errors quote them)."""
    return text if len(text) <= _SHORT else f"{text[:_SHORT]}...({len(text) - _SHORT} more characters)"


def _is_dunder(part: str) -> bool:
    return len(part) > 4 and part.startswith("__") and part.endswith("__")


def denied_reason(full_name: str) -> str | None:
    """Why ``full_name`` ("module.QualName") can never be allowed, or None if it can be.

    The answer reads as a clause about the part that decided it, e.g. ``"os runs processes or
    reaches the operating system (...)"``.
    """
    if full_name in _ALLOWABLE:
        return None
    parts = full_name.split(".")
    prefix = ""
    for part in parts[:_MAX_DEPTH]:
        prefix = f"{prefix}.{part}" if prefix else part
        reason = _DENIED.get(prefix)
        if reason is not None:
            return f"{prefix} {reason}"
    for i, part in enumerate(parts):
        if _is_dunder(part) and not (i == 0 and part in _MAIN_MODULES):
            return (
                f"{_short(part)} is a special (dunder) attribute, and those lead to globals, "
                f"code objects, subclasses and the import machinery"
            )
    top, rest = parts[0], parts[1:]
    names = _IN_PACKAGE.get(top, {})
    prefixes = _PREFIXES_IN_PACKAGE.get(top, ())
    if names or prefixes:
        for part in rest:
            if part in names:
                return f"{_short(part)} in {top} {names[part]}"
            for start, reason in prefixes:
                if part.startswith(start):
                    return f"{_short(part)} in {top} {reason}"
    if top in _STDLIB:
        for part in rest:
            if part.startswith("_"):
                return (
                    f"{_short(part)} is a private name in the standard library's {top}; private "
                    f"stdlib helpers run commands and code (uuid._get_command_stdout, "
                    f"runpy._run_code) and promise nothing"
                )
    return None


def denied_object_reason(obj: Any) -> str | None:
    """Why the object ``obj`` can never be allowed, or None: judged by its own name.

    A class or function is judged by ``module.qualname`` (``os.system`` is ``posix.system``); a
    module is never allowed (it is a door to everything in it); any other object by its type
    (an instance of ``functools.partial`` or ``_io.TextIOWrapper`` is denied, a bare
    ``object()`` sentinel is not). For the loader to call on what a string entry resolved to.
    """
    if isinstance(obj, type(sys)):
        return f"{_short(str(getattr(obj, '__name__', '?')))} is a module, a door to everything in it"
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module is None and isinstance(qualname, str):
        # a method of a builtin type (str.format, ndarray.tofile): its owner has the module
        owner = getattr(obj, "__objclass__", None) or type(getattr(obj, "__self__", None))
        module = getattr(owner, "__module__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return denied_reason(f"{module}.{qualname}")
    kind = type(obj)
    if kind is object:
        return None
    return denied_reason(f"{kind.__module__}.{kind.__qualname__}")


def parse_allow(entries: Iterable[Any]) -> dict[str, Any]:
    """Map each ``allow=`` entry to its full dotted name and the object given (None for a name).

    An entry is a string "module.QualName" (resolved later, by import, when a pickle asks for
    it) or a class or function (its ``__module__`` and ``__qualname__`` make the name). Raises
    :class:`UsageError` for a malformed entry and, saying why, for any name that runs code or
    reaches the system (see the module docstring).
    """
    from ._errors import UsageError

    if isinstance(entries, (str, bytes)):
        raise UsageError("allow must be a list of names or classes, not a single string")
    try:
        items = list(entries)
    except TypeError:
        raise UsageError(f"allow must be a list of names or classes, not {type(entries).__name__}") from None
    allowed: dict[str, Any] = {}
    for entry in items:
        name, obj = _entry(entry)
        reason = denied_reason(name) if obj is None else denied_object_reason(obj)
        if reason is not None:
            raise UsageError(
                f"allow entry {_short(repr(entry))} can never be allowed: {reason}. allow= is for "
                f"value types a peer may construct; a name that runs code or reaches the system "
                f"would hand the peer that power"
            )
        known = allowed.get(name)
        if obj is not None and known is not None and known is not obj:
            raise UsageError(f"allow has two different objects named {_short(name)!r}")
        if known is None:
            allowed[name] = obj
    return allowed


def _entry(entry: Any) -> tuple[str, Any]:
    """One entry's full name and object, or UsageError if it has no usable name."""
    from ._errors import UsageError

    if isinstance(entry, str):
        if not entry or "." not in entry or "" in entry.split("."):
            raise UsageError(f"allow entry {_short(repr(entry))} is not a dotted 'module.QualName'")
        return entry, None
    module = getattr(entry, "__module__", None)
    qualname = getattr(entry, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        # "<locals>", "<lambda>": nothing importable has that name
        raise UsageError(f"allow entry {_short(repr(entry))} has no importable module and qualified name")
    name = f"{module}.{qualname}"
    if "" in name.split("."):
        raise UsageError(f"allow entry {_short(repr(entry))} has no importable module and qualified name")
    return name, entry
