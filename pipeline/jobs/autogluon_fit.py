"""AutoGluon baseline, one MultiModalPredictor per fold. Runs inside .venv-autogluon.

Standalone on purpose: AutoGluon pins versions the pipeline cannot use, so this script imports
only the standard library, pandas and AutoGluon, reads a job file written by pipeline/training/autogluon.py
and writes plain CSV probabilities that the pipeline turns into its OOF/test files.

Each fold is fitted in OUT/fold<k>.partial and renamed to OUT/fold<k> once its held-out and test
probabilities are written there, with the job's fold key. A rerun reuses every fold<k> whose key
matches and fits the others afresh (AutoGluon refuses to fit into an existing folder, and an
interrupted fit cannot be resumed), so a killed run continues where it stopped.

    .venv-autogluon/bin/python pipeline/jobs/autogluon_fit.py JOB.json
"""

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    """Write beside the target, then rename: a killed run never leaves a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def finished(folder: Path, key: str) -> bool:
    """A fold folder holds the probabilities of a finished fit of this job."""
    stamp = folder / "key.txt"
    return (stamp.is_file() and stamp.read_text() == key and (folder / "held.csv").is_file()
            and (folder / "test.csv").is_file())


def fit_fold(job: dict, frame: pd.DataFrame, test: pd.DataFrame, fold: int) -> Path:
    """Fit on the other folds in a fresh folder, predict the held-out fold and the test set, publish the folder."""
    from autogluon.multimodal import MultiModalPredictor

    final = Path(job["out"]) / f"fold{fold}"
    partial = final.with_name(f"fold{fold}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted fit: AutoGluon cannot resume it
    train, held = frame[frame["fold"] != fold], frame[frame["fold"] == fold]
    regression = job["problem_type"] == "regression"  # regression and ordinal: the number in column y
    if regression:
        train = train.assign(label=train["y"].astype(float))
    predictor = MultiModalPredictor(label="label", problem_type=job["problem_type"], eval_metric=job["eval_metric"],
                                    validation_metric=job["validation_metric"], path=str(partial / "predictor"),
                                    presets=job["presets"], verbosity=job["verbosity"])
    predictor.fit(train[["image", "label"]], hyperparameters=job["hyperparameters"], time_limit=job["time_limit"],
                  seed=job["seed"])
    def predict(rows: pd.DataFrame) -> pd.DataFrame:
        if regression:
            return pd.DataFrame({"pred": predictor.predict(rows[["image"]], as_pandas=False)})
        return predictor.predict_proba(rows[["image"]], as_pandas=True)

    write_csv(partial / "held.csv", predict(held).assign(id=held["id"].to_numpy(), fold=fold))
    write_csv(partial / "test.csv", predict(test))
    (partial / "key.txt").write_text(job["fold_key"])
    shutil.rmtree(final, ignore_errors=True)  # a stale fold of another job, or an older layout
    partial.rename(final)
    return final


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    frame = pd.read_csv(job["folds_csv"], dtype={"id": str, "label": str}, keep_default_na=False)
    frame = frame.rename(columns={"path": "image"})
    test = pd.DataFrame({"id": job["test_ids"], "image": job["test_paths"]})
    oof, tests = [], []
    for fold in job["folds"]:
        folder = Path(job["out"]) / f"fold{fold}"
        if finished(folder, job["fold_key"]):
            print(f"autogluon: fold {fold} was fitted by an earlier run; reusing {folder}", flush=True)
        else:
            start = time.time()
            fit_fold(job, frame, test, fold)
            print(f"autogluon: fold {fold} fitted and predicted in {time.time() - start:.0f} s", flush=True)
        oof.append(pd.read_csv(folder / "held.csv", dtype={"id": str}))
        names = job.get("columns", job["classes"])  # class columns, or ["pred"] for numbers
        tests.append(pd.read_csv(folder / "test.csv").reindex(columns=names, fill_value=0.0))
    out = Path(job["out"])
    write_csv(out / "oof_raw.csv", pd.concat(oof))
    mean = sum(t.to_numpy() for t in tests) / len(tests)
    write_csv(out / "test_raw.csv", pd.DataFrame(mean, columns=names).assign(id=job["test_ids"]))


if __name__ == "__main__":
    main(sys.argv[1])
