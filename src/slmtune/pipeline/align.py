"""The align stage: preference tuning (DPO, ORPO, KTO through TRL) of the SFT adapter `train` produced, and the
held-out preference scores of the base, SFT and aligned models with their answers to the held-out prompts.

With `align.objective=none` the SFT adapter passes through: the aligned folder holds only a marker naming it, and
every later command uses the SFT adapter (`lineage.final_adapter`). Preference sources given without an
objective are still scored (base and SFT), to show where preference tuning would start."""

from __future__ import annotations

import contextlib
import gc
import tempfile
from pathlib import Path
from typing import Any

from ..config import Config
from ..lineage import ALIGNMENT_FILE, dvc_md5
from ..outputs import write_json, write_jsonl


def run_align(config: Config, aligned_dir: Path, metrics_path: Path, generations_path: Path) -> dict[str, Any]:
    """Align (or pass the SFT adapter through), score, and write the three outputs."""
    align = config.align
    sft = Path(config.paths.adapter)
    aligned_dir.mkdir(parents=True)
    if align.objective == "none" and not align.sources:  # the default: nothing to load, nothing to score
        return _pass_through(sft, aligned_dir, metrics_path, generations_path)
    return _with_preferences(config, sft, aligned_dir, metrics_path, generations_path)


def _pass_through(
    sft: Path,
    aligned_dir: Path,
    metrics_path: Path,
    generations_path: Path,
    scores: dict[str, Any] | None = None,
    generations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The SFT adapter is final: the marker naming it, and base and SFT's preference scores when there were any."""
    write_json(aligned_dir / ALIGNMENT_FILE, {"objective": "none", "final": str(sft), "sft_md5": dvc_md5(sft)})
    print(f"align: no preference objective (align.objective=none); the SFT adapter {sft} is final")
    metrics: dict[str, Any] = {"objective": "none", **(scores or {})}
    write_json(metrics_path, metrics)
    write_jsonl(generations_path, generations or [])
    return metrics


def _with_preferences(
    config: Config, sft: Path, aligned_dir: Path, metrics_path: Path, generations_path: Path
) -> dict[str, Any]:
    """Score base and SFT on the preference data (`align.objective=none`), or tune on it and score all three."""
    # Imported here, not at the top: torch, transformers, TRL and MLflow take about 6 s to import, which every
    # `dvc repro` of the default pipeline (no preference data) would otherwise pay for a pass-through.
    import mlflow
    from mlflow.tracking import MlflowClient

    from ..alignment import MODELS, align_model, score_models
    from ..config import config_to_dict
    from ..lineage import (
        PROVENANCE_FILE,
        aligned_card,
        code_digests,
        git_state,
        package_versions,
        pipeline_written_files,
        read_provenance,
    )
    from ..modeling import load_tokenizer, parameter_counts
    from ..preferences import read_preferences
    from ..tracking import (
        ALIGNED_RUN_TAG,
        BASELINE_TAG,
        EXP_NAME_TAG,
        SFT_RUN_TAG,
        STAGE_TAG,
        experiment_tags,
        log_flat_params,
        mlflow_run,
        open_store,
        run_name,
        run_record,
    )
    from ..training import save_adapter

    align = config.align
    data = read_preferences(align, config.data.on_invalid, config.data.split_seed)
    tokenizer = load_tokenizer(config.paths.base_model)
    if align.objective == "none":
        scores, generations = score_models(config, data, tokenizer, ("base", "sft"), aligned_dir)
        return _pass_through(sft, aligned_dir, metrics_path, generations_path, scores, generations)
    resolved = config_to_dict(config)
    sft_provenance = read_provenance(sft)
    inputs = _inputs(config, sft)
    git = git_state(written=pipeline_written_files(resolved))
    tags = experiment_tags()
    name = f"{run_name(config, tags[EXP_NAME_TAG])} · {align.objective} β {align.beta:g}"
    sft_run = sft_provenance["mlflow"]["run_id"]
    with mlflow_run(config.tracking, run_name=name, tags=tags | {STAGE_TAG: "align", SFT_RUN_TAG: sft_run}) as run:
        log_flat_params(resolved)
        mlflow.log_dict(resolved, "config/resolved.yaml")
        print(
            f"align ({align.objective}, loss {align.loss_type}, beta {align.beta:g}): {len(data.train)} training rows, "
            f"{len(data.test)} held out, from {sft}",
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="slmtune-align-") as scratch:
            model, steps, summary = align_model(config, tokenizer, data.train, scratch)
        for entry in steps:
            mlflow.log_metrics({f"align/{k}": v for k, v in entry.items() if k != "step"}, step=int(entry["step"]))
        counts = parameter_counts(model)
        save_adapter(model, tokenizer, aligned_dir)  # the SFT adapter's layout: peft files, or a model folder
        del model
        gc.collect()
        metrics, generations = score_models(config, data, tokenizer, MODELS, aligned_dir)
        metrics = {"objective": align.objective, "loss_type": align.loss_type, "beta": align.beta, **metrics}
        metrics["train"] = {k: round(v, 4) for k, v in summary.items()}
        metrics["align_run_id"] = run.info.run_id  # not mlflow_run_id: `dvc exp show` merges it with metrics.json's
        for model_name in MODELS:
            scores = metrics[model_name]
            mlflow.log_metrics({f"preference/{model_name}/{k}": v for k, v in scores.items()})
        provenance = {
            "git": git,
            "dvc": {
                "exp_name": tags[EXP_NAME_TAG],
                "baseline_rev": tags[BASELINE_TAG],
            },
            "inputs": inputs,
            "code": code_digests("align"),
            "config": resolved,
            "sft": {"path": str(sft), "md5": inputs["sft_adapter"]["md5"], "mlflow_run_id": sft_run},
            "packages": package_versions(),
            "mlflow": run_record(run),
            "parameters": counts,
            "metrics": {"train_loss": summary.get("train_loss", float("nan"))}
            | {f"heldout_{k}": v for k, v in metrics["aligned"].items()},
            "preference_data": data.stats,
        }
        write_json(aligned_dir / PROVENANCE_FILE, provenance)
        (aligned_dir / "README.md").write_text(aligned_card(provenance), encoding="utf-8")
        write_json(metrics_path, metrics)
        write_jsonl(generations_path, generations)
        mlflow.log_artifacts(str(aligned_dir), "adapter")
        mlflow.log_artifact(str(metrics_path), "reports")
        mlflow.log_artifact(str(generations_path), "reports")
    open_store(config.tracking)
    # the link both ways; an SFT run in another store (an adapter trained elsewhere) is named by the aligned run only
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        MlflowClient().set_tag(sft_run, ALIGNED_RUN_TAG, run.info.run_id)
    return metrics


def _inputs(config: Config, sft: Path) -> dict[str, dict[str, Any]]:
    """DVC md5 of what the aligned adapter is made from: the preference sources (a hub dataset: its pinned revision),
    the SFT adapter, the base."""
    digests = {
        f"source/{name}": {"path": s.path, "md5": None, "revision": s.revision}
        if s.format == "hub"
        else {"path": s.path, "md5": dvc_md5(s.path)}
        for name, s in config.align.sources.items()
    }
    digests["sft_adapter"] = {"path": str(sft), "md5": dvc_md5(sft)}
    digests["base_model"] = {"path": config.paths.base_model, "md5": dvc_md5(config.paths.base_model)}
    return digests
