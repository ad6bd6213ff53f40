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

import mlflow
from mlflow.tracking import MlflowClient

from ..alignment import align_model
from ..config import Config, config_to_dict
from ..inference import generate_answers
from ..lineage import (
    ALIGNMENT_FILE,
    PROVENANCE_FILE,
    aligned_card,
    code_digests,
    dvc_md5,
    git_state,
    package_versions,
    pipeline_written_files,
    read_provenance,
)
from ..modeling import load_model, load_tokenizer, load_tuned, parameter_counts
from ..outputs import write_json, write_jsonl
from ..preferences import (
    PreferenceData,
    conversation,
    pair_logps,
    pairs_of,
    preference_scores,
    prompt_key,
    read_preferences,
)
from ..prompting import generation_prompt
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

MODELS = ("base", "sft", "aligned")


def run_align(config: Config, aligned_dir: Path, metrics_path: Path, generations_path: Path) -> dict[str, Any]:
    """Align (or pass the SFT adapter through), score, and write the three outputs."""
    align = config.align
    sft = Path(config.paths.adapter)
    data = read_preferences(align, config.data.on_invalid, config.data.split_seed) if align.sources else None
    tokenizer = load_tokenizer(config.paths.base_model)
    aligned_dir.mkdir(parents=True)
    if align.objective == "none":
        write_json(aligned_dir / ALIGNMENT_FILE, {"objective": "none", "final": str(sft), "sft_md5": dvc_md5(sft)})
        print(f"align: no preference objective (align.objective=none); the SFT adapter {sft} is final")
        metrics: dict[str, Any] = {"objective": "none"}
        generations: list[dict[str, Any]] = []
        if data is not None:
            metrics, generations = score_models(config, data, tokenizer, ("base", "sft"), aligned_dir)
            metrics = {"objective": "none", **metrics}
        write_json(metrics_path, metrics)
        write_jsonl(generations_path, generations)
        return metrics
    assert data is not None  # AlignConfig.check requires sources with an objective
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


def score_models(
    config: Config, data: PreferenceData, tokenizer: Any, models: tuple[str, ...], aligned_dir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Held-out preference scores of each model (the base's log-likelihoods are the reward's reference) and every
    model's answer to each held-out prompt."""
    pairs = pairs_of(data.test)
    prompts = list({prompt_key(r): r for r in data.test}.values())
    ids = [generation_prompt(conversation(r, "-"), config.data, tokenizer, 0)[1] for r in prompts]
    metrics: dict[str, Any] = {
        "train_rows": len(data.train),
        "heldout_rows": len(data.test),
        "heldout_pairs": len(pairs),
        "heldout_prompts": len(prompts),
        "dropped": data.stats["dropped"],
    }
    answers: dict[str, list[str]] = {}
    reference = None
    for name in models:
        model = _load(config, name, aligned_dir)
        logps = pair_logps(model, tokenizer, pairs, config.data) if pairs else None
        if logps is not None:
            reference = reference or logps  # the base comes first: the reference of every reward
            metrics[name] = preference_scores(logps, reference, config.align.beta)
        answers[name] = generate_answers(model, tokenizer, ids, config.align.max_new_tokens, 8, desc=f"{name} model")
        del model
        gc.collect()
    generations = [
        {
            "source": r["source"],
            "prompt": r["messages"][-1]["content"],
            "chosen": r.get("chosen", r.get("completion") if r.get("label") else None),
            "rejected": r.get("rejected", r.get("completion") if not r.get("label", True) else None),
        }
        | {name: answers[name][i] for name in models}
        for i, r in enumerate(prompts)
    ]
    return metrics, generations


def _load(config: Config, name: str, aligned_dir: Path) -> Any:
    if name == "base":
        model = load_model(config.paths.base_model, config.model.dtype)
        model.eval()
        return model
    return load_tuned(config, Path(config.paths.adapter) if name == "sft" else aligned_dir)[0]
