"""The `slmtune` command: parses arguments and dispatches to the package. Each command's module is
imported only when that command runs, so that `slmtune params` does not pay for torch and MLflow."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import PARAMS_FILE, Config, compose_params, config_to_dict, load_config, params_are_current
from .errors import ConfigError, exit_code_of
from .progress import quiet_libraries


def params_command(args: argparse.Namespace) -> int:
    """Compose conf/ into params.yaml (or check that params.yaml is up to date)."""
    target = Path(args.root) / PARAMS_FILE
    if not args.check:
        compose_params(args.root, target, args.overrides)
        print(f"wrote {target}")
        return 0
    if params_are_current(args.root, args.overrides):
        print(f"{target} is up to date with conf/")
        return 0
    raise ConfigError(f"{target} is stale: it differs from the composition of conf/. Run `slmtune params`.")


def _config(args: argparse.Namespace) -> Config:
    os.chdir(args.root)
    return load_config()


def data_add_command(args: argparse.Namespace) -> int:
    """Recognise a data file, validate it, write its conf/data preset and make it the pipeline's data."""
    from .intake import add_data

    return add_data(Path(args.root), args.file, args.name, args.force)


def lineage_command(args: argparse.Namespace) -> int:
    """Print an adapter's provenance and check it against the current inputs, code and params."""
    from .lineage import print_lineage, read_provenance

    os.chdir(args.root)
    current = config_to_dict(load_config()) if Path(PARAMS_FILE).is_file() else None
    return print_lineage(args.adapter, read_provenance(args.adapter), current)


def sweep_command(args: argparse.Namespace) -> int:
    """Queue a Hydra-syntax grid as DVC experiments, run it under one MLflow parent run, rank it."""
    from .experiments import run_sweep

    return run_sweep(Path(args.root), args.set_param, args.jobs, args.metric, args.direction)


def reproduce_command(args: argparse.Namespace) -> int:
    """Show how to reproduce an MLflow run; with --run, reproduce it in a worktree and compare metrics."""
    from .experiments import reproduce

    return reproduce(Path(args.root), args.run_id, args.run, args.keep)


def chat_command(args: argparse.Namespace) -> int:
    """Interactive streaming chat with the fine-tuned model."""
    from .inference import chat

    return chat(_config(args), args.adapter, args.max_new_tokens, args.temperature, args.top_p, args.system)


def generate_command(args: argparse.Namespace) -> int:
    """Answer a file of prompts in batches; write JSONL."""
    from .inference import generate_file

    config = _config(args)
    batch_size = args.batch_size or config.eval.batch_size
    max_new_tokens = args.max_new_tokens or config.eval.max_new_tokens
    return generate_file(config, args.adapter, Path(args.input), Path(args.output), batch_size, max_new_tokens)


def serve_command(args: argparse.Namespace) -> int:
    """An OpenAI-compatible HTTP API for the fine-tuned model."""
    from .serve import serve

    api_key = args.api_key or os.environ.get("SLMTUNE_API_KEY") or None
    return serve(_config(args), args.adapter, args.host, args.port, api_key, args.model_name, args.max_new_tokens)


def merge_command(args: argparse.Namespace) -> int:
    """Merge the adapter into the base; parity check against base + adapter."""
    from .export import merge_adapter

    config = _config(args)
    return 0 if merge_adapter(config, args.adapter, args.output or config.paths.merged)["ok"] else 1


