import subprocess
import sys
from pathlib import Path

from .conftest import REPO


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_bad_input_is_one_line_and_exit_2(comp_dir: Path, tmp_path: Path):
    (comp_dir / "test.csv").write_text("image\n../../etc/passwd\n")
    res = _run("clean", "--data", str(comp_dir), "--work", str(tmp_path / "w"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and "test.csv line 2" in res.stderr


def test_config_typo_is_one_line_with_a_suggestion(comp_dir: Path, tmp_path: Path):
    res = _run("folds", "--data", str(comp_dir), "--work", str(tmp_path / "w"), "train.epoch=3")
    assert res.returncode == 2 and "did you mean 'train.epochs'" in res.stderr and "Traceback" not in res.stderr


def test_unknown_backbone_is_one_line(comp_dir: Path, tmp_path: Path):
    res = _run("train", "--data", str(comp_dir), "--work", str(tmp_path / "w"), "model.backbones=[resnet81]",
               "folds.n_splits=2")
    assert res.returncode == 2 and "unknown timm model 'resnet81'" in res.stderr and "Traceback" not in res.stderr


def test_config_command_prints_resolved_values():
    res = _run("config", "train.epochs=3")
    assert res.returncode == 0 and "epochs: 3" in res.stdout


def test_validate_submission_command(comp_dir: Path, tmp_path: Path):
    import pandas as pd

    sample = pd.read_csv(comp_dir / "sample_submission.csv")
    sample.to_csv(tmp_path / "ok.csv", index=False)
    assert _run("validate-submission", str(tmp_path / "ok.csv"), "--data", str(comp_dir)).returncode == 0
    sample.iloc[1:].to_csv(tmp_path / "bad.csv", index=False)
    res = _run("validate-submission", str(tmp_path / "bad.csv"), "--data", str(comp_dir))
    assert res.returncode == 2 and "ids differ" in res.stderr
