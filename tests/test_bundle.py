"""The offline bundle (make bundle) and ONNX export (make export), run as a user would run them.

predict.py runs in an interpreter that cannot import the pipeline: a venv made with --without-pip whose one .pth
line names a folder of links to the project venv's packages, less the pipeline (its editable install stays
inactive) and the libraries a Kaggle image need not have (scikit-learn, scipy, ...). It runs with `python -I` (no
PYTHONPATH, no user site, no script folder on sys.path), from another folder, without network (`unshare -rn`) where
the sandbox allows it. A fresh torch install per test run would be 5 GB; these are the same packages a clean install
gets, and the missing ones show that predict.py needs no others.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import orchestrate
from pipeline.context import Context
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError

from .conftest import tiny, write_competition
from .task_data import make_task_folder

SITE = Path(torch.__file__).resolve().parents[1]  # the project venv's site-packages
BLOCKED = ("pipeline", "sklearn", "scipy", "lightgbm", "cv2", "albumentations", "mlflow", "optuna", "onnxruntime")
# two members of different kinds (a d2l net from classic.py, a timm net), every kind of TTA view kept
CHAIN = ("model.backbones=[d2l_lenet,resnet10t]", "predict.tta=[identity,hflip,scale1.25,random0]",
         "predict.tta_policy=all", "train.epochs=2", "rounds.plan=[]")


def _isolated_python(root: Path, allow: tuple[str, ...] = (), block: tuple[str, ...] = ()) -> Path:
    """A venv's python that sees the project's third-party packages but not the pipeline, nor BLOCKED (nor `block`):
    a folder of links to every other entry of the project's site-packages, named by one .pth line (a plain path: the
    .pth files there, the editable install of the pipeline among them, stay inactive)."""
    venv = root / f"venv-{'-'.join(allow + block) or 'plain'}"
    if not venv.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        deps = venv / "deps"
        deps.mkdir()
        blocked = {m for m in BLOCKED + block if m not in allow}
        for entry in SITE.iterdir():
            top = entry.name.split(".")[0].split("-")[0]
            if top in blocked or entry.suffix == ".pth" or entry.name.startswith("__editable__"):
                continue
            (deps / entry.name).symlink_to(entry)
        site = next(venv.glob("lib/python*/site-packages"))
        (site / "project.pth").write_text(f"{deps}\n")
    return venv / "bin" / "python"


def _offline() -> list[str]:
    try:
        subprocess.run(["unshare", "-rn", "true"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return []  # no user namespaces here: the guard still keeps the pipeline out
    return ["unshare", "-rn"]


def _run_bundle(bundle: Path, data: Path, cwd: Path, python: Path, *extra: str) -> tuple[pd.DataFrame, pd.DataFrame,
                                                                                          str]:
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [*_offline(), str(python), "-I", str(bundle / "predict.py"), "--data", str(data), "--out", "sub.csv",
           "--proba-out", "proba.csv", "--device", "cpu", "--threads", "1", *extra]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return (pd.read_csv(cwd / "sub.csv", dtype=str, keep_default_na=False), pd.read_csv(cwd / "proba.csv"),
            res.stdout)


def _chain(root: Path, data: Path, *overrides: str) -> Context:
    ctx = Context(load_config(None, tiny(*CHAIN, *overrides)), data, root / "work", root / "subs")
    orchestrate.run("bundle", ctx)
    return ctx


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    data = write_competition(root / "comp", n_per_class=8, n_test=9)
    return _chain(root, data, "ensemble.method=weights"), root


def _assert_parity(ctx: Context, root: Path, python: Path, where: str, *extra: str) -> tuple[pd.DataFrame, str]:
    bundle = ctx.submissions_dir / f"{ctx.competition.name}-bundle"
    sub, proba, out = _run_bundle(bundle, ctx.data_dir, root / where, python, *extra)
    expected = pd.read_csv(ctx.submissions_dir / f"{ctx.competition.name}.csv", dtype=str, keep_default_na=False)
    assert list(sub.columns) == list(expected.columns) and sub.iloc[:, 0].tolist() == expected.iloc[:, 0].tolist()
    if ctx.competition.task == "regression":
        np.testing.assert_allclose(sub.iloc[:, 1].astype(float), expected.iloc[:, 1].astype(float), atol=1e-5, rtol=0)
    else:
        assert sub.iloc[:, 1].tolist() == expected.iloc[:, 1].tolist()
    blended = pd.read_parquet(ctx.work_dir / "ensemble" / "test.parquet").set_index("id")
    proba = proba.astype({"id": str}).set_index("id").loc[blended.index]
    diff = float(np.abs(proba.to_numpy() - blended.to_numpy()).max())
    assert diff < 1e-5, diff
    return sub, out


@pytest.mark.slow
def test_single_label_bundle_reproduces_the_submission_without_the_pipeline(single, tmp_path):
    ctx, root = single
    bundle = ctx.submissions_dir / f"{ctx.competition.name}-bundle"
    spec = json.loads((bundle / "spec.json").read_text())
    assert spec["blend"]["how"] == "linear" and len(spec["members"]) == len(spec["blend"]["weights"])
    assert {m["backbone"] for m in spec["members"]} <= {"d2l_lenet", "resnet10t"}
    assert all(m["tta"]["views"] == ["identity", "hflip", "scale1.25", "random0"] for m in spec["members"])
    assert sorted(p.name for p in (bundle / "weights").iterdir()) == sorted(
        f"{m['name']}-fold{f['fold']}.safetensors" for m in spec["members"] for f in m["folds"])
    assert "import pipeline" not in (bundle / "predict.py").read_text()
    assert spec["versions"]["torch"] == torch.__version__.split("+")[0] and spec["thresholds"] is None
    nb = json.loads(next(bundle.glob("*.ipynb")).read_text())
    assert "/kaggle/input/" in "".join(nb["cells"][1]["source"]) and "onnx" not in json.dumps(nb)

    python = _isolated_python(tmp_path)
    blocked = subprocess.run([str(python), "-I", "-c", "import pipeline"], capture_output=True, cwd=tmp_path)
    assert blocked.returncode != 0  # the bundle really runs without the pipeline
    _, out = _assert_parity(ctx, tmp_path, python, "user", "--batch-size", "4")
    assert "images/s" in out and "9 images" in out
    assert subprocess.run([str(python), "-I", str(bundle / "predict.py"), "--data", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, cwd=tmp_path).stderr.startswith("error: ")  # one line


@pytest.mark.slow
def test_a_stack_bundles_exactly_and_a_lightgbm_stack_is_refused(single, tmp_path):
    ctx, root = single
    stacked = Context(load_config(None, tiny(*CHAIN, "ensemble.method=stack")), ctx.data_dir, ctx.work_dir,
                      ctx.submissions_dir)
    orchestrate.run("bundle", stacked)
    spec = json.loads((ctx.submissions_dir / f"{ctx.competition.name}-bundle" / "spec.json").read_text())
    assert spec["blend"]["how"] == "stack" and len(spec["members"]) == 2
    _assert_parity(stacked, tmp_path, _isolated_python(tmp_path), "stack")

    from pipeline.export.bundle import blend_spec
    from pipeline.scoring.blend import LightGBMStack

    with pytest.raises(PipelineError, match="ensemble.method=stack"):
        blend_spec(LightGBMStack(), ["a", "b"], "lightgbm_stack")


@pytest.mark.slow
def test_onnx_export_matches_torch_and_the_bundle_runs_on_onnxruntime(single, tmp_path):
    ctx, root = single
    # the bundle of one member (the single-model row); d2l_lenet's fixed 5x5 pooling of a 4x4 map has no ONNX form
    overrides = (*CHAIN, "ensemble.method=resnet10t", "export.experiment=resnet10t", "export.fold=1",
                 "export.bundle_onnx=true")
    octx = Context(load_config(None, tiny(*overrides)), ctx.data_dir, ctx.work_dir, ctx.submissions_dir)
    result = orchestrate.run("export", octx)
    assert Path(result["onnx"]).is_file() and result["images"] == 9
    assert 0 <= result["max_abs_diff"] < 1e-4
    import onnx

    graph = onnx.load(result["onnx"]).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
    orchestrate.run("bundle", octx)
    spec = json.loads((ctx.submissions_dir / f"{ctx.competition.name}-bundle" / "spec.json").read_text())
    assert [m["name"] for m in spec["members"]] == ["resnet10t"] and spec["blend"]["how"] == "single"
    assert all(set(f["onnx"]) == {"any"} for f in spec["members"][0]["folds"])  # one graph for every size
    nb = json.loads(next((ctx.submissions_dir / f"{ctx.competition.name}-bundle").glob("*.ipynb")).read_text())
    assert "'--engine', 'onnx'" in "".join(nb["cells"][0]["source"])  # onnxruntime is optional: how to use it
    python = _isolated_python(tmp_path, allow=("onnxruntime",))
    bundle = ctx.submissions_dir / f"{ctx.competition.name}-bundle"
    sub, proba, out = _run_bundle(bundle, ctx.data_dir, tmp_path / "onnx", python, "--engine", "onnx",
                                  "--batch-size", "3")
    expected = pd.read_csv(ctx.submissions_dir / f"{ctx.competition.name}.csv", dtype=str, keep_default_na=False)
    assert sub.equals(expected) and "(onnx)" in out
    with pytest.raises(PipelineError, match="ONNX export failed .*export.experiment="):
        orchestrate.run("export", Context(load_config(None, tiny(*CHAIN, "export.experiment=d2l_lenet")),
                                          ctx.data_dir, ctx.work_dir, ctx.submissions_dir))
    blended = pd.read_parquet(ctx.work_dir / "ensemble" / "test.parquet").set_index("id")
    assert np.abs(proba.astype({"id": str}).set_index("id").loc[blended.index].to_numpy()
                  - blended.to_numpy()).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("task", ["multi_label", "regression", "ordinal"])
def test_multi_label_regression_and_ordinal_bundles_reproduce_the_submission(task, tmp_path):
    data = make_task_folder(tmp_path / task, task, n_train=32, n_test=8)
    extra = {"multi_label": ("competition.task=multi_label", "competition.metric=f1_samples"),
             "regression": ("competition.task=regression",), "ordinal": ("competition.task=ordinal",)}[task]
    ctx = _chain(tmp_path, data, *extra, "ensemble.method=weights")
    spec = json.loads((ctx.submissions_dir / f"{ctx.competition.name}-bundle" / "spec.json").read_text())
    if task == "multi_label":
        assert spec["thresholds"] is not None  # per-tag cuts tuned on OOF travel with the bundle
    _assert_parity(ctx, tmp_path, _isolated_python(tmp_path), "user")


def test_the_bundle_decodes_images_exactly_as_the_pipeline(tmp_path):
    """Gray, RGBA, palette, 16-bit and EXIF-rotated files: predict.py's decoding equals data/images.py's."""
    from PIL import Image

    from pipeline.data.images import load_image, resize, to_channels
    from pipeline.export import bundle_predict as bp

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (21, 13, 3), dtype=np.uint8)
    files = {"gray.png": Image.fromarray(rgb[..., 0]), "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
             "pal.png": Image.fromarray(rgb).convert("P"),
             "deep.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
             "rgb.jpg": Image.fromarray(rgb)}
    for name, im in files.items():
        im.save(tmp_path / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.fromarray(rgb).save(tmp_path / "turned.jpg", exif=exif)
    for path in sorted(tmp_path.iterdir()):
        for channels in (1, 3):
            ours = bp.resize(bp.to_channels(bp.load_image(path, 10**8), channels), 16)
            theirs = resize(to_channels(load_image(path), channels), 16)
            assert ours.dtype == np.uint8 and np.array_equal(ours, theirs), path.name


def test_bundle_predict_refuses_a_missing_test_image_in_one_line(tmp_path):
    from pipeline.export import bundle_predict as bp

    (tmp_path / "test.csv").write_text("image\nimg/a.png\n")
    spec = {"input": {"test_csv": "test.csv", "id_column": "image", "image_dir": "", "image_suffix": ""}}
    with pytest.raises(bp.BundleError, match="image of test id 'img/a.png' not found"):
        bp.image_paths(tmp_path, bp.read_ids(tmp_path / "test.csv", "image"), spec)
    with pytest.raises(bp.BundleError, match="column 'id' missing"):
        bp.read_ids(tmp_path / "test.csv", "id")
    shutil.rmtree(tmp_path)


@pytest.mark.slow
def test_distilled_student_learns_leak_free_is_scored_honestly_and_exports(single):
    ctx, root = single
    overrides = (*CHAIN, "ensemble.method=weights", "distill.backbone=resnet10t", "distill.epochs=1")
    dctx = Context(load_config(None, tiny(*overrides)), ctx.data_dir, ctx.work_dir, ctx.submissions_dir)
    summary = orchestrate.run("distill", dctx)
    assert summary["targets_from"] == {str(k): [f"runs/{n}/fold{k}" for n in summary["teachers"]] for k in (0, 1)}
    # distill.init=teacher: the fold-k student starts from the fold-k resnet10t teacher
    assert summary["teachers"] == ["d2l_lenet", "resnet10t"]
    assert summary["starts_from"] == {str(k): f"runs/resnet10t/fold{k}" for k in (0, 1)}
    assert summary["lr"] == dctx.cfg.train.lr
    table = pd.DataFrame(summary["table"])
    assert len(table) == 5 and table["honest_score"].between(0, 1).all() and (table["ms_per_image"] > 0).all()
    assert table["speedup"].iloc[1] > 2  # one view of one model against 2 members x 2 folds x 4 views
    oof = pd.read_parquet(ctx.work_dir / "distill" / "runs" / "distill-resnet10t" / "oof.parquet")
    assert len(oof) == 16 and oof.filter(like="p_").sum(axis=1).round(4).eq(1).all()
    # distill.test_images: the fold-k student also learns the 9 test images, the hard-label twin does not
    for name, extra in (("distill-resnet10t", 9), ("hard-resnet10t", 0)):
        for k in (0, 1):
            best = json.loads((ctx.work_dir / "distill" / "runs" / name / f"fold{k}" / "best.json").read_text())
            assert best["train_rows"] == int((oof["fold"] != k).sum()) + extra
    again = orchestrate.run("distill", dctx)  # nothing retrained or re-measured
    assert again["table"] == summary["table"]
    # the ensemble does not blend the student back into its own teacher
    assert orchestrate.run("ensemble", dctx)["models"] == ["d2l_lenet", "resnet10t"]
    exported = orchestrate.run("export", Context(load_config(None, tiny(*overrides,
                                                                          "export.experiment=distill-resnet10t")),
                                                 ctx.data_dir, ctx.work_dir, ctx.submissions_dir))
    assert exported["max_abs_diff"] < 1e-4
    _student_bundles_reproduce_its_predictions(ctx, overrides, root)


def _student_bundles_reproduce_its_predictions(ctx: Context, overrides: tuple, root: Path) -> None:
    """export.bundle_of=student: the student alone, every fold model or one (export.bundle_folds), run without the
    pipeline, gives the student's own test predictions back (test.parquet, or fold 0's rows of test_folds)."""
    python = _isolated_python(root)
    folder = ctx.work_dir / "distill" / "runs" / "distill-resnet10t"
    per_fold = pd.read_parquet(folder / "test_folds.parquet")
    for extra, suffix, expected in (
            ((), "", pd.read_parquet(folder / "test.parquet").set_index("id")),
            (("export.bundle_folds=[0]",), "-folds0", per_fold[per_fold["fold"] == 0].drop(columns="fold")
             .set_index("id"))):
        sctx = Context(load_config(None, tiny(*overrides, "export.bundle_of=student", *extra)), ctx.data_dir,
                       ctx.work_dir, ctx.submissions_dir)
        spec = orchestrate.run("bundle", sctx)
        bundle = ctx.submissions_dir / f"{ctx.competition.name}-student-bundle{suffix}"
        assert [m["name"] for m in spec["members"]] == ["distill-resnet10t"]
        assert [f["fold"] for f in spec["members"][0]["folds"]] == ([0] if extra else [0, 1])
        assert len(list((bundle / "weights").iterdir())) == (1 if extra else 2)
        sub, proba, _ = _run_bundle(bundle, ctx.data_dir, root / f"student{suffix}", python)
        proba = proba.astype({"id": str}).set_index("id").loc[expected.index]
        assert float(np.abs(proba.to_numpy() - expected.to_numpy()).max()) < 1e-5
        labels = np.asarray([c.removeprefix("p_") for c in expected.columns])[expected.to_numpy().argmax(1)]
        assert sub.set_index(sub.columns[0]).loc[expected.index].iloc[:, 0].tolist() == labels.tolist()
    # the ensemble's bundle is untouched by the student's
    assert json.loads((ctx.submissions_dir / f"{ctx.competition.name}-bundle" / "spec.json").read_text())[
        "members"][0]["name"] != "distill-resnet10t"


def test_fold_k_targets_never_read_fold_k_labels():
    """fold_targets refits the blend on the other folds' OOF rows: fold 0's labels cannot move fold 0's targets."""
    from pipeline.scoring.blend import WeightedBlend
    from pipeline.training.distill import fold_targets

    rng = np.random.default_rng(0)
    oof = rng.dirichlet(np.ones(3), size=(2, 40))
    teachers = rng.dirichlet(np.ones(3), size=(2, 10))
    y, folds = rng.integers(0, 3, 40), np.repeat([0, 1], 20)
    base = fold_targets(teachers, oof, y, folds, 0, WeightedBlend("log_loss"))
    flipped = y.copy()
    flipped[folds == 0] = (flipped[folds == 0] + 1) % 3
    assert np.array_equal(fold_targets(teachers, oof, flipped, folds, 0, WeightedBlend("log_loss")), base)
    other = y.copy()
    other[folds == 1] = (other[folds == 1] + 1) % 3
    assert not np.allclose(fold_targets(teachers, oof, other, folds, 0, WeightedBlend("log_loss")), base)
    np.testing.assert_allclose(base.sum(1), 1, atol=1e-6)
    sharp = fold_targets(teachers, oof, y, folds, 0, WeightedBlend("log_loss"), temperature=0.5)
    assert (sharp.max(1) >= base.max(1) - 1e-7).all()  # T < 1 sharpens


