"""The offline inference bundle: spec, weights, the standalone predict.py and a Kaggle notebook, in one folder.

`make bundle` turns the ensemble's chosen submission into submissions/<competition>-bundle/:

    spec.json        classes, task, each member's folds (weights, input size, channels, normalisation, head),
                     the TTA views kept, the blend's fitted parameters, the thresholds, the submission's columns
    weights/         every fold model the submission uses, as safetensors (onnx/ too with export.bundle_onnx)
    predict.py       bundle_predict.py copied verbatim: torch, timm, numpy, pandas and Pillow only
    classic.py       training/classic.py copied verbatim, when a member is one of the d2l nets (pure torch)
    <name>.ipynb     a Kaggle notebook that runs predict.py on /kaggle/input/...

The blend parameters come from refitting the chosen row's blend on the same OOF predictions (blends are
deterministic), because weights.json rounds its weights for reading; the stage then checks that these parameters,
run through predict.py's own `blend`, give WORK/ensemble/test.parquet back. A LightGBM stack is refused: its
booster would need lightgbm in the bundle, which a plain Kaggle image lacks, and the logistic stack or the fitted
weights are usually within noise of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import write_json, write_text
from pipeline.core.errors import PipelineError
from pipeline.export import bundle_predict
from pipeline.scoring.blend import STACK_FLOOR, Blend, LightGBMStack, LogisticStack, SingleModel, WeightedAverage
from pipeline.training import classic

TEMPLATE = Path(bundle_predict.__file__)
CLASSIC_SOURCE = Path(classic.__file__)


def blend_spec(blend: Blend, names: list[str], row: str) -> dict:
    """The fitted blend as the numbers predict.py's `blend` needs (exact, not rounded)."""
    if isinstance(blend, LightGBMStack):
        raise PipelineError("bundle: the chosen blend lightgbm_stack cannot be bundled (its booster needs lightgbm, "
                            "which a Kaggle image may lack); set ensemble.method=stack or ensemble.method=weights and "
                            "run `make ensemble bundle` again")
    if isinstance(blend, LogisticStack):
        model = blend.model_
        return {"name": row, "how": "stack", "models": names, "floor": STACK_FLOOR,
                "coef": model.coef_.tolist(), "intercept": model.intercept_.tolist(),
                "classes": model.classes_.astype(int).tolist()}
    if isinstance(blend, WeightedAverage):
        how = "single" if isinstance(blend, SingleModel) else blend.how
        return {"name": row, "how": how, "models": names,
                "weights": np.asarray(blend.weights_, dtype=np.float64).tolist()}
    raise PipelineError(f"bundle: blend {type(blend).__name__} has no bundle form; choose ensemble.method=weights")


def used_models(spec: dict) -> list[int]:
    """Indices of the models the blend reads: a stack reads all; a weighted blend those with a weight above 0."""
    if spec["how"] == "stack":
        return list(range(len(spec["models"])))
    return [i for i, w in enumerate(spec["weights"]) if w > 0]


def restrict(spec: dict, keep: list[int]) -> dict:
    """The blend spec over the kept models only (a model of weight 0 adds nothing to any weighted blend)."""
    if spec["how"] == "stack":
        return spec
    return {**spec, "models": [spec["models"][i] for i in keep], "weights": [spec["weights"][i] for i in keep]}


def check_blend(spec: dict, T: np.ndarray, expected: np.ndarray, source: Path, tol: float = 1e-9) -> float:
    """Max abs difference between predict.py's blend of the test predictions T and the ensemble's own test
    predictions; above `tol` the bundle would not reproduce the submission, so it is refused."""
    got = bundle_predict.blend(T, spec)
    diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    if not np.isfinite(diff) or diff > tol:
        raise PipelineError(f"{source}: the refitted {spec['name']} blend differs from it by {diff:.2e}; the OOF "
                            "files changed since `make ensemble`: run `make ensemble bundle` again")
    return diff


def versions() -> dict[str, str]:
    """The versions of the packages predict.py uses, as they were when the bundle was made (it warns on others:
    a timm release may rename a model's parameters)."""
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "timm", "numpy", "pandas", "pillow")}


def notebook(bundle_name: str, competition: str, needs: str = "torch, timm, numpy, pandas and Pillow",
             onnx: bool = False) -> dict:
    """A Kaggle notebook (nbformat 4) running the bundle, attached as a dataset, on the competition's test images;
    `onnx`: the bundle carries ONNX graphs too, and the notebook says how to run them (onnxruntime is optional, so
    it is not among the needs)."""
    source = [
        "# Offline inference: the pipeline's submission, from its bundle (no internet needed)\n",
        "import subprocess, sys\n",
        f"BUNDLE = '/kaggle/input/{bundle_name}'  # the bundle folder, uploaded as a Kaggle dataset\n",
        f"DATA = '/kaggle/input/{competition}'  # the competition's data: test.csv and the test images\n",
        "subprocess.run([sys.executable, f'{BUNDLE}/predict.py', '--data', DATA, '--out', "
        "'/kaggle/working/submission.csv', '--batch-size', '64'], check=True)\n",
    ]
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": [
            f"Runs `predict.py` of `{bundle_name}` (made by `make bundle`) on the hidden test images and writes "
            f"`submission.csv`. It needs {needs}, which Kaggle images have."
            + (" The bundle also carries ONNX graphs: add `'--engine', 'onnx'` to the command to run them on "
               "onnxruntime instead of torch (not on every Kaggle image: attach its wheel as a dataset and "
               "`pip install` it offline)." if onnx else "")]},
        {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source},
    ]
    return {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                                        "name": "python3"},
                                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def write_bundle(out_dir: Path, spec: dict, files: dict[str, Path], onnx_writer=None) -> Path:
    """Write the bundle into a fresh folder beside `out_dir`, then swap it in: a killed run leaves the previous
    bundle whole (or none), never a mix. `files` maps a path inside the bundle to the file copied there;
    `onnx_writer(folder)` writes the ONNX files when the bundle carries them."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for rel, src in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        if onnx_writer is not None:
            onnx_writer(tmp)
        shutil.copyfile(TEMPLATE, tmp / "predict.py")
        if any(m["backbone"].startswith("d2l_") for m in spec.get("members", [])):
            shutil.copyfile(CLASSIC_SOURCE, tmp / "classic.py")
        write_json(tmp / "spec.json", spec)
        name = out_dir.name
        needs = ", ".join(spec["requires"]) if "requires" in spec else "torch, timm, numpy, pandas and Pillow"
        book = notebook(name, spec["competition"], needs, onnx=onnx_writer is not None)
        write_text(tmp / f"{name}.ipynb", json.dumps(book, indent=1) + "\n")
        os.chmod(tmp, 0o755)
        old = out_dir.with_name(f".{out_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
