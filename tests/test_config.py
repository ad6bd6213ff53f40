"""Configuration: conf/ composes into params.yaml, the schema rejects what it does not know, and `slmtune params`."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import SLMTUNE
from slmtune.config import Config, ConfigError, compose_params, config_to_dict, flatten, load_config, validate_config

REPO = Path(__file__).resolve().parent.parent


GROUPS = ("model", "data", "method", "train", "align", "eval")


def test_params_yaml_is_the_composition_of_conf(tmp_path):
    compose_params(REPO, tmp_path / "params.yaml")
    fresh = (tmp_path / "params.yaml").read_text()
    assert (REPO / "params.yaml").read_text() == fresh, "params.yaml is stale: run `slmtune params`"


def holds(composed, own) -> bool:
    """Every value of `own` (nested) is in `composed`; `composed` may add schema defaults."""
    if isinstance(own, dict):
        return isinstance(composed, dict) and all(k in composed and holds(composed[k], v) for k, v in own.items())
    return composed == own


@pytest.mark.parametrize(
    "group,option",
    [(g, f.stem) for g in GROUPS for f in sorted((REPO / "conf" / g).glob("*.yaml"))],
)
def test_every_shipped_option_composes_and_validates(tmp_path, group, option):
    # classification needs labelled data and labelled data a classifier: such options go in pairs
    partner = {("model", "distilbert"): ["data=sentiment"], ("data", "sentiment"): ["model.task=classification"]}
    config = compose_params(REPO, tmp_path / "params.yaml", [f"{group}={option}", *partner.get((group, option), [])])
    composed = config_to_dict(config)[group]
    own = yaml.safe_load((REPO / "conf" / group / f"{option}.yaml").read_text())
    own.pop("defaults", None)
    if group == "train" and own["learning_rate"] is None:  # null: the method's rate, resolved on loading
        own["learning_rate"] = config.method.learning_rate
    assert holds(composed, own), (group, option)  # what the option file says is what the config holds


def test_the_learning_rate_is_the_methods_unless_set(tmp_path):
    rate = lambda *overrides: compose_params(REPO, tmp_path / "params.yaml", list(overrides)).train.learning_rate  # noqa: E731
    assert rate("method=lora") == rate("method=qlora") == 1e-3
    assert rate() == rate("method=full") == 1e-4  # the default preset is full fine-tuning
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["train"]["learning_rate"] is None
    assert rate("method=full", "train.learning_rate=3e-5") == 3e-5


def test_every_conf_file_is_covered_by_a_group():
    files = {p.relative_to(REPO / "conf").parts[0] for p in (REPO / "conf").rglob("*.yaml")}
    assert files == {*GROUPS, "config.yaml"}


def test_unknown_key_is_rejected_naming_it():
    with pytest.raises(ConfigError, match=r"train\.lerning_rate"):
        validate_config({"train": {"lerning_rate": 0.1}}, "params.yaml")


def test_wrong_type_is_rejected_naming_the_key():
    with pytest.raises(ConfigError, match=r"method\.r"):
        validate_config({"method": {"r": "sixteen"}}, "params.yaml")


def test_unknown_override_fails_composition(tmp_path):
    with pytest.raises(ConfigError, match="lerning_rate"):
        compose_params(REPO, tmp_path / "params.yaml", ["train.lerning_rate=1e-4"])
    assert not (tmp_path / "params.yaml").exists(), "a failed composition must not leave a params file"


def test_a_schema_setting_the_preset_leaves_out_is_refused_with_the_override_that_works(tmp_path):
    """Hydra refuses `key=value` for a key conf/'s YAML does not set: for a setting the schema knows (a source's
    weight), the one-line error gives the `+key=value` that works; for a key that does not exist, it says so."""
    known = "data.sources.company_kb.weight"
    with pytest.raises(ConfigError) as refused:
        compose_params(REPO, tmp_path / "params.yaml", [f"{known}=0.5"])
    assert str(refused.value).count("\n") == 0 and f"override it as +{known}=0.5" in str(refused.value)
    config = compose_params(REPO, tmp_path / "params.yaml", [f"+{known}=0.5"])
    assert config.data.sources["company_kb"].weight == 0.5
    with pytest.raises(ConfigError, match=r"train\.lerning_rate is not a setting") as unknown:
        compose_params(REPO, tmp_path / "other.yaml", ["train.lerning_rate=1e-4"])
    assert "+" not in str(unknown.value)


def test_override_reaches_params(tmp_path):
    config = compose_params(REPO, tmp_path / "params.yaml", ["train.learning_rate=3e-4", "method.r=4"])
    assert config.train.learning_rate == 3e-4 and config.method.r == 4
    assert load_config(tmp_path / "params.yaml").method.r == 4


def test_bad_split_fractions_are_rejected():
    with pytest.raises(ConfigError, match="val_fraction"):
        validate_config({"data": {"val_fraction": 0.5, "test_fraction": 0.5}}, "params.yaml")


def test_missing_params_file_says_how_to_make_it(tmp_path):
    with pytest.raises(ConfigError, match="slmtune params"):
        load_config(tmp_path / "params.yaml")


def _keys(tree, prefix=""):
    for key, value in tree.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _keys(value, f"{prefix}{key}.")


def test_dvc_stage_params_exist_in_params_yaml():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    known = set(_keys(OmegaConf.to_container(OmegaConf.load(REPO / "params.yaml"))))
    used = [p for stage in stages.values() for p in stage.get("params", [])]
    assert used and not [p for p in used if p not in known]


def test_hydra_composition_is_enabled_for_dvc_experiments():
    text = (REPO / ".dvc" / "config").read_text()
    assert "[hydra]" in text and "enabled = true" in text


def with_source(**source):
    return {"data": {"sources": {"kb": {"path": "data/raw/kb.csv", **source}}}}


@pytest.mark.parametrize(
    "source,message",
    [
        ({"path": "elsewhere/kb.csv"}, r"data\.sources\.kb\.path 'elsewhere/kb\.csv' is outside data/raw/"),
        ({"path": "data/raw/../kb.csv"}, r"is outside data/raw/"),
        (
            {"kind": "table"},
            r"data\.sources\.kb\.kind must be one of instruction, chat, text, label, preference, unpaired, not 'table'",
        ),
        ({"format": "xlsx"}, r"data\.sources\.kb\.format must be one of"),
        ({"split": "dev"}, r"data\.sources\.kb\.split must be one of train, val, test"),
        ({"weight": 0}, r"data\.sources\.kb\.weight must be above 0"),
        (
            {"columns": {"question": "q"}},
            r"data\.sources\.kb\.columns: unknown field\(s\) question for kind instruction",
        ),
        ({"kind": "text", "columns": {"output": "o"}}, r"unknown field\(s\) output for kind text; use text, category"),
        ({"colums": {}}, r"data\.sources\.kb\.colums"),
    ],
)
def test_bad_source_config_is_rejected_naming_the_key(source, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(with_source(**source), "params.yaml")


def test_hub_sources_need_no_local_path():
    config = validate_config(with_source(path="owner/name", format="hub", kind="text"), "params.yaml")
    assert config.data.sources["kb"].format == "hub"


def test_custom_template_needs_a_jinja_template():
    with pytest.raises(ConfigError, match=r"data\.template=custom needs data\.chat_template"):
        validate_config({**with_source(), "data": {**with_source()["data"], "template": "custom"}}, "params.yaml")


def test_sources_cannot_be_empty():
    with pytest.raises(ConfigError, match=r"data\.sources is empty"):
        validate_config({}, "params.yaml")


def test_preset_replaces_the_sources_of_the_default(tmp_path):
    config = compose_params(REPO, tmp_path / "params.yaml", ["data=support_chat"])
    assert list(config.data.sources) == ["support_chat"] and config.data.max_length == 384
    assert config.data.on_invalid == "fail", "shared data settings come from config.yaml"


def test_conf_defaults_equal_the_schema_defaults(tmp_path):
    """conf/ and the dataclasses state every default twice: they must agree (data sources excepted, which
    the schema leaves empty)."""
    # the method dataclass holds the LoRA preset's values (every method preset starts from them); which preset is
    # the default is conf/config.yaml's choice (full fine-tuning)
    compose_params(REPO, tmp_path / "params.yaml", ["method=lora"])
    composed = yaml.safe_load((tmp_path / "params.yaml").read_text())
    schema = config_to_dict(Config())
    composed["data"].pop("sources")
    schema["data"].pop("sources")
    differing = {
        key: (value, flatten(schema).get(key, "<not in the schema>"))
        for key, value in flatten(composed).items()
        if flatten(schema).get(key, object()) != value
    }
    assert not differing, f"conf/ value vs dataclass default: {differing}"


def compose_and_read(tmp_path) -> str:
    compose_params(REPO, tmp_path / "params.yaml")
    return (tmp_path / "params.yaml").read_text()


def test_params_check_command_passes_when_current_and_fails_when_stale(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(REPO / "conf", project / "conf")
    shutil.copy2(REPO / "params.yaml", project / "params.yaml")
    current = subprocess.run([*SLMTUNE, "params", "--check", "--root", str(project)], capture_output=True, text=True)
    assert current.returncode == 0 and "up to date" in current.stdout
    (project / "conf/train/default.yaml").write_text(
        (project / "conf/train/default.yaml").read_text().replace("seed: 42", "seed: 43")
    )
    stale = subprocess.run([*SLMTUNE, "params", "--check", "--root", str(project)], capture_output=True, text=True)
    assert stale.returncode == 1 and stale.stderr.startswith("error: ") and "is stale" in stale.stderr
    assert stale.stderr.count("\n") == 1 and "Traceback" not in stale.stderr
