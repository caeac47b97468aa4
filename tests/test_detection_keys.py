"""Each detect step's cache key holds exactly the config sections it reads: changing a key reruns the steps that
read it and those after them (their keys hold the key of the step before), and no other."""

from typing import Any

import pytest
from pydantic import BaseModel

from pipeline.core.config import DetectConfig, DetectModelConfig
from pipeline.stages.detect import evaluate_key, predict_key, train_key, views_key

# what each section's keys feed (folds and fusion are recomputed on every run; data is keyed by content)
READERS = {"data": set(), "model": {"train"}, "train": {"train"}, "augment": {"train"}, "anchors": {"train"},
           "decode": {"evaluate", "predict", "views"}, "evaluate": {"evaluate", "views"}, "predict": {"predict"},
           "folds": set(), "views": {"views"}, "fusion": set(),
           "classifier": set()}  # the second stage keys its own runs (test_detection_crops)
EXCEPT = {("evaluate", "tta"): {"evaluate"}}  # the single model's TTA; the fold models' views are the views section
# the steps whose keys hold a step's key (predict holds the TTA evaluate chose, not its key)
AFTER = {"train": {"train", "evaluate", "predict", "views"}, "evaluate": {"evaluate"}, "predict": {"predict"},
         "views": {"views"}}


def _keys(cfg: DetectConfig) -> dict[str, str]:
    model = train_key(cfg, "data", cfg.train.seed, {})
    return {"train": model, "evaluate": evaluate_key(cfg, model), "predict": predict_key(cfg, model, "none", "test"),
            "views": views_key(cfg, model, "test")}


def _other(field: str, value: Any, section: BaseModel) -> Any:
    """Another valid value of the key."""
    annotation = type(section).model_fields[field].annotation
    if field == "name":
        return "ssdlite" if isinstance(section, DetectModelConfig) else "other"
    if isinstance(value, bool):
        return not value
    if isinstance(value, BaseModel):
        return value.model_copy(update={"epochs": value.epochs + 1})
    if value is None:
        return 0.4 if "float" in str(annotation) else 2 if "int" in str(annotation) else "x.csv"
    if isinstance(value, int):
        return value * 2 if value else 1
    if isinstance(value, float):
        return value / 2 if value else 0.1
    if isinstance(value, str):
        return {"fixed": "auto", "auto": "none", "cosine": "constant", "ssd": "course"}.get(value, value + "x")
    if isinstance(value, list):
        return value[:1] if len(value) > 1 else [*value, 0.5]
    raise AssertionError(f"no other value for {field}={value!r}")


# model.pretrained_path: keyed by the file's bytes, not its path (test_detection_models)
CASES = [(section, field) for section, sf in DetectConfig.model_fields.items() for field in sf.annotation.model_fields
         if (section, field) != ("model", "pretrained_path")]


@pytest.mark.parametrize(("section", "field"), CASES, ids=[f"{s}.{f}" for s, f in CASES])
def test_a_key_reruns_the_steps_that_read_it_and_those_after_them(section: str, field: str):
    base = DetectConfig(model={"name": "fcos"})  # an FPN detector: it reads every model key
    part = getattr(base, section)
    changed = base.model_copy(update={section: part.model_copy(update={field: _other(field, getattr(part, field),
                                                                                   part)})})
    assert getattr(getattr(changed, section), field) != getattr(part, field)
    before, after = _keys(base), _keys(changed)
    readers = EXCEPT.get((section, field), READERS[section])
    expected = set().union(*(AFTER[step] for step in readers)) if readers else set()
    assert {step for step in before if before[step] != after[step]} == expected
