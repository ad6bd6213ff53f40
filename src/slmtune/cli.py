"""The `slmtune` command."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .config import PARAMS_FILE, ConfigError, compose_params


def params_command(args: argparse.Namespace) -> int:
    """Compose conf/ into params.yaml (or check that params.yaml is up to date)."""
    root = Path(args.root)
    target = root / PARAMS_FILE
    if not args.check:
        compose_params(root, target, args.overrides)
        print(f"wrote {target}")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch) / PARAMS_FILE
        compose_params(root, fresh, args.overrides)
        if target.is_file() and target.read_text(encoding="utf-8") == fresh.read_text(encoding="utf-8"):
            print(f"{target} is up to date with conf/")
            return 0
    print(f"error: {target} is stale: it differs from the composition of conf/. Run `slmtune params`.", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slmtune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    params = commands.add_parser("params", help="compose conf/ (Hydra) into params.yaml")
    params.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.learning_rate=3e-4")
    params.add_argument("--check", action="store_true", help="fail if params.yaml differs from conf/")
    params.add_argument("--root", default=".", help="project root holding conf/ (default: .)")
    params.set_defaults(handler=params_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
