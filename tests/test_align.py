"""Preference tuning: preference rows read and validated like every source, rendered exactly as SFT renders them,
TRL's trainers with the SFT adapter as the policy and its frozen copy (or the disabled adapter) as the reference,
known-value preference scores, and SFT then DPO / ORPO / KTO through `dvc repro` on the tiny model, with lineage
down to the SFT adapter and the preference data."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY_OVERRIDES, copy_project, run
from slmtune.config import AlignConfig, ConfigError, DataConfig, SourceConfig, compose_params, validate_config
from slmtune.data import read_records
from slmtune.errors import DataError
from slmtune.preferences import pairs_of, preference_scores, read_preferences, render, trl_rows
from slmtune.prompting import IGNORE_INDEX, build_example, generation_prompt

TAGGED = "<|user|>\nWhat is 2 + 2?\n<|assistant|>\n"


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def records_of(path: Path, kind: str = "preference", **columns: str):
    return read_records("prefs", SourceConfig(path=str(path), kind=kind, columns=columns), section="align")


def test_prompts_in_every_shape_become_the_same_turns(tmp_path):
    path = write_jsonl(
        tmp_path / "data/raw/p.jsonl",
        [
            {"prompt": "What is 2 + 2?", "chosen": "It is 4.", "rejected": "5"},
            {"prompt": TAGGED, "chosen": "<|assistant|> It is 4.", "rejected": "Go away."},
            {
                "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
                "chosen": [{"role": "assistant", "content": "It is 4."}],
                "rejected": [{"role": "assistant", "content": "22"}],
            },
            {"prompt": "Hi", "system": "Be kind.", "chosen": "Hello! How can I help?", "rejected": "What."},
        ],
    )
    records, problems, read = records_of(path)
    assert (problems, read) == ([], 4)
    assert [r["messages"] for r in records[:3]] == [[{"role": "user", "content": "What is 2 + 2?"}]] * 3
    assert [r["chosen"] for r in records[:3]] == ["It is 4."] * 3
    assert [r["rejected"] for r in records[:3]] == ["5", "Go away.", "22"]
    assert records[3]["messages"][0] == {"role": "system", "content": "Be kind."}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Q?", "chosen": "", "rejected": "No."}, r"p\.jsonl:1: column 'chosen' is empty"),
        ({"prompt": "Q?", "chosen": "Yes.", "rejected": 3}, r"p\.jsonl:1: column 'rejected' must be text, got int"),
        ({"prompt": "Q?", "chosen": "Yes.", "rejected": " yes "}, r"p\.jsonl:1: columns 'chosen' and 'rejected'"),
        ({"prompt": "Q?", "chosen": "Yes."}, r"p\.jsonl:1: column 'rejected' is missing"),
        ({"prompt": ["Q?"], "chosen": "Yes.", "rejected": "No."}, r"column 'prompt' turn 1 must be an object"),
        (
            {"prompt": [{"role": "assistant", "content": "Hi"}], "chosen": "Yes.", "rejected": "No."},
            r"column 'prompt' turn 1 is from assistant where user was expected",
        ),
        (
            {"prompt": "Q?", "chosen": [{"role": "user", "content": "x"}], "rejected": "No."},
            r"column 'chosen' turn 1 is from user; it must be the assistant's",
        ),
    ],
)
def test_a_bad_preference_row_is_named_by_file_line_and_column(tmp_path, row, message):
    path = write_jsonl(tmp_path / "data/raw/p.jsonl", [row, {"prompt": "Fine?", "chosen": "Yes.", "rejected": "No."}])
    records, problems, _ = records_of(path)
    assert len(records) == 1 and len(problems) == 1
    assert problems[0].message.count("\n") == 0
    assert re.search(message, problems[0].message), problems[0].message


def test_columns_map_and_a_missing_column_names_the_mapping(tmp_path):
    path = write_jsonl(tmp_path / "data/raw/p.jsonl", [{"question": "Q?", "good": "Yes, gladly.", "bad": "No."}])
    records, problems, _ = records_of(path, prompt="question", chosen="good", rejected="bad")
    assert problems == [] and records[0]["chosen"] == "Yes, gladly."
    source = SourceConfig(path=str(path), kind="preference", columns={"prompt": "question"})
    with pytest.raises(DataError, match=r"p\.jsonl: missing column\(s\) 'chosen', 'rejected' .*align\.sources\.prefs"):
        read_records("prefs", source, section="align")


def test_unpaired_rows_take_boolean_labels_in_the_usual_spellings(tmp_path):
    labels = [True, 0, "desirable", "no", "maybe"]
    path = write_jsonl(
        tmp_path / "data/raw/k.jsonl",
        [{"prompt": f"Q{i}?", "completion": f"Answer {i}.", "label": label} for i, label in enumerate(labels)],
    )
    records, problems, _ = records_of(path, kind="unpaired")
    assert [r["label"] for r in records] == [True, False, True, False]
    assert "k.jsonl:5: column 'label' must be true or false" in problems[0].message


def test_preference_data_must_go_to_align_sources_and_objectives_need_the_right_kind():
    prefs = {"path": "data/raw/polite_preferences.jsonl", "kind": "preference"}
    with pytest.raises(ConfigError, match=r"data\.sources\.p is kind preference; preference data goes in align"):
        validate_config({"data": {"sources": {"p": prefs}}}, "t")
    base = {"data": {"sources": {"kb": {"path": "data/raw/company_kb.csv"}}}}
    with pytest.raises(ConfigError, match=r"align\.objective=dpo needs align\.sources"):
        validate_config(base | {"align": {"objective": "dpo"}}, "t")
    unpaired = {"path": "data/raw/k.jsonl", "kind": "unpaired"}
    with pytest.raises(ConfigError, match=r"align\.objective=orpo needs pairs, but align\.sources\.k is kind unpaired"):
        validate_config(base | {"align": {"objective": "orpo", "sources": {"k": unpaired}}}, "t")
    with pytest.raises(ConfigError, match=r"align\.loss_type \(objective kto\) must be one of kto, apo_zero_unpaired"):
        validate_config(base | {"align": {"objective": "kto", "loss_type": "sigmoid", "sources": {"p": prefs}}}, "t")
    config = validate_config(base | {"align": {"objective": "dpo", "sources": {"p": prefs}}}, "t")
    assert config.align.loss_type == "sigmoid"  # the objective's default, resolved so that provenance records it


def test_held_out_prompts_never_train_and_the_split_is_seeded(tmp_path):
    rows = [
        {"prompt": f"Question {i // 2}?", "chosen": f"Polite answer {i}.", "rejected": f"No {i}."} for i in range(40)
    ]
    path = write_jsonl(tmp_path / "data/raw/p.jsonl", rows)
    align = AlignConfig(sources={"p": SourceConfig(path=str(path), kind="preference")}, test_fraction=0.25)
    first, second = read_preferences(align, "fail", 7), read_preferences(align, "fail", 7)
    held = {r["messages"][0]["content"] for r in first.test}
    assert len(held) == 5 and len(first.test) == 10 and len(first.train) == 30
    assert not held & {r["messages"][0]["content"] for r in first.train}
    assert [r["source"] for r in first.test] == [r["source"] for r in second.test]
    assert {r["source"] for r in read_preferences(align, "fail", 8).test} != {r["source"] for r in first.test}


def test_pairs_render_exactly_as_sft_and_trl_tokenizes_them_to_our_ids(tiny_model_dir, tmp_path):
    """The prompt TRL trains on is token for token the SFT / generation prompt; the answer ends with EOS once."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = DataConfig(system_prompt="You are polite.")
    record = {
        "source": "p:1",
        "messages": [{"role": "user", "content": "What is 2 + 2?"}],
        "chosen": "It is 4.",
        "rejected": "5",
    }
    rows = trl_rows([record], data, tokenizer, "dpo")
    assert rows[0]["chosen"].endswith(tokenizer.eos_token) and rows[0]["chosen"].count(tokenizer.eos_token) == 1
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", max_length=128, use_cpu=True)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = DPOTrainer(model, reference, args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    prepared = trainer.train_dataset[0]
    sft = build_example(
        {"source": "p:1", "messages": [*record["messages"], {"role": "assistant", "content": "It is 4."}]},
        data,
        tokenizer,
    )
    prompt_ids = generation_prompt(
        {"source": "p:1", "messages": [*record["messages"], {"role": "assistant", "content": "-"}]}, data, tokenizer, 0
    )[1]
    assert prepared["prompt_ids"] == prompt_ids
    trained = [t for t, label in zip(sft.input_ids, sft.labels) if label != IGNORE_INDEX]
    # SFT also trains the newline the chat template writes after <|im_end|>; the preference answer stops at EOS
    assert prepared["chosen_ids"] == trained[: trained.index(tokenizer.eos_token_id) + 1]
    assert sft.input_ids[: len(prompt_ids)] == prompt_ids
    assert render(record, "5", data, tokenizer)[0] == tokenizer.decode(prompt_ids)


