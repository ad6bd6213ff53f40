"""Ship a fine-tuned model: load it (a folder or an MLflow run), merge the adapter into the base with a
parity check, and export GGUF files (F16, Q8_0) for llama.cpp and Ollama with a round-trip check."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import gguf
import mlflow
import numpy as np
import torch
from gguf import GGUFReader
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .config import Config
from .errors import ExportError, UserError
from .evaluation import PARITY_TOLERANCE, test_loss, test_loss_and_answers, test_prompts
from .lineage import PROVENANCE_FILE, read_provenance
from .modeling import is_adapter, load_model, load_tokenizer, load_tuned, resolve_source
from .outputs import staged_outputs, write_json
from .tracking import ADAPTER_RUN_TAG, PARENT_TAG, STAGE_TAG, mlflow_run, resolve_adapter, training_run

PARITY_FILE = "parity.json"
EXPORT_FILE = "export.json"
GGUF_TYPES = ("f16", "q8_0")
GGUF_TOLERANCE = {"f16": 0.01, "q8_0": 0.02}
"""Largest relative test-loss difference of a GGUF file (loaded back by transformers) from the merged model."""
GGUF_WEIGHT_TOLERANCE = {"f16": 1e-3, "q8_0": 2e-2}
"""Largest relative error ||loaded - merged|| / ||merged|| of any tensor of a GGUF file loaded back by transformers:
f16 rounding gives ~3e-4, Q8_0 ~5e-3; a misplaced row or head (a wrong q/k permutation) gives ~1."""
GGUF_ARCHITECTURES = ("llama",)
"""Model types the GGUF writer maps (Llama, Llama 3.2 without rope scaling, TinyLlama, SmolLM2)."""


def merge_adapter(config: Config, adapter_spec: str | None, output: str | Path) -> dict[str, Any]:
    """Merge the adapter into the base and save a standalone model (safetensors + tokenizer) at `output`;
    reload the saved folder with plain transformers and compare its test loss and greedy answers with
    base + adapter. The parity result is saved beside the model, printed, logged to MLflow and returned;
    a failed parity leaves nothing at `output`."""
    adapter = resolve_adapter(config, adapter_spec)
    if not is_adapter(adapter):
        raise ExportError(
            f"{adapter} holds a fully fine-tuned model already (method.adapter=none): nothing to merge; "
            f"export it directly with `slmtune export --model {adapter}`."
        )
    model, tokenizer = load_tuned(config, adapter)
    adapter_loss, adapter_answers = test_loss_and_answers(model, tokenizer, config)
    merged = model.merge_and_unload()
    with staged_outputs(output) as (staged,):
        merged.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        reloaded = AutoModelForCausalLM.from_pretrained(staged, dtype=merged.dtype)
        merged_loss, merged_answers = test_loss_and_answers(reloaded, tokenizer, config)
        same = sum(a == b for a, b in zip(adapter_answers, merged_answers))
        result = {
            "adapter": str(adapter),
            "output": str(output),
            "adapter_loss": adapter_loss,
            "merged_loss": merged_loss,
            "loss_difference": abs(merged_loss - adapter_loss),
            "tolerance": PARITY_TOLERANCE,
            "identical_answers": same,
            "answers": len(adapter_answers),
        }
        result["ok"] = result["loss_difference"] <= PARITY_TOLERANCE and same == len(adapter_answers)
        print_parity(result)
        log_to_mlflow(
            config,
            adapter,
            "merge",
            {f"merge/{k}": float(v) for k, v in result.items() if isinstance(v, (int, float, bool))},
            {"adapter": str(adapter), "output": str(output), "model.dtype": config.model.dtype},
            result,
        )
        if not result["ok"]:
            raise ExportError(
                f"merge parity failed (loss difference {result['loss_difference']:.2e}, {same} of "
                f"{len(adapter_answers)} answers identical): nothing written to {output}."
            )
        write_json(staged / PARITY_FILE, result)
        if (adapter / PROVENANCE_FILE).is_file():  # the merged model keeps the adapter's lineage
            shutil.copy2(adapter / PROVENANCE_FILE, staged / PROVENANCE_FILE)
    return result


def print_parity(result: dict[str, Any]) -> None:
    print(
        f"test loss  base + adapter {result['adapter_loss']:.6f}  merged (reloaded) {result['merged_loss']:.6f}  "
        f"difference {result['loss_difference']:.2e} (tolerance {result['tolerance']:.0e})"
    )
    print(f"greedy answers identical: {result['identical_answers']} of {result['answers']}")
    print(f"merge parity: {'PASS' if result['ok'] else 'FAIL'}", flush=True)


def log_to_mlflow(
    config: Config, adapter: Path, stage: str, metrics: dict[str, float], params: dict[str, Any], result: Any
) -> None:
    """An MLflow run of this command, nested under the adapter's training run when that run is in this store
    (else tagged with its id), with the command's params, figures and result file."""
    try:
        run_id = read_provenance(adapter)["mlflow"]["run_id"]
    except (FileNotFoundError, KeyError):
        run_id = "unknown"
    tags = {ADAPTER_RUN_TAG: run_id, STAGE_TAG: stage}
    parent = training_run(config.tracking, run_id)
    if parent is not None:
        tags[PARENT_TAG] = run_id
    name = f"{stage} of {parent.info.run_name}" if parent is not None else stage
    with mlflow_run(config.tracking, run_name=name, tags=tags) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_dict(result, f"{stage}/{stage}.json")
        print(f"logged to MLflow run {run.info.run_id}" + (f", under training run {run_id}" if parent else ""))


