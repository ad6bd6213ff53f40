"""The `slmtune` command."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from .config import PARAMS_FILE, ConfigError, compose_params, config_to_dict, load_config
from .experiments import ExperimentError


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


def lineage_command(args: argparse.Namespace) -> int:
    """Print an adapter's provenance and check it against the current inputs, code and params."""
    from .lineage import check_lineage, read_provenance

    os.chdir(args.root)
    provenance = read_provenance(args.adapter)
    git, run, exp = provenance["git"], provenance["mlflow"], provenance.get("dvc", {})
    dirty = f" (uncommitted: {', '.join(git['dirty_files'])})" if git.get("dirty") else ""
    print(f"adapter      {args.adapter}")
    print(f"MLflow run   {run['run_id']} (experiment {run['experiment_id']})")
    print(f"DVC exp      {exp.get('exp_name', 'unknown')}, baseline {exp.get('baseline_rev', 'unknown')}")
    print(f"git commit   {git.get('commit')}{dirty}")
    print("metrics      " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(provenance["metrics"].items())))
    current = config_to_dict(load_config()) if Path(PARAMS_FILE).is_file() else None
    rows = check_lineage(provenance, current)
    for kind in ("input", "code", "param"):
        group = [row for row in rows if row["kind"] == kind]
        shown = [row for row in group if kind != "param" or row["status"] != "MATCH"]
        if kind == "param" and len(shown) < len(group):
            print(f"MATCH      params: {len(group) - len(shown)} keys of model, data, method, train equal params.yaml")
        for row in shown:
            detail = row["recorded"] if row["status"] in ("MATCH", "UNHASHED") else f"recorded {row['recorded']}, now {row['current']}"
            print(f"{row['status']:10} {kind} {row['name']}: {detail}")
    if current is None:
        print(f"(no {PARAMS_FILE} here: params not compared)")
    bad = [row for row in rows if row["status"] in ("MISMATCH", "MISSING")]
    print("lineage: " + ("MATCH" if not bad else f"MISMATCH ({len(bad)} of {len(rows)} checks differ)"))
    return 1 if bad else 0


def sweep_command(args: argparse.Namespace) -> int:
    """Queue a Hydra-syntax grid as DVC experiments, run it under one MLflow parent run, rank it."""
    from .experiments import run_sweep

    return run_sweep(Path(args.root), args.set_param, args.jobs, args.metric, args.direction)


def reproduce_command(args: argparse.Namespace) -> int:
    """Show how to reproduce an MLflow run; with --run, reproduce it in a worktree and compare metrics."""
    from .experiments import print_plan, reproduce_run, reproduction_plan

    root = Path(args.root).resolve()
    os.chdir(root)
    config = load_config()
    plan = reproduction_plan(root, config, args.run_id)
    print_plan(plan)
    return reproduce_run(root, config, plan, keep=args.keep) if args.run else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slmtune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    params = commands.add_parser("params", help="compose conf/ (Hydra) into params.yaml")
    params.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.learning_rate=3e-4")
    params.add_argument("--check", action="store_true", help="fail if params.yaml differs from conf/")
    params.add_argument("--root", default=".", help="project root holding conf/ (default: .)")
    params.set_defaults(handler=params_command)

    lineage = commands.add_parser("lineage", help="show an adapter's provenance and re-check its inputs (exit 1 on mismatch)")
    lineage.add_argument("adapter", nargs="?", default="models/adapter", help="adapter folder (default: models/adapter)")
    lineage.add_argument("--root", default=".", help="project root the recorded paths are relative to")
    lineage.set_defaults(handler=lineage_command)

    sweep = commands.add_parser("sweep", help="run a Hydra-syntax grid as queued DVC experiments under one MLflow parent run")
    sweep.add_argument("-S", "--set-param", action="append", default=[], metavar="OVERRIDE",
                       help="as for `dvc exp run -S`, e.g. -S 'method.r=4,8' -S 'train.learning_rate=1e-4,3e-4'")  # fmt: skip
    sweep.add_argument("-j", "--jobs", type=int, default=1, help="parallel queue workers (default: 1)")
    sweep.add_argument("--metric", default="tuned.loss", help="metric to rank by, as `dvc exp show` names it (default: tuned.loss)")
    sweep.add_argument("--direction", choices=("min", "max"), help="min or max (default: known from the metric)")
    sweep.add_argument("--root", default=".", help="project root (default: .)")
    sweep.set_defaults(handler=sweep_command)

    reproduce = commands.add_parser("reproduce", help="show (or, with --run, do) the reproduction of an MLflow run")
    reproduce.add_argument("run_id", help="MLflow run id of a train or evaluate run")
    reproduce.add_argument("--run", action="store_true", help="reproduce in a temporary git worktree and compare metrics")
    reproduce.add_argument("--keep", action="store_true", help="keep the worktree afterwards")
    reproduce.add_argument("--root", default=".", help="project root (default: .)")
    reproduce.set_defaults(handler=reproduce_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, ExperimentError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