def test_kto_rows_unpair_each_pair_and_held_out_unpaired_rows_pair_up():
    pair = {"source": "a", "messages": [{"role": "user", "content": "Q?"}], "chosen": "Yes.", "rejected": "No."}
    good = {"source": "b", "messages": [{"role": "user", "content": "R?"}], "completion": "Sure.", "label": True}
    bad = {"source": "c", "messages": [{"role": "user", "content": "R?"}], "completion": "Nope.", "label": False}
    alone = {"source": "d", "messages": [{"role": "user", "content": "S?"}], "completion": "Ok.", "label": True}
    paired = pairs_of([pair, good, bad, alone])
    assert [(p["chosen"], p["rejected"]) for p in paired] == [("Yes.", "No."), ("Sure.", "Nope.")]


def test_kto_rows_from_pairs(tiny_tokenizer):
    pair = {"source": "a", "messages": [{"role": "user", "content": "Q?"}], "chosen": "Yes.", "rejected": "No."}
    rows = trl_rows([pair], DataConfig(), tiny_tokenizer, "kto")
    assert [(r["completion"].startswith(a), r["label"]) for r, a in zip(rows, ("Yes.", "No."))] == [
        (True, True),
        (True, False),
    ]
    assert rows[0]["prompt"] == rows[1]["prompt"]


