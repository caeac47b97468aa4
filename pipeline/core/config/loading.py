"""Reading a config: YAML files, dotted overrides, the merge over the defaults, and every validation error
turned into one line naming the key (with a did-you-mean); also its YAML forms and hash."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.core.config.keys import is_section, known_keys, sectioned_detect_key, suggestion
from pipeline.core.config.specs import Config, ExperimentSpec, SpecError
from pipeline.core.errors import PipelineError


class _Loader(yaml.SafeLoader):
    """The safe loader, reading 1e-3 as a number as YAML 1.2 does (PyYAML's YAML 1.1 wants 1.0e-3, and the
    strict config no longer turns the text '1e-3' into a float)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def did_you_mean(key: str) -> str:
    return suggestion(key, Config)


def _one_line(err: ValidationError, source: str) -> PipelineError:
    first = err.errors()[0]
    if isinstance(first.get("ctx", {}).get("error"), SpecError):
        return PipelineError(f"{source}: {first['ctx']['error']}")
    loc = list(first["loc"])
    if loc[:2] == ["model", "backbones"] and len(loc) > 3 and loc[3] in ("spec", "name"):  # inside an entry
        entry = f"model.backbones[{loc[2]}]"
        if first["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[4]), list(ExperimentSpec.model_fields), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return PipelineError(f"{source}: {entry}: unknown experiment key '{loc[4]}'{hint}")
        where = ".".join(str(p) for p in loc[4:])
        if first["type"] == "missing":
            return PipelineError(f"{source}: {entry}: the experiment key '{where}' is missing")
        return PipelineError(f"{source}: {entry}{' ' + where if where else ''}: {first['msg']} "
                             f"(got {first.get('input')!r})")
    literals = _union_literals(err.errors())
    if literals is not None:  # `auto` or a number: the number's complaint, then the words it also takes
        first = next(e for e in err.errors() if not str(e["loc"][-1]).startswith("literal["))
        key = ".".join(str(p) for p in first["loc"][:-1])
        return PipelineError(f"{source}: config key '{key}': {first['msg']} (got {first.get('input')!r}), "
                             f"or {literals}")
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return PipelineError(f"{source}: unknown config key '{key}'{did_you_mean(key)}")
    if first["type"] == "model_type" and sectioned_detect_key(key):  # detect.model=fcos: a section named as a key
        return PipelineError(f"{source}: config key '{key}' is a section, not a value "
                             f"(did you mean '{sectioned_detect_key(key)}'?)")
    return PipelineError(f"{source}: config key '{key}': {first['msg']} (got {first.get('input')!r})")


def _union_literals(errors: list[dict]) -> str | None:
    """The words a `Literal[...] | int` key takes ("'auto'"), when every error is one branch of that key's union
    (pydantic names each branch in the last place of the location); None otherwise."""
    if len(errors) < 2 or len({tuple(e["loc"][:-1]) for e in errors}) != 1:
        return None
    literal = [e for e in errors if str(e["loc"][-1]).startswith("literal[")]
    if not literal or len(literal) == len(errors):
        return None
    return " or ".join(str(e["loc"][-1])[len("literal["):-1] for e in literal)


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PipelineError(f"{source}: '{dotted}' goes inside a value that is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ["train.epochs=3", "model.backbones=[a,b]"] into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PipelineError(f"override '{item}': expected KEY=VALUE, e.g. train.epochs=3")
        if key not in known_keys(Config):
            raise PipelineError(f"override '{item}': unknown config key '{key}'{did_you_mean(key)}")
        _set_dotted(tree, key, _override_value(item, key, raw), f"override '{item}'")
    return tree


# Characters YAML reads as syntax. A value made only of them (`,` `|` `#` `-`, separators people pass) either fails
# to parse or silently reads as something else (`|` and `>` as '', `#` as nothing, `-` as a list), so it must be quoted.
_YAML_PUNCTUATION = set(",[]{}#&*!|>'\"%@`:-?")


def _override_value(item: str, key: str, raw: str) -> Any:
    """The override's value parsed as YAML; a value YAML cannot read, or reads as other than the text written when
    that text is only YAML punctuation, is a one-line error saying how to quote it."""
    if raw == "":
        return None
    quoted = "'" + raw.replace("'", "''") + "'"
    hint = (f"if it is text, quote it: \"{key}={quoted}\" (the double quotes keep a shell from removing the single "
            "ones)")
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError:
        raise PipelineError(f"override '{item}': value is not valid YAML; {hint}") from None
    text = raw.strip()
    written_as_yaml = text in ("[]", "{}") or (len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"")
    if set(text) <= _YAML_PUNCTUATION and value != text and not written_as_yaml:
        raise PipelineError(f"override '{item}': YAML reads {raw!r} as {value!r}, not as the text written; {hint}")
    return value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _not_text(path: Path, exc: yaml.reader.ReaderError) -> PipelineError:
    """PyYAML reads UTF-8 and, with a byte-order mark, UTF-16; anything else names its line and the fix."""
    line = path.read_bytes()[:exc.position].count(b"\n") + 1
    what = f"byte 0x{exc.character:02x}" if isinstance(exc.character, int) else f"character {exc.character!r}"
    return PipelineError(f"{path} line {line}: not UTF-8 text ({what}); save the file as UTF-8")


def read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise PipelineError(f"config file {path} is a folder; pass a YAML file, e.g. CONFIG=configs/<name>.yaml")
    if not path.is_file():
        raise PipelineError(f"config file {path} not found; pass an existing CONFIG=configs/<name>.yaml")
    try:
        tree = yaml.load(path.read_bytes(), Loader=_Loader) or {}  # a SafeLoader; bytes: encoding from the BOM
    except yaml.reader.ReaderError as exc:
        raise _not_text(path, exc) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PipelineError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(tree, dict):
        raise PipelineError(f"{path}: expected a mapping of config sections at the top level")
    return tree


def load_config(path: Path | None = None, overrides: list[str] | None = None, tuned: Path | None = None) -> Config:
    """Defaults, then the experiment YAML, then tuned parameters (if given), then dotted overrides."""
    tree: dict = read_yaml(Path(path)) if path else {}
    source = str(path) if path else "config"
    try:
        Config.model_validate(tree)
    except ValidationError as err:
        raise _one_line(err, source) from None
    if tuned is not None:
        extra = read_yaml(Path(tuned))
        try:
            Config.model_validate(extra)
        except ValidationError as err:
            raise _one_line(err, str(tuned)) from None
        tree = _merge(tree, extra)
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise _one_line(err, "overrides") from None


def config_hash(*sections: BaseModel) -> str:
    """Short stable hash of config sections: artifacts record it and later stages compare it."""
    blob = json.dumps([s.model_dump(mode="json") for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def defaults_yaml() -> str:
    """configs/default.yaml: every key with its default and its one-line explanation."""
    lines = ["# Every config key with its default. Generated by `python -m pipeline config --defaults`;",
             "# experiment configs hold only their differences from these values.", ""]
    for section_name, section_field in Config.model_fields.items():
        lines.append(f"{section_name}:")
        lines += _key_lines(section_field.annotation, "  ")
        lines.append("")
    return "\n".join(lines)


def _key_lines(section: type[BaseModel], indent: str) -> list[str]:
    """One line per key of `section` (value and description), a sub-section's keys indented under its name."""
    lines = []
    for name, field in section.model_fields.items():
        if is_section(field.annotation):
            lines.append(f"{indent}{name}:  # {field.description}")
            lines += _key_lines(field.annotation, indent + "  ")
            continue
        default = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in field.default] \
            if isinstance(field.default, list) else field.default  # a list of entries (segment.models) as mappings
        value = yaml.safe_dump(default, default_flow_style=True, sort_keys=False, width=1000
                               ).strip().removesuffix("...").strip()
        lines.append(f"{indent}{name}: {value}  # {field.description}")
    return lines


