"""Training throughput and memory on users' kind of data: peers vs this project's train stage, side by side.

    python benchmarks/train_throughput.py [--steps 6] [--batch-size 8] [--sets long,short] [--output FILE.json]
                                          [--model base|llama-1b|llama-tiny] [--set train.KEY=VALUE ...]

Needs `models/base` and `data/tokenized` (`dvc repro tokenize`). `--model llama-1b` trains, instead of the base
model, a Llama with Llama-3.2-1B's shape (1.07 B parameters with the base model's 49k vocabulary) and random
weights, built here from its config (for GPUs: throughput needs no trained weights); `llama-tiny` is the same
path in seconds. Two data sets, in one invocation:

- long: public-instruction-like data built here (`instruction_data.py`: 400 tasks, mean ~136 SmolLM2 tokens per
  example, longest ~475), prepared and tokenized by the project's own prepare/tokenize code with max_length 512;
- short: the pipeline's tokenized knowledge base (`data/tokenized`, mean ~63 tokens; the seeds' script reads its
  CSV, `data/raw/company_kb.csv`).

On each, every variant runs in its own process (so that peak RSS is its own), on the same model, LoRA rank/alpha/
dropout, batch size and step count:

- seeds: the seeds' hand-written script: pandas reads the CSV, Alpaca-style prompt, every example padded to 512,
  every token trained, HF Trainer + peft LoRA on q_proj/v_proj, fp32;
- trl: TRL `SFTTrainer` with its defaults (prompt-completion data, peft's default targets q_proj/v_proj; TRL turns on
  bf16 and gradient checkpointing; `use_cpu` set where there is no GPU, which its bf16 default requires);
  trl-full: the same with no peft config, TRL's own default (full fine-tuning, the learning rate of `full`);
- default: this project's train stage (`prepare_model` + `fit`) with the LoRA preset (method=lora, all
  projections; precision auto); default-fp32: the same in fp32 (the loss curves of the two are printed);
- qv: the train stage with q_proj/v_proj only; full: the train stage with method=full.

For each: real (non-pad) tokens per second, the ratio to each peer, peak RSS (and CUDA) memory, and the share of this
machine's measured matmul peak, in the precision the variant computes in, that the training FLOPs reach (about
4 x parameters x real tokens for LoRA, 6 x for full fine-tuning).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEEDS_LENGTH = 512
LONG_MAX_LENGTH = 512
VARIANTS = {
    "seeds": "seeds' script: pandas CSV, pad to 512, Trainer + peft q/v, fp32",
    "trl": "TRL SFTTrainer, its defaults (peft q/v)",
    "trl-full": "TRL SFTTrainer, its defaults with no peft config (full fine-tuning)",
    "default": "train stage, LoRA preset (all projections), precision auto",
    "default-fp32": "train stage, LoRA preset, precision fp32",
    "qv": "train stage, q_proj/v_proj only",
    "full": "train stage, method=full",
}
PEERS = ("seeds", "trl", "trl-full")
MODELS = {
    # Llama-3.2-1B's shape; the vocabulary is the base model's tokenizer's
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
    "llama-tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
}


def matmul_peak_gflops(dtype_name: str, repeats: int = 10) -> float:
    """Measured matmul throughput of this machine (GFLOP/s) in fp32 or bf16, the best of `repeats` products of
    2048 x 2048 matrices on a CPU (512 for bf16 on a CPU that emulates it: a minute per 2048 product), 8192 x 8192
    on a GPU (smaller ones leave a GPU's units idle)."""
    import torch

    from slmtune.training import bf16_native

    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 8192 if device == "cuda" else 2048 if dtype_name == "float32" or bf16_native() else 512
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def build_long_set(folder: Path) -> dict:
    """Write the long instruction set (JSONL and the same rows as CSV for the seeds' script), then prepare and
    tokenize it with the project's code into `folder/tokenized`."""
    import pandas as pd
    from datasets import Dataset, DatasetDict

    sys.path.insert(0, str(HERE))
    from instruction_data import write_instruction_set

    from slmtune.config import SourceConfig, load_config
    from slmtune.data import Issues, prepare_data
    from slmtune.modeling import load_tokenizer
    from slmtune.prompting import tokenize_splits

    raw = write_instruction_set(folder / "instructions.jsonl")
    pd.read_json(raw, lines=True).to_csv(folder / "instructions.csv", index=False)
    config = load_config()
    config.data.sources = {"instructions": SourceConfig(path=str(raw))}
    config.data.max_length = LONG_MAX_LENGTH
    prepared = prepare_data(config.data)
    tokenizer = load_tokenizer(config.paths.base_model)
    examples, stats = tokenize_splits(prepared.splits, config.data, tokenizer, False, Issues(config.data.on_invalid))
    DatasetDict(
        {
            name: Dataset.from_dict({"input_ids": [e.input_ids for e in split], "labels": [e.labels for e in split]})
            for name, split in examples.items()
            if split
        }
    ).save_to_disk(str(folder / "tokenized"))
    lengths = [len(e.input_ids) for e in examples["train"]]
    return {"examples": len(lengths), "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths)}


def build_model(name: str, folder: Path) -> dict:
    """A Llama of `MODELS[name]`'s shape with random weights (seed 0) and the base model's tokenizer, saved as
    safetensors in `folder/model`, as a user's model folder would be."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmtune.modeling import load_tokenizer

    tokenizer = load_tokenizer("models/base")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODELS[name],
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return {"model": name, "parameters": sum(p.numel() for p in model.parameters())}


def apply_overrides(config, overrides: list[str]) -> None:
    """`section.key=value` settings (YAML values) on top of params.yaml, e.g. train.max_batch_tokens=1024."""
    import yaml

    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        target = getattr(config, section)
        if not hasattr(target, name):
            sys.exit(f"error: --set {item}: {key} is not a config key")
        setattr(target, name, yaml.safe_load(value))


def bench_config(variant: str, steps: int, batch_size: int, tokenized: str, max_length: int):
    """params.yaml with the benchmark's settings: fixed steps, no checkpoints (and no validation:
    `run_ours` trains on the training split alone)."""
    from slmtune.config import compose_params

    # the LoRA preset (the shipped default for the knowledge base is full fine-tuning: the `full` variant)
    config = compose_params(".", Path(tempfile.mkdtemp()) / "params.yaml", ["method=lora"])
    config.paths.tokenized = tokenized
    config.data.max_length = max_length
    train = config.train
    train.max_steps, train.batch_size, train.save_steps = steps, batch_size, 0
    train.eval_steps, train.logging_steps, train.gradient_accumulation_steps = steps + 1, 1, 1
    if variant in ("qv", "seeds", "trl"):
        config.method.target_modules = ["q_proj", "v_proj"]
    if variant == "default-fp32":
        train.precision = "fp32"
    if variant in ("full", "trl-full"):
        config.method = compose_params(".", Path(tempfile.mkdtemp()) / "params.yaml", ["method=full"]).method
        train.learning_rate = 5e-5
    return config


def lora_config(config, **extra):
    from peft import LoraConfig

    method = config.method
    return LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout, task_type="CAUSAL_LM", **extra)


def peer_arguments(config) -> dict:
    """What the peers' scripts set: steps, batch size, learning rate, seed; no checkpoints, no reporting."""
    return {
        "output_dir": tempfile.mkdtemp(),
        "max_steps": config.train.max_steps,
        "per_device_train_batch_size": config.train.batch_size,
        "learning_rate": config.train.learning_rate,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": config.train.seed,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def loss_curve(log_history: list[dict]) -> list[float]:
    return [round(entry["loss"], 4) for entry in log_history if "loss" in entry]


def run_seeds(config, tokenizer, data_dir: Path) -> dict:
    """The seeds' script: pandas CSV -> Alpaca-style prompts -> tokenizer(padding="max_length", 512) -> Trainer."""
    import pandas as pd
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    csv = data_dir / "instructions.csv" if data_dir else Path(config.data.sources["company_kb"].path)
    frame = pd.read_csv(csv).fillna("")

    def prompt(row) -> str:
        context = f"### Input:\n{row['input']}\n\n" if row["input"] else ""
        return f"### Instruction:\n{row['instruction']}\n\n{context}### Response:\n{row['output']}{tokenizer.eos_token}"

    texts = [prompt(row) for _, row in frame.iterrows()]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=SEEDS_LENGTH)
    dataset = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    model = AutoModelForCausalLM.from_pretrained(config.paths.base_model, dtype=torch.float32)
    model = get_peft_model(model, lora_config(config, target_modules=["q_proj", "v_proj"]))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    real = {"tokens": 0}

    def collate(features):
        real["tokens"] += sum(sum(f["attention_mask"]) for f in features)
        return collator(features)

    args = TrainingArguments(**peer_arguments(config))
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    result = trainer.train()
    return {
        "tokens": real["tokens"],
        "runtime_s": result.metrics["train_runtime"],
        "params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "precision": "fp32",
        "losses": loss_curve(trainer.state.log_history),
    }


def run_trl(config, tokenizer, data_dir: Path | None) -> dict:
    """TRL SFTTrainer with its defaults on prompt-completion pairs (the texts the tokenized split holds, chat
    template included); TRL tokenizes them and trains the completions."""
    import torch
    from datasets import Dataset, load_from_disk
    from trl import SFTConfig, SFTTrainer

    splits = load_from_disk(config.paths.tokenized)["train"]
    # prompt / completion text back from the tokenized split: what TRL would be handed as a user's data
    rows = []
    for ids, labels in zip(splits["input_ids"], splits["labels"]):
        cut = next(i for i, label in enumerate(labels) if label != -100)
        rows.append({"prompt": tokenizer.decode(ids[:cut]), "completion": tokenizer.decode(ids[cut:])})
    real = {"tokens": 0}
    # TRL's bf16 default needs use_cpu on a machine without a GPU (transformers refuses CPU bf16 otherwise)
    args = SFTConfig(**peer_arguments(config), use_cpu=not torch.cuda.is_available())
    trainer = SFTTrainer(
        model=config.paths.base_model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(config) if config.method.adapter == "lora" else None,
    )
    collator = trainer.data_collator

    def collate(features):
        batch = collator(features)
        real["tokens"] += (
            int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        )
        return batch

    trainer.data_collator = collate
    result = trainer.train()
    model = trainer.model
    return {
        "tokens": real["tokens"],
        "runtime_s": result.metrics["train_runtime"],
        "params": sum(p.numel() for p in model.parameters() if not p.requires_grad)
        or sum(p.numel() for p in model.parameters()),
        "precision": "bf16" if args.bf16 else "fp32",
        "losses": loss_curve(trainer.state.log_history),
    }


def run_ours(config, tokenizer, data_dir: Path | None) -> dict:
    """The train stage's own code path: `prepare_model` then `fit` (MLflow into a throwaway store), on the training
    split alone: like the peers, no validation passes (`fit`'s tokens/s leaves them out, but `tokens` below is
    tokens/s x the whole runtime, which would include them)."""
    import mlflow
    from datasets import DatasetDict, load_from_disk

    from slmtune.modeling import parameter_counts
    from slmtune.telemetry import MemoryMonitor, StepLog
    from slmtune.training import fit, prepare_model, resolved_precision

    splits = DatasetDict(train=load_from_disk(config.paths.tokenized)["train"].select_columns(["input_ids", "labels"]))
    model = prepare_model(config, tokenizer, MemoryMonitor(False))
    moment("model prepared")
    mlflow.set_tracking_uri(f"sqlite:///{tempfile.mkdtemp()}/bench.db")
    step_log = StepLog()
    with mlflow.start_run():
        moment("MLflow run started")
        metrics, _, _ = fit(config, model, tokenizer, splits, step_log)
    moment("trained")
    counts = parameter_counts(model)
    return {
        "tokens": round(metrics["tokens_per_second"] * metrics["train_runtime_s"]),
        "runtime_s": metrics["train_runtime_s"],
        "params": counts["total"] if config.method.adapter == "none" else counts["total"] - counts["trainable"],
        "precision": resolved_precision(config.train),
        "losses": [round(row["loss"], 4) for row in step_log.rows if "loss" in row],
        "padding_free": bool(metrics["padding_free"]),
        "gradient_checkpointing": bool(metrics["gradient_checkpointing"]),
    }


STARTED = time.perf_counter()


def moment(what: str) -> None:
    """A worker's progress on stderr (seconds since it started): where a slow or stopped variant spent its time."""
    print(f"[{time.perf_counter() - STARTED:.1f} s] {what}", file=sys.stderr, flush=True)


def worker(
    variant: str,
    steps: int,
    batch_size: int,
    data_dir: str | None,
    overrides: list[str],
    model_dir: str | None,
    stacks_every: float | None = None,
) -> dict:
    import faulthandler
    import resource

    import torch

    if stacks_every:  # where a slow or stalled variant is: every thread's stack on stderr, every `stacks_every` s
        faulthandler.dump_traceback_later(stacks_every, repeat=True, file=sys.stderr)

    from slmtune.modeling import load_tokenizer

    folder = Path(data_dir) if data_dir else None
    tokenized = str(folder / "tokenized") if folder else "data/tokenized"
    config = bench_config(variant, steps, batch_size, tokenized, LONG_MAX_LENGTH if folder else 0)
    if not folder:
        from slmtune.config import load_config

        config.data.max_length = load_config().data.max_length
    if model_dir:
        config.paths.base_model = model_dir
    if variant not in PEERS:
        apply_overrides(config, overrides)
    tokenizer = load_tokenizer(config.paths.base_model)
    moment("configured")
    run = {"seeds": run_seeds, "trl": run_trl, "trl-full": run_trl}.get(variant, run_ours)
    result = run(config, tokenizer, folder)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    result["flops_per_token"] = (6 if variant in ("full", "trl-full") else 4) * result["params"]
    return result


def last_result(stdout: str) -> dict | None:
    """The figures a worker printed (its last `RESULT {...}` line), or None."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :]) if lines else None


def run_variant(variant: str, args, data_dir: Path | None, model_dir: Path | None, set_name: str = "") -> dict | None:
    """One variant in its own process; None when it ran past `--variant-timeout` (its last output is printed,
    with the moments the worker reached, and the next variant runs)."""
    command = [sys.executable, "-P", __file__, "--worker", variant, "--steps", str(args.steps)]
    command += ["--batch-size", str(args.batch_size)] + (["--data-dir", str(data_dir)] if data_dir else [])
    command += ["--model-dir", str(model_dir)] if model_dir else []
    command += [f"--set={item}" for item in args.set]
    command += ["--stacks-every", str(args.stacks_every)] if args.stacks_every else []
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.variant_timeout)
    except subprocess.TimeoutExpired as exc:
        stdout, stderr = (part.decode() if isinstance(part, bytes) else part or "" for part in (exc.stdout, exc.stderr))
        save_log(args, set_name, variant, stdout, stderr)
        done = last_result(stdout)
        print(
            f"  {variant}: still running after {args.variant_timeout} s, stopped; its last output:\n{stderr[-20000:]}"
        )
        if done:  # it had finished measuring and hung on its way out
            print(f"  {variant}: its figures were complete before it was stopped; they are kept")
        return done
    save_log(args, set_name, variant, proc.stdout, proc.stderr)
    result = last_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        sys.exit(f"error: variant {variant} failed:\n{proc.stderr[-3000:]}")
    return result


def save_log(args, set_name: str, variant: str, stdout: str, stderr: str) -> None:
    """A worker's whole output in `--logs` (its progress lines, and its stacks with `--stacks-every`)."""
    if args.logs:
        Path(args.logs).mkdir(parents=True, exist_ok=True)
        (Path(args.logs) / f"{set_name}-{variant}.log").write_text(stdout + "\n--- stderr ---\n" + stderr)


def table(results: dict, peaks: dict) -> list[str]:
    peers = [p for p in PEERS if p in results]
    head = "| variant | what | real tokens/s | " + "".join(f"vs {p} | " for p in peers)
    lines = [head + "peak RSS MB | peak CUDA MB | precision | share of matmul peak |"]
    lines.append("|---|---|---:|" + "---:|" * len(peers) + "---:|---:|---|---:|")
    for variant, r in results.items():
        ratios = "".join(f"{r['tokens_per_second'] / results[p]['tokens_per_second']:.2f}x | " for p in peers)
        cuda = f"{r['peak_cuda_mb']:.0f}" if r["peak_cuda_mb"] is not None else "-"
        share = r["flops_per_token"] * r["tokens_per_second"] / (peaks[r["precision"]] * 1e9)
        r["matmul_peak_share"] = share
        lines.append(
            f"| {variant} | {VARIANTS[variant]} | {r['tokens_per_second']:.1f} | {ratios}{r['peak_rss_mb']:.0f} | "
            f"{cuda} | {r['precision']} | {100 * share:.1f}% |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sets", default="long,short")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--output", help="also write the figures as JSON here")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override for the train stage's runs"
    )
    parser.add_argument(
        "--model", default="base", choices=["base", *MODELS], help="models/base, or a Llama built here (random)"
    )
    parser.add_argument(
        "--variant-timeout", type=float, help="seconds a variant may run before it is stopped and reported as such"
    )
    parser.add_argument(
        "--stacks-every", type=float, help="print each worker's thread stacks on stderr every this many seconds"
    )
    parser.add_argument("--logs", help="write each worker's whole output into this folder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(
            args.worker, args.steps, args.batch_size, args.data_dir, args.set, args.model_dir, args.stacks_every
        )
        print("RESULT " + json.dumps(result), flush=True)
        return
    needed = ["models/base"] + (["data/tokenized"] if "short" in args.sets.split(",") else [])
    for path in needed:
        if not Path(path).exists():
            sys.exit(f"error: {path} not found; run `dvc repro tokenize` first.")
    import torch

    from slmtune.training import bf16_native

    peaks = {"fp32": matmul_peak_gflops("float32"), "bf16": matmul_peak_gflops("bfloat16")}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPUs"
    print(
        f"machine: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; measured matmul peak "
        f"fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s "
        f"(precision auto trains in bf16 here: {bf16_native()}); "
        f"{args.steps} steps x batch {args.batch_size}" + (f"; overrides {' '.join(args.set)}" if args.set else ""),
        flush=True,
    )
    report = {"matmul_peak_gflops": peaks, "steps": args.steps, "batch_size": args.batch_size, "sets": {}}
    report.update(device=device, overrides=args.set)
    with tempfile.TemporaryDirectory(prefix="slmtune-bench-") as scratch:
        model_dir = None
        if args.model != "base":
            report["model"] = build_model(args.model, Path(scratch))
            model_dir = Path(scratch) / "model"
            print(f"model: {json.dumps(report['model'])}, random weights", flush=True)
        for name in args.sets.split(","):
            data_dir = Path(scratch) if name == "long" else None
            info = build_long_set(Path(scratch)) if name == "long" else {"tokenized": "data/tokenized"}
            print(f"\n## {name} set: {json.dumps(info)}", flush=True)
            results = {}
            for variant in args.variants.split(","):
                started = time.perf_counter()
                result = run_variant(variant, args, data_dir, model_dir, name)
                if result is None:
                    continue
                result["tokens_per_second"] = result["tokens"] / result["runtime_s"]
                result["wall_s"] = time.perf_counter() - started
                results[variant] = result
                print(
                    f"  {variant}: {result['tokens_per_second']:.1f} real tokens/s, peak RSS "
                    f"{result['peak_rss_mb']:.0f} MB, losses {result['losses']} ({result['wall_s']:.0f} s)",
                    flush=True,
                )
            print("\n" + "\n".join(table(results, peaks)), flush=True)
            report["sets"][name] = {"data": info, "results": results}
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