def test_preference_scores_on_known_values():
    # (summed log-prob, tokens) of three pairs, for the model and for the reference (the base)
    model = {"chosen": [(-4.0, 4), (-6.0, 3), (-3.0, 3)], "rejected": [(-3.0, 2), (-2.0, 2), (-1.0, 1)]}
    reference = {"chosen": [(-5.0, 4), (-6.0, 3), (-2.0, 3)], "rejected": [(-3.0, 2), (-1.0, 2), (-1.5, 1)]}
    scores = preference_scores(model, reference, beta=0.5)
    # margins 0.5 * ((c - c_ref) - (r - r_ref)): 0.5 * (1 - 0) = 0.5; 0.5 * (0 + 1) = 0.5; 0.5 * (-1 - 0.5) = -0.75
    assert scores["preference_accuracy"] == pytest.approx(2 / 3)
    assert scores["reward_margin"] == pytest.approx(0.25 / 3)
    # per token: -1.0 > -1.5 wins; -2.0 < -1.0 loses; -1.0 = -1.0 is no win (the sums alone would say 0 of 3)
    assert scores["likelihood_accuracy"] == pytest.approx(1 / 3)
    assert scores["chosen_logp"] == pytest.approx(-13 / 3) and scores["rejected_logp"] == -2.0
    itself = preference_scores(reference, reference, beta=0.5)  # the base against itself: every reward ties
    assert itself["preference_accuracy"] == 0.5 and itself["reward_margin"] == 0.0