# --- GGUF ---------------------------------------------------------------------------------------------


def _permute(weights: Any, n_head: int) -> Any:
    """llama.cpp's rotary layout for q/k projections (transformers' GGUF loader undoes it)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _tokenizer_pre(config: Config) -> str:
    """The llama.cpp pre-tokenizer name: the source GGUF's where the base came from one, else 'default'."""
    if config.model.gguf_file:
        try:
            source = resolve_source(config.model)
            if not source.is_local:
                return "default"
            field = GGUFReader(Path(source.location) / source.gguf_file).fields.get("tokenizer.ggml.pre")
            if field is not None:
                return field.contents()
        except (OSError, ValueError, AttributeError, UserError):
            pass
    return "default"


def add_vocab(writer: Any, model_dir: Path, vocab_size: int) -> None:
    """GPT-2-style BPE vocabulary, token types, merges, special ids and chat template from tokenizer files."""
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer_json["model"]
    if model["type"] != "BPE" or model.get("byte_fallback"):
        raise ExportError(
            f"{model_dir}/tokenizer.json: GGUF export supports byte-level BPE tokenizers (GPT-2 style) only."
        )
    by_id = {index: text for text, index in model["vocab"].items()}
    kinds = {}
    for token in tokenizer_json.get("added_tokens", []):
        by_id[token["id"]] = token["content"]
        kinds[token["id"]] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
    tokens, types = [], []
    for index in range(vocab_size):
        if index in by_id:
            tokens.append(by_id[index])
            types.append(kinds.get(index, gguf.TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if "bos" not in special.add_special_token:  # as the tokenizer behaves: does encoding start with BOS?
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = tokenizer("a")["input_ids"]
        writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    special.add_to_gguf(writer)


def write_gguf(model_dir: Path, path: Path, file_type: str, name: str, pre: str = "default") -> None:
    """Write the safetensors model in `model_dir` as one GGUF file: F16 (1-D tensors F32) or Q8_0 (2-D
    tensors whose rows divide into 32-value blocks; others F16)."""
    hf = AutoConfig.from_pretrained(model_dir)
    if hf.model_type not in GGUF_ARCHITECTURES:
        raise ExportError(
            f"{model_dir}: GGUF export supports model types {', '.join(GGUF_ARCHITECTURES)}, not {hf.model_type}; "
            "use llama.cpp's convert_hf_to_gguf.py on the merged folder."
        )
    rope = getattr(hf, "rope_parameters", None) or {
        "rope_type": "default",
        "rope_theta": getattr(hf, "rope_theta", 10000.0),
    }
    if rope.get("rope_type", "default") != "default":
        raise ExportError(
            f"{model_dir}: rope scaling '{rope['rope_type']}' is not written by this exporter; "
            "use llama.cpp's convert_hf_to_gguf.py on the merged folder."
        )
    heads, kv_heads = hf.num_attention_heads, hf.num_key_value_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    quant = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(hf.max_position_embeddings)
    writer.add_embedding_length(hf.hidden_size)
    writer.add_block_count(hf.num_hidden_layers)
    writer.add_feed_forward_length(hf.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(hf.rms_norm_eps)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_vocab_size(hf.vocab_size)
    writer.add_file_type(quant)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_pre(pre)
    add_vocab(writer, model_dir, hf.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hf.num_hidden_layers)
    files = sorted(model_dir.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                if key == "lm_head.weight" and hf.tie_word_embeddings:
                    continue
                target = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise ExportError(f"{file}: tensor {key} has no GGUF name for {hf.model_type}.")
                data = handle.get_tensor(key).to(torch.float32).numpy()
                if key.endswith("q_proj.weight"):
                    data = _permute(data, heads)
                elif key.endswith("k_proj.weight"):
                    data = _permute(data, kv_heads)
                if data.ndim == 1:
                    writer.add_tensor(target, data.astype(np.float32))
                elif file_type == "q8_0" and data.shape[-1] % 32 == 0:
                    packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                    writer.add_tensor(target, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                else:
                    writer.add_tensor(target, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def round_trip(
    config: Config, model: Any, gguf_dir: Path, file_name: str, tokenizer: Any, reference_loss: float
) -> dict[str, Any]:
    """Load a GGUF file back with transformers' GGUF loader; compare its test loss with the merged model's
    and its tokenizer's ids on the test prompts with the original tokenizer's."""
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=file_name, dtype=model.dtype)

    loss = test_loss(loaded, tokenizer, config)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=file_name)
    prompts = test_prompts(config, tokenizer)[1]
    same_ids = all(
        gguf_tokenizer(p, add_special_tokens=False)["input_ids"] == tokenizer(p, add_special_tokens=False)["input_ids"]
        for p in prompts
    )
    relative = abs(loss - reference_loss) / reference_loss
    kind = file_name.rsplit("-", 1)[-1].removesuffix(".gguf")
    weight_error, worst = weights_relative_error(loaded, model)
    return {
        "file": file_name,
        "bytes": (gguf_dir / file_name).stat().st_size,
        "test_loss": loss,
        "merged_test_loss": reference_loss,
        "relative_difference": relative,
        "tolerance": GGUF_TOLERANCE[kind],
        "weights_relative_error": weight_error,
        "worst_tensor": worst,
        "weights_tolerance": GGUF_WEIGHT_TOLERANCE[kind],
        "tokenizer_identical": same_ids,
        "ok": relative <= GGUF_TOLERANCE[kind] and weight_error <= GGUF_WEIGHT_TOLERANCE[kind] and same_ids,
    }


@torch.no_grad()
def weights_relative_error(loaded: Any, reference: Any) -> tuple[float, str]:
    """The largest ||loaded - reference|| / ||reference|| over the reference's tensors, and that tensor's name.
    The test loss alone cannot see a wrong layout on a small or untrained model, whose loss barely depends on
    its attention; the dequantised weights can."""
    theirs = loaded.state_dict()
    worst, name = 0.0, ""
    for key, tensor in reference.state_dict().items():
        if key not in theirs:
            return math.inf, key
        ours = tensor.float()
        error = float((theirs[key].float() - ours).norm() / ours.norm().clamp_min(1e-12))
        if error > worst:
            worst, name = error, key
    return worst, name


def export_gguf(config: Config, model_spec: str | None, output: str | Path, types: list[str]) -> list[dict[str, Any]]:
    """GGUF files of the merged model (or a fully fine-tuned one) in `output`, each loaded back and checked."""
    unknown = sorted(set(types) - set(GGUF_TYPES))
    if unknown:
        raise ExportError(f"--type {unknown[0]}: use one of {', '.join(GGUF_TYPES)}.")
    model_dir = Path(model_spec or config.paths.merged)
    if not (model_dir / "config.json").is_file():
        raise ExportError(
            f"{model_dir}: no merged model there. Run `slmtune merge` first (or pass --model <model folder>)."
        )
    model = load_model(model_dir, "float32")
    tokenizer = load_tokenizer(model_dir)
    reference = test_loss(model, tokenizer, config)
    name = f"{Path(config.model.source).name}-{config.method.name}"
    pre = _tokenizer_pre(config)
    results = []
    with staged_outputs(output) as (staged,):
        staged.mkdir()
        for kind in types:
            file_name = f"model-{kind}.gguf"
            write_gguf(model_dir, staged / file_name, kind, name, pre)
            result = round_trip(config, model, staged, file_name, tokenizer, reference)
            print(
                f"{file_name}: {result['bytes'] / 2**20:.1f} MiB, test loss {result['test_loss']:.6f} vs merged "
                f"{reference:.6f} ({100 * result['relative_difference']:.3f}%, tolerance "
                f"{100 * result['tolerance']:.0f}%), weights within {result['weights_relative_error']:.1e} "
                f"(tolerance {result['weights_tolerance']:.0e}, worst {result['worst_tensor']}), "
                f"tokenizer {'identical' if result['tokenizer_identical'] else 'DIFFERENT'}: "
                f"{'PASS' if result['ok'] else 'FAIL'}",
                flush=True,
            )
            results.append(result)
        log_to_mlflow(
            config,
            model_dir,
            "export",
            {
                f"gguf/{r['file'].removesuffix('.gguf')}/{k}": float(v)
                for r in results
                for k, v in r.items()
                if isinstance(v, (int, float, bool))
            },
            {"model": str(model_dir), "output": str(output), "types": ",".join(types)},
            {"model": str(model_dir), "files": results},
        )
        failed = [r["file"] for r in results if not r["ok"]]
        if failed:
            raise ExportError(f"GGUF round trip failed for {', '.join(failed)}: nothing written to {output}.")
        write_json(staged / EXPORT_FILE, {"model": str(model_dir), "files": results})
    return results
