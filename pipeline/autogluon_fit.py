"""AutoGluon baseline, one MultiModalPredictor per fold. Runs inside .venv-autogluon.

Standalone on purpose: AutoGluon pins versions the pipeline cannot use, so this script imports
only the standard library, pandas and AutoGluon, reads a job file written by pipeline/autogluon.py
and writes plain CSV probabilities that the pipeline turns into its OOF/test files.

    .venv-autogluon/bin/python pipeline/autogluon_fit.py JOB.json
"""

import json
import sys
import time
from pathlib import Path

import pandas as pd


def fit_fold(job: dict, frame: pd.DataFrame, test: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    from autogluon.multimodal import MultiModalPredictor

    train, held = frame[frame["fold"] != fold], frame[frame["fold"] == fold]
    predictor = MultiModalPredictor(label="label", problem_type="multiclass", eval_metric="accuracy",
                                    path=str(Path(job["out"]) / f"fold{fold}"), presets=job["presets"], verbosity=job["verbosity"])
    predictor.fit(train[["image", "label"]], hyperparameters=job["hyperparameters"], time_limit=job["time_limit"], seed=job["seed"])
    held_proba = predictor.predict_proba(held[["image"]], as_pandas=True)
    test_proba = predictor.predict_proba(test[["image"]], as_pandas=True)
    return held_proba.assign(id=held["id"].to_numpy(), fold=fold), test_proba


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    frame = pd.read_csv(job["folds_csv"], dtype={"id": str, "label": str}, keep_default_na=False)
    frame = frame.rename(columns={"path": "image"})
    test = pd.DataFrame({"id": job["test_ids"], "image": job["test_paths"]})
    oof, tests = [], []
    for fold in job["folds"]:
        start = time.time()
        held, test_proba = fit_fold(job, frame, test, fold)
        oof.append(held)
        tests.append(test_proba.reindex(columns=job["classes"], fill_value=0.0))
        print(f"autogluon: fold {fold} fitted and predicted in {time.time() - start:.0f} s", flush=True)
    out = Path(job["out"])
    pd.concat(oof).to_csv(out / "oof_raw.csv", index=False)
    mean = sum(t.to_numpy() for t in tests) / len(tests)
    pd.DataFrame(mean, columns=job["classes"]).assign(id=job["test_ids"]).to_csv(out / "test_raw.csv", index=False)


if __name__ == "__main__":
    main(sys.argv[1])