def export_command(args: argparse.Namespace) -> int:
    """GGUF files of the merged model, each loaded back and compared."""
    from .export import export_gguf

    config = _config(args)
    results = export_gguf(config, args.model, args.output or config.paths.gguf, args.type)
    return 0 if all(r["ok"] for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slmtune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    params = commands.add_parser("params", help="compose conf/ (Hydra) into params.yaml")
    params.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.learning_rate=3e-4")
    params.add_argument("--check", action="store_true", help="fail if params.yaml differs from conf/")
    params.add_argument("--root", default=".", help="project root holding conf/ (default: .)")
    params.set_defaults(handler=params_command)

    data = commands.add_parser("data", help="bring your own data: `slmtune data add FILE`")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    add = data_commands.add_parser(
        "add",
        help="recognise a data file's shape, validate every row, measure token lengths, write conf/data/<name>.yaml, "
        "make it the default and compose params.yaml",
    )
    add.add_argument("file", help="CSV, JSONL, JSON, Parquet, .txt or a save_to_disk folder (copied to data/raw/)")
    add.add_argument("--name", help="preset and source name (default: from the file name)")
    add.add_argument("--force", action="store_true", help="replace an existing conf/data/<name>.yaml")
    add.add_argument("--root", default=".", help="project root (default: .)")
    add.set_defaults(handler=data_add_command)

    lineage = commands.add_parser(
        "lineage", help="show an adapter's provenance and re-check its inputs (exit 1 on mismatch)"
    )
    lineage.add_argument(
        "adapter", nargs="?", default="models/adapter", help="adapter folder (default: models/adapter)"
    )
    lineage.add_argument("--root", default=".", help="project root the recorded paths are relative to")
    lineage.set_defaults(handler=lineage_command)

    sweep = commands.add_parser(
        "sweep", help="run a Hydra-syntax grid as queued DVC experiments under one MLflow parent run"
    )
    sweep.add_argument(
        "-S",
        "--set-param",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="as for `dvc exp run -S`, e.g. -S 'method.r=4,8' -S 'train.learning_rate=1e-4,3e-4'",
    )
    sweep.add_argument("-j", "--jobs", type=int, default=1, help="parallel queue workers (default: 1)")
    sweep.add_argument(
        "--metric", default="tuned.loss", help="metric to rank by, as `dvc exp show` names it (default: tuned.loss)"
    )
    sweep.add_argument("--direction", choices=("min", "max"), help="min or max (default: known from the metric)")
    sweep.add_argument("--root", default=".", help="project root (default: .)")
    sweep.set_defaults(handler=sweep_command)

    reproduce = commands.add_parser("reproduce", help="show (or, with --run, do) the reproduction of an MLflow run")
    reproduce.add_argument("run_id", help="MLflow run id of a train or evaluate run")
    reproduce.add_argument(
        "--run", action="store_true", help="reproduce in a temporary git worktree and compare metrics"
    )
    reproduce.add_argument("--keep", action="store_true", help="keep the worktree afterwards")
    reproduce.add_argument("--root", default=".", help="project root (default: .)")
    reproduce.set_defaults(handler=reproduce_command)

    adapter_help = (
        "adapter folder or MLflow run id (default: the pipeline's final one: paths.aligned after preference tuning, "
        "else paths.adapter)"
    )
    chat = commands.add_parser("chat", help="chat with the fine-tuned model in the terminal (streamed, multi-turn)")
    chat.add_argument("--adapter", help=adapter_help)
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default: 256)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples")
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling when --temperature > 0 (default: 0.9)")
    chat.add_argument("--system", help="a system prompt for this conversation")
    chat.add_argument("--root", default=".", help="project root (default: .)")
    chat.set_defaults(handler=chat_command)

    generate = commands.add_parser("generate", help="answer a file of prompts (.txt lines or .jsonl) into JSONL")
    generate.add_argument(
        "input", help="prompts: a .txt file (one per line) or .jsonl (prompt, or instruction + input)"
    )
    generate.add_argument("-o", "--output", required=True, help="JSONL file to write ({prompt, response} per line)")
    generate.add_argument("--adapter", help=adapter_help)
    generate.add_argument("--batch-size", type=int, help="prompts per batch (default: eval.batch_size)")
    generate.add_argument("--max-new-tokens", type=int, help="longest answer (default: eval.max_new_tokens)")
    generate.add_argument("--root", default=".", help="project root (default: .)")
    generate.set_defaults(handler=generate_command)

    serve = commands.add_parser(
        "serve", help="serve the fine-tuned model over an OpenAI-compatible API (/v1/chat/completions, streamed)"
    )
    serve.add_argument("--adapter", help=adapter_help + "; or a merged model folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    serve.add_argument(
        "--api-key", help="require `Authorization: Bearer KEY` (default: $SLMTUNE_API_KEY); needed beyond loopback"
    )
    serve.add_argument("--model-name", default="slmtune", help="the model id clients send (default: slmtune)")
    serve.add_argument("--max-new-tokens", type=int, default=256, help="longest answer without max_tokens (256)")
    serve.add_argument("--root", default=".", help="project root (default: .)")
    serve.set_defaults(handler=serve_command)

    merge = commands.add_parser("merge", help="merge the adapter into the base: a standalone model, parity-checked")
    merge.add_argument("--adapter", help=adapter_help)
    merge.add_argument("-o", "--output", help="folder to write (default: paths.merged)")
    merge.add_argument("--root", default=".", help="project root (default: .)")
    merge.set_defaults(handler=merge_command)

    export = commands.add_parser(
        "export", help="GGUF files of the merged model for llama.cpp / Ollama, round-trip checked"
    )
    export.add_argument(
        "--model", help="model folder to export (default: paths.merged; a fully fine-tuned models/adapter works too)"
    )
    export.add_argument("--type", nargs="+", default=["f16", "q8_0"], help="GGUF types: f16, q8_0 (default: both)")
    export.add_argument("-o", "--output", help="folder to write (default: paths.gguf)")
    export.add_argument("--root", default=".", help="project root (default: .)")
    export.set_defaults(handler=export_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    return exit_code_of(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