def test_the_distill_table_times_its_rows_interleaved_and_its_speedups_within_rounds(monkeypatch):
    """A slow spell of the machine (round 3 here, 4x) falls on every row of that round, so the per-round speed-up
    stays exact; the order alternates (A B C, C B A, ...) after one warm-up pass each."""
    from pipeline.training import distill

    clock, order, spell = [0.0], [], {3: 4.0}
    cost = {"ensemble": 0.010, "student": 0.002, "twin": 0.004}

    def run(name):
        def call():
            passes = len(order) // len(cost) - 1  # the round this pass belongs to (-1: warm-up)
            order.append(name)
            clock[0] += cost[name] * spell.get(passes, 1.0)
        return call

    monkeypatch.setattr(distill.time, "perf_counter", lambda: clock[0])
    speeds = distill.ms_per_image({n: run(n) for n in cost}, n_images=10, baseline="ensemble", repeats=5)
    assert order[:3] == ["ensemble", "student", "twin"]
    assert order[3:9] == ["ensemble", "student", "twin", "twin", "student", "ensemble"]
    assert speeds["student"][1] == pytest.approx(5.0) and speeds["twin"][1] == pytest.approx(2.5)
    assert speeds["ensemble"] == (pytest.approx(1.0), pytest.approx(1.0))  # 10 ms / 10 images; the spell is one round