def _lora_sft(tiny_model_dir: Path, adapter: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(adapter)


def _completion_logps(model, batch) -> torch.Tensor:
    """Summed log-probabilities of the completion tokens of a TRL DPO batch (chosen rows, then rejected)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(dim=1)


@pytest.mark.parametrize("sft_kind", ["lora", "full"])
def test_the_reference_is_the_model_with_its_adapter_disabled_not_a_second_copy(tiny_model_dir, tmp_path, sft_kind):
    """LoRA SFT: the SFT adapter trains on, and the reference TRL computes is the base (the adapter disabled); full
    SFT: a new adapter on the fully fine-tuned model, disabled for the reference (the SFT model). No second model."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmtune.alignment import policy_model, trainer_for

    adapter = tmp_path / "adapter"
    if sft_kind == "lora":
        _lora_sft(tiny_model_dir, adapter)
    else:
        shutil.copytree(tiny_model_dir, adapter)
        model = AutoModelForCausalLM.from_pretrained(adapter)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))  # a "fully fine-tuned" model unlike the base
        model.save_pretrained(adapter)
    settings = [f"method={sft_kind}", "align=dpo", f"paths.adapter={adapter}", f"paths.base_model={tiny_model_dir}"]
    settings.append("train.precision=fp32")  # exact log-probabilities to compare
    config = compose_params(Path(__file__).resolve().parent.parent, tmp_path / "params.yaml", settings)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model, peft_config = policy_model(config)
    assert (peft_config is None) == (sft_kind == "lora")
    pair = {"source": "a", "messages": [{"role": "user", "content": "Q?"}], "chosen": "Yes, gladly.", "rejected": "No."}
    rows = trl_rows([pair] * 4, config.data, tokenizer, "dpo")
    trainer = trainer_for(config, model, tokenizer, rows, peft_config, str(tmp_path / "out"))
    assert trainer.ref_model is None and set(trainer.model.peft_config) == {"default"}
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    if sft_kind == "lora":  # the SFT adapter's weights are what trains
        sft = load_file(adapter / "adapter_model.safetensors")
        state = trainer.model.state_dict()
        assert all(torch.equal(state[k.replace(".weight", ".default.weight")], v) for k, v in sft.items())
    batch = next(iter(trainer.get_train_dataloader()))
    reference = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir if sft_kind == "lora" else adapter)
    assert torch.allclose(reference, _completion_logps(expected, batch), atol=1e-4)
    policy = _completion_logps(trainer.model, batch)  # the SFT adapter, or a new adapter that starts at zero
    assert torch.allclose(reference, policy, atol=1e-4) == (sft_kind == "full")


# -- through `dvc repro` on the tiny model --------------------------------------------------------------------------

ALIGN_FAST = ["align.max_steps=3", "align.batch_size=4", "align.max_new_tokens=8", "align.learning_rate=1e-2"]


def _compose(project: Path, *overrides: str) -> None:
    """params.yaml of `project` recomposed with the tiny model and `overrides`."""
    source = yaml.safe_load((project / "params.yaml").read_text())["model"]["source"]
    settings = [f"model.source={source}", "model.gguf_file=null", *TINY_OVERRIDES, *overrides]
    compose_params(project, project / "params.yaml", settings)


def _repro(project: Path) -> str:
    return run(["dvc", "repro"], project).stdout


