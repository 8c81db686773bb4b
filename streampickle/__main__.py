"""``python -m streampickle``: command-line tools. Only argument parsing and output live here;
the work is in ``_inspect``.

``python -m streampickle inspect FILE`` (``-`` for standard input) lists each message of a
captured stream without unpickling anything; ``--pickle`` reads concatenated standard pickles
instead, judged as ``PickleDecoder`` judges them (``--max-pickle-size`` bounds each, as it
bounds a message's pickle part). Exit status 0 when everything is well formed, 1 when something isn't (the listing and
standard error say where), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import IO, Any

from . import _inspect
from ._errors import StreamPickleError
from ._limits import Limits


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m streampickle", description="streampickle command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect",
        help="list the messages of a captured stream without unpickling anything",
        description=(
            "List each message of a captured streampickle stream (or, with --pickle, each of "
            "a file of concatenated standard pickles): sizes, flags, tags, the globals each "
            "pickle names and whether the safe loader would refuse them. Nothing is unpickled. "
            "Exit status 0 if every message is well formed, 1 if one isn't, 2 for usage errors."
        ),
    )
    inspect.add_argument("file", help="the captured stream, or - for standard input")
    inspect.add_argument("--pickle", action="store_true",
                         help="the input is concatenated standard pickles (as pickle.dump writes), not messages")
    inspect.add_argument("--dis", action="store_true", help="also list each pickle's opcodes")
    inspect.add_argument("--dis-limit", type=_count, default=_inspect.DIS_LIMIT, metavar="N",
                         help=f"list at most N opcodes of each pickle with --dis (default {_inspect.DIS_LIMIT})")
    inspect.add_argument("--json", action="store_true", help="print one JSON document: the records and a summary")
    inspect.add_argument("--key-file", metavar="PATH",
                         help="a file holding the key's raw bytes: check each tag with the MAC its flags name")
    inspect.add_argument("--allow", action="append", default=[], metavar="NAME",
                         help="judge globals as a loader with allow=[NAME, ...] would (repeatable)")
    defaults = Limits()
    for name in ("max_message_size", "max_pickle_size", "max_side_chunks", "max_descriptors"):
        inspect.add_argument(f"--{name.replace('_', '-')}", type=_count, default=getattr(defaults, name),
                             metavar="N", help=f"Limits.{name} (default {getattr(defaults, name)})")
    return parser


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    key = None
    if args.key_file is not None:
        try:
            with open(args.key_file, "rb") as f:
                key = f.read()
        except OSError as exc:
            parser.error(f"can't read the key file: {exc}")
        if not key:
            parser.error("the key file is empty")
    try:
        file: IO[bytes] = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    except OSError as exc:
        parser.error(f"can't open {args.file}: {exc}")
    limits = Limits(
        max_message_size=args.max_message_size, max_pickle_size=args.max_pickle_size,
        max_side_chunks=args.max_side_chunks, max_descriptors=args.max_descriptors,
    )
    dis_limit = args.dis_limit if args.dis else 0
    try:
        if args.pickle:
            records: Any = _inspect.inspect_pickles(file, allow=args.allow, dis_limit=dis_limit, limits=limits)
        else:
            records = _inspect.inspect_messages(file, key=key, limits=limits, allow=args.allow, dis_limit=dis_limit)
        return _report(records, "pickles" if args.pickle else "messages", args.json)
    except StreamPickleError as exc:  # a refused --allow entry, before any record
        parser.error(str(exc))
    except BrokenPipeError:  # the reader of the listing went away (| head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        print(f"streampickle inspect: can't read {args.file}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - no traceback for any input; this is the inspector's bug
        print(f"streampickle inspect: internal error (a bug in the inspector, please report it): "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if file is not sys.stdin.buffer:
            file.close()


def _report(records: Any, kind: str, as_json: bool) -> int:
    """Print the records as they come (one JSON document, or the listing) and the summary."""
    out = sys.stdout
    summary = _inspect.Summary()
    if as_json:
        out.write('{"' + kind + '": [')
    for i, record in enumerate(records):
        summary.add(record)
        if as_json:
            out.write(("," if i else "") + "\n" + json.dumps(_inspect.to_json(record)))
        else:
            out.write("\n".join(_inspect.render_text(record)) + "\n")
    if as_json:
        out.write('\n], "summary": ' + json.dumps(summary.as_json(kind)) + "}\n")
    else:
        out.write(summary.text(kind) + "\n")
    out.flush()
    if summary.errors:
        print(f"streampickle inspect: {summary.first_error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
