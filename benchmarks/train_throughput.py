"""Training throughput and memory: the hand-written script of the seeds vs this project's train stage.

    python benchmarks/train_throughput.py [--steps 8] [--batch-size 8] [--output reports/train_throughput.json]

Needs `models/base` and `data/tokenized` (`dvc repro tokenize`). Every variant runs in its own process (so that
peak RSS is its own), on the same model, data, LoRA rank/alpha/dropout, batch size and step count:

- baseline: HF `Trainer` + peft LoRA on q_proj/v_proj, every example padded to 512 tokens (as the seeds do);
- slmtune: this project's training code (`prepare_model` + `fit`, as the train stage runs them), same targets,
  batches grouped by length and padded to their longest example; slmtune-packed: padding-free batches;
- memory: the train stage with the shipped presets lora, qlora and full (their own target modules).

For each it prints real (non-pad) tokens per second, the ratio to the baseline, peak RSS (and CUDA) memory and the
share of this machine's measured fp32 matmul peak that the training FLOPs reach (about 4 x parameters x real
tokens for LoRA, 6 x for full fine-tuning). Ratios are measured side by side in one invocation.
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

BASELINE_LENGTH = 512
VARIANTS = {
    "baseline": "HF Trainer + peft, q_proj/v_proj, pad to 512",
    "slmtune": "train stage, q_proj/v_proj, length-grouped dynamic padding",
    "slmtune-packed": "train stage, q_proj/v_proj, padding-free packing",
    "lora": "train stage, method=lora (all attention + MLP projections)",
    "qlora": "train stage, method=qlora (4-bit NF4 base)",
    "full": "train stage, method=full",
}


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 matmul throughput of this machine (GFLOP/s), the best of `repeats`."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def bench_config(variant: str, steps: int, batch_size: int):
    """params.yaml with the benchmark's settings: fixed steps, no checkpoints, validation only after training."""
    from slmtune.config import load_config

    config = load_config()
    train = config.train
    train.max_steps, train.batch_size, train.save_steps = steps, batch_size, 0
    train.eval_steps, train.logging_steps, train.gradient_accumulation_steps = steps + 1, 1, 1
    if variant in ("baseline", "slmtune", "slmtune-packed"):
        config.method.target_modules = ["q_proj", "v_proj"]
        train.packing = variant == "slmtune-packed"
    else:
        from slmtune.config import compose_params

        preset = compose_params(".", Path(tempfile.mkdtemp()) / "params.yaml", [f"method={variant}"]).method
        config.method = preset
        if variant == "full":
            train.learning_rate = 5e-5
    return config