@pytest.mark.pipeline
def test_sft_then_dpo_orpo_kto_through_dvc_repro(tiny_trained, tmp_path):
    """The default project, trained by SFT, then DPO: only align, evaluate and report rerun; every later stage uses
    the aligned adapter; lineage reaches the SFT adapter and the preference data. ORPO and KTO train the same way;
    objective none passes the SFT adapter through again."""
    import mlflow
    from mlflow.tracking import MlflowClient

    project = copy_project(tiny_trained.project, tmp_path)
    sft_before = (project / "models/adapter/adapter_model.safetensors").read_bytes()
    _compose(project, "align=dpo", *ALIGN_FAST)
    out = _repro(project)
    for stage in ("align", "evaluate", "report"):
        assert f"Running stage '{stage}'" in out
    assert "Running stage 'train'" not in out
    assert (project / "models/adapter/adapter_model.safetensors").read_bytes() == sft_before
    aligned = project / "models/aligned"
    provenance = json.loads((aligned / "provenance.json").read_text())
    sft_weights = load_file(project / "models/adapter/adapter_model.safetensors")
    aligned_weights = load_file(aligned / "adapter_model.safetensors")
    assert sft_weights.keys() == aligned_weights.keys()
    assert max((aligned_weights[k] - sft_weights[k]).abs().max().item() for k in sft_weights) > 1e-4
    scores = json.loads((project / "reports/preference_metrics.json").read_text())
    assert scores["objective"] == "dpo" and scores["heldout_pairs"] == 19
    assert {"base", "sft", "aligned"} <= scores.keys() and "reward_margin" in scores["aligned"]
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["mlflow_run_id"] == provenance["mlflow"]["run_id"]  # evaluate scored (and logged to) the aligned run
    report = (project / "reports/before_after.md").read_text()
    generations = [json.loads(line) for line in (project / "reports/preference_generations.jsonl").open()]
    assert "## Preference tuning" in report and "SFT, then DPO through TRL" in report
    assert len(generations) == 19 and all(row["aligned"] is not None for row in generations)
    assert f"aligned:\n\n> {generations[0]['aligned'].splitlines()[0]}" in report or generations[0]["aligned"] == ""

    merged = run(["slmtune", "merge", "--output", "models/merged"], project)  # later commands take the final adapter
    assert json.loads((project / "models/merged/parity.json").read_text())["adapter"] == "models/aligned", merged.stdout

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = MlflowClient()
    sft_run = provenance["sft"]["mlflow_run_id"]
    assert client.get_run(provenance["mlflow"]["run_id"]).data.tags["slmtune.sft_run_id"] == sft_run
    assert client.get_run(sft_run).data.tags["slmtune.aligned_run_id"] == provenance["mlflow"]["run_id"]

    lineage = run(["slmtune", "lineage", "models/aligned"], project)
    sft_md5 = provenance["inputs"]["sft_adapter"]["md5"]
    assert f"MATCH      input sft_adapter: {sft_md5}" in lineage.stdout and "lineage: MATCH" in lineage.stdout
    prefs = project / "data/raw/polite_preferences.jsonl"
    original = prefs.read_bytes()
    prefs.write_bytes(original.replace(b"polite", b"Polite", 1))
    changed = run(["slmtune", "lineage", "models/aligned"], project, check=False)
    assert changed.returncode == 1 and "MISMATCH   input source/polite_preferences" in changed.stdout
    prefs.write_bytes(original)

    for objective in ("orpo", "kto"):
        _compose(project, f"align={objective}", *ALIGN_FAST)
        out = _repro(project)
        assert "Running stage 'align'" in out and "Running stage 'train'" not in out
        scores = json.loads((project / "reports/preference_metrics.json").read_text())
        assert scores["objective"] == objective and scores["train"]["train_loss"] > 0
        assert (
            json.loads((project / "models/aligned/provenance.json").read_text())["config"]["align"]["objective"]
            == objective
        )

    _compose(project)
    _repro(project)
    assert sorted(p.name for p in aligned.iterdir()) == ["alignment.json"]
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert client.get_run(metrics["mlflow_run_id"]).data.tags["slmtune.adapter_run_id"] == sft_run  # the SFT adapter
    assert "## Preference tuning" not in (project / "reports/before_after.md").read_text()


def test_the_default_pass_through_imports_no_model_library(tmp_path):
    """Without preference data the align stage only names the SFT adapter: it must not pay for importing torch,
    transformers, TRL or MLflow (about 6 s in every `dvc repro` of the default pipeline)."""
    sft = tmp_path / "adapter"
    sft.mkdir()
    (sft / "adapter_model.safetensors").write_bytes(b"weights")
    script = f"""
import json, sys
from pathlib import Path
from slmtune.config import Config
from slmtune.pipeline.align import run_align

config = Config()
config.paths.adapter = {str(sft)!r}
out = Path({str(tmp_path)!r})
run_align(config, out / "aligned", out / "metrics.json", out / "generations.jsonl")
print(json.dumps(sorted(m for m in ("torch", "transformers", "trl", "peft", "mlflow") if m in sys.modules)))
"""
    result = run([sys.executable, "-c", script], tmp_path)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    marker = json.loads((tmp_path / "aligned/alignment.json").read_text())
    assert marker["objective"] == "none" and marker["final"] == str(sft)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"objective": "none"}
    assert (tmp_path / "generations.jsonl").read_text() == ""
