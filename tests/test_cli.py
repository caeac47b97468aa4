"""The command line: one real subprocess run (exit status and stderr as a shell sees them), the rest in-process."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from pipeline.cli import main

from .conftest import REPO


def test_bad_input_is_one_line_on_stderr_and_exit_2_in_a_real_process(comp_dir: Path, tmp_path: Path):
    (comp_dir / "test.csv").write_text("image\n../../etc/passwd\n")
    res = subprocess.run([sys.executable, "-m", "pipeline", "clean", "--data", str(comp_dir), "--work",
                          str(tmp_path / "w")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and "test.csv line 2" in res.stderr


def _main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_config_typo_is_one_line_with_a_suggestion(comp_dir: Path, tmp_path: Path, capsys):
    code, _, err = _main(capsys, "folds", "--data", str(comp_dir), "--work", str(tmp_path / "w"), "train.epoch=3")
    assert code == 2 and err.strip().count("\n") == 0 and "did you mean 'train.epochs'" in err


def test_unknown_backbone_is_one_line(comp_dir: Path, tmp_path: Path, capsys):
    code, _, err = _main(capsys, "train", "--data", str(comp_dir), "--work", str(tmp_path / "w"),
                         "model.backbones=[resnet81]", "folds.n_splits=2")
    assert code == 2 and err.strip().count("\n") == 0 and "unknown timm model 'resnet81'" in err


def test_config_command_prints_resolved_values(capsys):
    code, out, _ = _main(capsys, "config")
    defaults = yaml.safe_load(out)
    overrides = {("train", "epochs"): 7, ("train", "lr"): 0.0123, ("folds", "n_splits"): 3,
                 ("model", "backbones"): ["d2l_lenet"]}
    assert code == 0 and all(defaults[a][b] != v for (a, b), v in overrides.items())  # so the overrides show
    code, out, _ = _main(capsys, "config", "train.epochs=7", "train.lr=0.0123", "folds.n_splits=3",
                         "model.backbones=[d2l_lenet]")
    resolved = yaml.safe_load(out)
    assert code == 0 and {k: resolved[k[0]][k[1]] for k in overrides} == overrides
    assert resolved["train"]["batch_size"] == defaults["train"]["batch_size"]  # the rest stays at the defaults


def test_validate_submission_command(comp_dir: Path, tmp_path: Path, capsys):
    sample = pd.read_csv(comp_dir / "sample_submission.csv")
    sample.to_csv(tmp_path / "ok.csv", index=False)
    assert _main(capsys, "validate-submission", str(tmp_path / "ok.csv"), "--data", str(comp_dir))[0] == 0
    sample.iloc[1:].to_csv(tmp_path / "bad.csv", index=False)
    code, _, err = _main(capsys, "validate-submission", str(tmp_path / "bad.csv"), "--data", str(comp_dir))
    assert code == 2 and "ids differ" in err