def test_label_weight_mixes_the_one_hot_label_into_a_training_rows_target():
    from pipeline.training.distill import with_labels

    teachers = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=np.float32)
    mixed = with_labels(teachers, np.array([1, 2]), 0.5)
    np.testing.assert_allclose(mixed, [[0.3, 0.65, 0.05], [0.1, 0.1, 0.8]], atol=1e-7)
    assert with_labels(teachers, np.array([1, 2]), 0.0) is teachers


def test_a_run_started_from_another_runs_weights_keys_them_and_refuses_another_model(tmp_path):
    """FoldSettings.init_from (make distill's warm start): the run starts from the given fold run's weights and
    norm (a near-zero learning rate keeps them), its key covers those weights, and weights of other classes are
    refused in one line."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from pipeline.cli import main
    from pipeline.training import fold as fold_module

    comp = write_competition(tmp_path / "comp", n_per_class=6)
    work = tmp_path / "work"
    assert main(["train", "--data", str(comp), "--work", str(work), *tiny("train.folds=[0]")]) == 0
    teacher = work / "runs" / "d2l_lenet" / "fold0"
    ctx = Context(load_config(None, tiny("train.folds=[0]", "train.lr=1e-12")), comp, work)
    data = ctx.training_data()
    scratch = ctx.fold_settings(runs_root=tmp_path / "scratch")
    warm = replace(ctx.fold_settings(runs_root=tmp_path / "warm"), init_from={0: teacher})
    keys = {fold_module.run_key(s, "d2l_lenet", 0, data) for s in (scratch, warm)}
    assert len(keys) == 2
    for settings in (scratch, warm):
        fold_module.train_fold(settings, "d2l_lenet", 0, data)
    start = load_file(str(teacher / "best.safetensors"))
    ends = {s: load_file(str(tmp_path / s / "d2l_lenet" / "fold0" / "best.safetensors")) for s in ("scratch", "warm")}
    weights = [k for k, v in start.items() if v.ndim >= 2]
    assert weights and all(torch.allclose(ends["warm"][k], start[k], atol=1e-6) for k in weights)
    assert not any(torch.allclose(ends["scratch"][k], start[k], atol=1e-6) for k in weights)
    started = json.loads((tmp_path / "warm" / "d2l_lenet" / "fold0" / "best.json").read_text())
    assert started["norm"] == json.loads((teacher / "best.json").read_text())["norm"]

    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    meta = json.loads((other / "best.json").read_text())
    (other / "best.json").write_text(json.dumps({**meta, "classes": ["a", "b"]}))
    with pytest.raises(PipelineError, match=r"other/best.json: starting weights of another classes \(\['a', 'b'\] "
                                            r"!= \['cat', 'dog'\]\); start this run from scratch or retrain"):
        fold_module.train_fold(replace(warm, runs_root=tmp_path / "w2", init_from={0: other}), "d2l_lenet", 0, data)


def test_the_student_starts_from_the_best_scoring_teacher_of_its_backbone_and_size(tmp_path):
    from types import SimpleNamespace as NS

    from pipeline.stages.distill import _starts

    def exp(backbone, size):
        return NS(backbone=backbone, train=NS(image_size=size))

    by_name = {"a": exp("resnet10t", 32), "b": exp("resnet10t", 32), "c": exp("resnet18", 32),
               "d": exp("resnet10t", 64)}
    student = exp("resnet10t", 32)
    oof = {"a": 0.80, "b": 0.85, "c": 0.99, "d": 0.99}

    def ctx(init, metric):
        return NS(cfg=NS(distill=NS(init=init), competition=NS(metric=metric)), work_dir=tmp_path)

    assert _starts(ctx("teacher", "accuracy"), by_name, list(by_name), student, [0, 1], oof) == {
        k: tmp_path / "runs" / "b" / f"fold{k}" for k in (0, 1)}
    assert _starts(ctx("teacher", "log_loss"), by_name, list(by_name), student, [0], oof) == {
        0: tmp_path / "runs" / "a" / "fold0"}  # lower is better
    assert _starts(ctx("teacher", "accuracy"), by_name, ["c", "d"], student, [0], oof) is None  # none fits
    assert _starts(ctx("scratch", "accuracy"), by_name, list(by_name), student, [0], oof) is None


def test_the_student_trains_twice_the_teachers_epochs_unless_told(tmp_path):
    from types import SimpleNamespace as NS

    from pipeline.stages.distill import _student

    for extra, epochs in (((), 10), (("distill.epochs=3",), 3)):
        ctx = NS(cfg=load_config(None, ["distill.backbone=resnet10t", "train.epochs=5", *extra]), work_dir=tmp_path)
        for hard in (False, True):  # the hard-label twin gets the same budget
            assert _student(ctx, {}, [], hard).train.epochs == epochs