def run_baseline(config, tokenizer) -> dict:
    """The seeds' script: pad/truncate every example to 512 tokens, Trainer's default sampler and collator."""
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    train = load_from_disk(config.paths.tokenized)["train"]
    pad = tokenizer.pad_token_id

    def to_512(row):
        ids = row["input_ids"][:BASELINE_LENGTH]
        labels = row["labels"][:BASELINE_LENGTH]
        fill = BASELINE_LENGTH - len(ids)
        return {
            "input_ids": ids + [pad] * fill,
            "labels": labels + [-100] * fill,
            "attention_mask": [1] * len(ids) + [0] * fill,
        }

    padded = train.map(to_512, remove_columns=train.column_names)
    model = AutoModelForCausalLM.from_pretrained(config.paths.base_model, dtype=torch.float32)
    method = config.method
    model = get_peft_model(
        model,
        LoraConfig(
            r=method.r,
            lora_alpha=method.alpha,
            lora_dropout=method.dropout,
            target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    real = {"tokens": 0}

    def collate(features):
        real["tokens"] += sum(sum(f["attention_mask"]) for f in features)
        return default_data_collator(features)

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=config.train.max_steps,
        per_device_train_batch_size=config.train.batch_size,
        learning_rate=config.train.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=config.train.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    result = Trainer(model=model, args=args, train_dataset=padded, data_collator=collate).train()
    runtime = result.metrics["train_runtime"]
    return {
        "tokens": real["tokens"],
        "runtime_s": runtime,
        "processed_tokens": config.train.max_steps * config.train.batch_size * BASELINE_LENGTH,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
    }


def run_ours(config, tokenizer) -> dict:
    """The train stage's own code path: `prepare_model` then `fit` (MLflow into a throwaway store)."""
    import mlflow
    from datasets import load_from_disk

    from slmtune.modeling import parameter_counts
    from slmtune.telemetry import MemoryMonitor, StepLog
    from slmtune.training import fit, prepare_model

    splits = load_from_disk(config.paths.tokenized).select_columns(["input_ids", "labels"])
    model = prepare_model(config, tokenizer, MemoryMonitor(False))
    mlflow.set_tracking_uri(f"sqlite:///{tempfile.mkdtemp()}/bench.db")
    with mlflow.start_run():
        metrics, _ = fit(config, model, tokenizer, splits, StepLog())
    tokens = round(metrics["tokens_per_second"] * metrics["train_runtime_s"])
    counts = parameter_counts(model)
    base = counts["total"] if config.method.adapter == "none" else counts["total"] - counts["trainable"]
    return {
        "tokens": tokens,
        "runtime_s": metrics["train_runtime_s"],
        "processed_tokens": None,
        "trainable": counts["trainable"],
        "params": base,
    }


def worker(variant: str, steps: int, batch_size: int) -> dict:
    import resource

    import torch

    from slmtune.modeling import load_tokenizer

    config = bench_config(variant, steps, batch_size)
    tokenizer = load_tokenizer(config.paths.base_model)
    result = run_baseline(config, tokenizer) if variant == "baseline" else run_ours(config, tokenizer)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    result["flops_per_token"] = (6 if variant == "full" else 4) * result["params"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--output", help="also write the figures as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.steps, args.batch_size)), flush=True)
        return
    for needed in ("models/base", "data/tokenized"):
        if not Path(needed).exists():
            sys.exit(f"error: {needed} not found; run `dvc repro tokenize` first.")
    peak = matmul_peak_gflops()
    import torch

    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"measured fp32 matmul peak {peak:.1f} GFLOP/s; {args.steps} steps x batch {args.batch_size}",
        flush=True,
    )
    results = {}
    for variant in args.variants.split(","):
        started = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-P",
                __file__,
                "--worker",
                variant,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
            ],
            capture_output=True,
            text=True,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"error: variant {variant} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(lines[-1][len("RESULT ") :])
        result["tokens_per_second"] = result["tokens"] / result["runtime_s"]
        result["matmul_peak_share"] = result["flops_per_token"] * result["tokens_per_second"] / (peak * 1e9)
        result["wall_s"] = time.perf_counter() - started
        results[variant] = result
        print(
            f"  {variant}: {result['tokens_per_second']:.1f} real tokens/s, peak RSS {result['peak_rss_mb']:.0f} MB "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    base = results.get("baseline")
    print("\n| variant | what | real tokens/s | vs baseline | peak RSS MB | peak CUDA MB | share of fp32 matmul peak |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for variant, r in results.items():
        ratio = f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x" if base else "-"
        cuda = f"{r['peak_cuda_mb']:.0f}" if r["peak_cuda_mb"] is not None else "-"
        print(
            f"| {variant} | {VARIANTS[variant]} | {r['tokens_per_second']:.1f} | {ratio} | {r['peak_rss_mb']:.0f} | "
            f"{cuda} | "
            f"{100 * r['matmul_peak_share']:.1f}% |"
        )
    if base and "slmtune" in results:
        print(
            "\nspeed-up of the train stage over the baseline: "
            f"{results['slmtune']['tokens_per_second'] / base['tokens_per_second']:.2f}x "
            f"real tokens/s (the baseline computes {base['processed_tokens']:,} token positions for "
            f"{base['tokens']:,} real tokens)"
        )
    if args.output:
        Path(args.output).write_text(
            json.dumps(
                {"matmul_peak_gflops": peak, "steps": args.steps, "batch_size": args.batch_size, "results": results},
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
