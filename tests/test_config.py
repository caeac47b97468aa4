from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.core.config import Config, config_hash, defaults_yaml, load_config, parse_overrides
from pipeline.core.errors import PipelineError

from .conftest import REPO


def _sections(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, type[BaseModel]]:
    """Every section by its dotted name (detect.train), sections inside sections included."""
    out = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out[prefix + name] = field.annotation
            out |= _sections(field.annotation, f"{prefix}{name}.")
    return out


def test_defaults_have_a_description_for_every_key():
    for dotted, section in _sections().items():
        for name, field in section.model_fields.items():
            assert field.description, f"{dotted}.{name} has no one-line explanation"


def test_default_yaml_is_in_sync_with_the_models():
    assert (REPO / "configs" / "default.yaml").read_text() == defaults_yaml(), (
        "run: python -m pipeline config --defaults > configs/default.yaml")


def test_default_yaml_loads_to_the_defaults():
    assert load_config(REPO / "configs" / "default.yaml") == Config()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    load_config(REPO / "configs" / name)


def test_experiment_yaml_merges_over_defaults(tmp_path: Path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epochs: 3\n")
    cfg = load_config(path)
    assert cfg.train.epochs == 3 and cfg.train.lr == Config().train.lr


def test_unknown_yaml_key_names_the_key_and_suggests(tmp_path: Path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(PipelineError, match=r"unknown config key 'train.epoch' \(did you mean 'train.epochs'\?\)"):
        load_config(path)


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.epochs=3", "model.backbones=[resnet18,efficientnet_b0]", "train.folds=null"])
    assert cfg.train.epochs == 3 and cfg.model.backbones == ["resnet18", "efficientnet_b0"] and cfg.train.folds is None


def test_unknown_override_suggests_the_right_key():
    with pytest.raises(PipelineError, match=r"did you mean 'folds.n_splits'"):
        parse_overrides(["folds.nsplits=3"])


def test_override_of_the_wrong_type_is_one_line():
    with pytest.raises(PipelineError) as err:
        load_config(None, ["train.epochs=many"])
    assert "train.epochs" in str(err.value) and "\n" not in str(err.value)


def test_override_without_equals_sign():
    with pytest.raises(PipelineError, match="expected KEY=VALUE"):
        parse_overrides(["train.epochs"])


def test_invalid_yaml_names_file_and_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1\n")
    with pytest.raises(PipelineError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(PipelineError, match="not found"):
        load_config(Path("configs/nope.yaml"))


def test_config_hash_changes_with_values():
    a, b = Config(), load_config(None, ["train.lr=0.1"])
    assert config_hash(a.train) != config_hash(b.train)
    assert config_hash(a.folds) == config_hash(b.folds)


def test_config_reference_lists_every_key():
    """docs/config.md's table has a row per section of keys (detect: one per sub-section) naming every key."""
    rows = {}
    table = (REPO / "docs" / "config.md").read_text().split("## Sections and keys", 1)[1].split("\n\n", 2)[1]
    for line in table.splitlines():
        if line.startswith("| `"):
            section, keys = line.split("|")[1:3]
            rows[section.strip(" `")] = keys
    for dotted, section in _sections().items():
        keys = [k for k, f in section.model_fields.items() if dotted + "." + k not in _sections()]
        missing = [k for k in keys if f"`{k}`" not in rows.get(dotted, "")]
        assert not missing, f"docs/config.md config reference, section {dotted}: add {missing}"


@pytest.mark.parametrize(("override", "suggestion"), [
    ("detect.epochs=3", "detect.train.epochs"), ("detect.tta_scales=[1.0]", "detect.views.scales"),
    ("detect.fusion_iou=[0.5]", "detect.fusion.iou"), ("detect.map_score_threshold=0.1",
                                                       "detect.evaluate.map_score_threshold")])
def test_a_detect_key_without_its_section_suggests_the_sectioned_key(override, suggestion):
    key = override.split("=")[0]
    with pytest.raises(PipelineError) as err:
        load_config(None, [override])
    assert str(err.value) == f"override '{override}': unknown config key '{key}' (did you mean '{suggestion}'?)"


@pytest.mark.parametrize(("override", "suggestion"), [
    ("detect.folds=1", "detect.folds.n_splits"), ("detect.model=fcos", "detect.model.name"),
    ("detect.anchors=auto", "detect.anchors.mode")])
def test_a_detect_section_given_a_value_suggests_its_key(override, suggestion):
    with pytest.raises(PipelineError) as err:
        load_config(None, [override])
    assert str(err.value) == (f"overrides: config key '{override.split('=')[0]}' is a section, not a value "
                              f"(did you mean '{suggestion}'?)")


def test_a_flat_detect_key_in_a_yaml_file_suggests_the_sectioned_key(tmp_path: Path):
    path = tmp_path / "exp.yaml"
    path.write_text("detect:\n  epochs: 3\n")
    with pytest.raises(PipelineError, match=r"exp.yaml: unknown config key 'detect.epochs' \(did you mean "
                                            r"'detect.train.epochs'\?\)"):
        load_config(path)
