"""The ``fraudactors`` console script.

Each subcommand lives in its own module exposing ``HELP`` (one line), ``configure_parser(parser)``
and ``main(args) -> int``. Modules keep heavy imports inside ``main`` so ``--help`` stays fast.
Exit code 0 on success; otherwise non-zero with one clear line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fraudactors import __version__
from fraudactors.errors import FraudActorsError

COMMANDS: dict[str, str] = {
    "demo": "fraudactors.demo",
    "run": "fraudactors.engine.app",
    "models": "fraudactors.engine.models_command",
    "train": "fraudactors.modeling.train",
    "evaluate": "fraudactors.modeling.evaluate",
    "ab": "fraudactors.ab.cli",
    "loadgen": "loadgen.cli",
    "bench": "loadgen.bench",
    "drill": "loadgen.drill",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fraudactors",
        description="Real-time fraud detection engine (Kafka in, Redis features, ONNX models, decisions out).",
    )
    parser.add_argument("--version", action="version", version=f"fraudactors {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            # Every command ships with the package: one that cannot be imported is a broken install
            # or a bug, never a command to leave out of --help.
            exc.add_note(f"fraudactors: the {name!r} command ({module_name}) cannot be imported")
            raise
        # argparse %-formats help strings: a literal "%" in a HELP line must not break --help.
        command = sub.add_parser(name, help=module.HELP.replace("%", "%%"), description=module.HELP)
        module.configure_parser(command)
        command.set_defaults(_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args._main(args)
        return code
    except FraudActorsError as exc:
        print(f"fraudactors {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fraudactors {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
