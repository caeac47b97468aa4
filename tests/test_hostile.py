"""Hostile input and faults at every entry point: one `error: ...` line, exit status 2, DATA untouched.

The tests call `pipeline.cli.main` in-process (as `python -m pipeline` does) and stop every stage before
training: the fault is met by the reader, the config loader or the folder checks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import main

from .conftest import tiny


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file's bytes (links by target), to assert that a run left the competition folder byte-identical."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = (("-> " + str(p.readlink())).encode() if p.is_symlink()
                    else p.read_bytes() if p.is_file() else b"<dir>")
    return out


def fails(capsys, argv: list, pattern: str) -> str:
    """Run the CLI and assert one line on stderr, `error: ` first, matching pattern, and exit status 2."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    return err


# --- validate-submission and score -------------------------------------------------------------

def _probability_comp(comp_dir: Path) -> Path:
    """comp_dir with a sample_submission of one probability column per class."""
    sample = pd.read_csv(comp_dir / "sample_submission.csv", dtype=str)
    sample[["image"]].assign(cat="0.5", dog="0.5").to_csv(comp_dir / "sample_submission.csv", index=False)
    return comp_dir


BAD_FILES = {
    "missing": (None, r"sub.csv: submission not found"),
    "empty": (b"", r"sub.csv: file is empty"),
    "latin1": (b"image,label\nimg/test_0.png,caf\xe9\n",
               r"sub.csv line 2: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"),
    "bad-quotes": (b'image,label\n"img/test_0.png,cat\nimg/test_1.png,cat\n', r"sub.csv line 2: badly quoted field"),
    "folder": ("dir", r"sub.csv: is a folder, not a CSV file"),
}


def _bad_file(tmp_path: Path, content, name: str = "sub.csv") -> Path:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_validate_submission_bad_files(comp_dir: Path, tmp_path: Path, capsys, case: str):
    content, pattern = BAD_FILES[case]
    before = snapshot(comp_dir)
    fails(capsys, ["validate-submission", _bad_file(tmp_path, content), "--data", comp_dir], pattern)
    assert snapshot(comp_dir) == before


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_score_bad_files(tmp_path: Path, capsys, case: str):
    content, pattern = BAD_FILES[case]
    solution = tmp_path / "solution.csv"
    solution.write_text("image,label\nimg/test_0.png,cat\nimg/test_1.png,dog\n")
    fails(capsys, ["score", _bad_file(tmp_path, content), solution], pattern)
    fails(capsys, ["score", solution, _bad_file(tmp_path, content, "sol.csv")],
          pattern.replace("sub.csv", "sol.csv").replace("submission not found", "solution not found"))


def test_validate_submission_non_numeric_probability(comp_dir: Path, tmp_path: Path, capsys):
    _probability_comp(comp_dir)
    sub = tmp_path / "sub.csv"
    sub.write_text("image,cat,dog\nimg/test_0.png,0.5,0.5\nimg/test_1.png,0.2,abc\nimg/test_2.png,1,0\n")
    fails(capsys, ["validate-submission", sub, "--data", comp_dir],
          r"sub.csv line 3: probability 'abc' in column 'dog' is not a number")
    sub.write_text("image,cat,dog\nimg/test_0.png,0.5,0.5\nimg/test_1.png,0.2,0.8\n\nimg/test_2.png,,1\n")
    fails(capsys, ["validate-submission", sub, "--data", comp_dir],
          r"sub.csv line 5: probability '' in column 'cat' is not a number")


def test_validate_submission_duplicate_id_names_the_line(comp_dir: Path, tmp_path: Path, capsys):
    sub = tmp_path / "sub.csv"
    sub.write_text("image,label\nimg/test_0.png,cat\nimg/test_1.png,cat\nimg/test_0.png,cat\n")
    fails(capsys, ["validate-submission", sub, "--data", comp_dir], r"sub.csv line 4: duplicate id 'img/test_0.png'")


def test_ids_with_leading_spaces_read_the_same_everywhere(comp_dir: Path, tmp_path: Path, capsys):
    """test.csv and sample_submission.csv written with ', ' separators: the ids lose their leading space in the
    reader, so the pipeline's submission has none; validate-submission reads a file the same way."""
    for name in ("test.csv", "sample_submission.csv"):
        text = (comp_dir / name).read_text().replace("\nimg/", "\n img/").replace(",", ", ")
        (comp_dir / name).write_text(text)
    assert main(["validate-submission", str(comp_dir / "sample_submission.csv"), "--data", str(comp_dir)]) == 0
    stripped = tmp_path / "stripped.csv"
    stripped.write_text((comp_dir / "sample_submission.csv").read_text().replace(" ", ""))
    assert main(["validate-submission", str(stripped), "--data", str(comp_dir)]) == 0
    assert "valid submission" in capsys.readouterr().out


def test_score_column_and_id_problems(tmp_path: Path, capsys):
    solution = tmp_path / "solution.csv"
    solution.write_text("image,label\nimg/test_0.png,cat\nimg/test_1.png,dog\n")
    sub = tmp_path / "sub.csv"
    sub.write_text("image,cat,dog\nimg/test_0.png,1,0\nimg/test_1.png,0,1\n")
    fails(capsys, ["score", sub, solution],
          r"sub.csv: column 'label' missing; a label submission has the solution's columns")
    sub.write_text("image,label\nimg/test_0.png,cat\nimg/test_0.png,dog\n")
    fails(capsys, ["score", sub, solution], r"sub.csv line 3: duplicate id 'img/test_0.png'")
    sub.write_text("image,label\nimg/test_0.png,cat\nimg/test_9.png,dog\n")
    fails(capsys, ["score", sub, solution],
          r"ids do not match .*solution.csv \(1 missing, e.g. \['img/test_1.png'\]; 1 extra")
    (tmp_path / "one.csv").write_text("image\nimg/test_0.png\n")
    fails(capsys, ["score", sub, tmp_path / "one.csv"], r"one.csv: needs an id column and a label column")
    sub.write_text("image,label\n img/test_1.png,dog\nimg/test_0.png,dog\n")
    assert main(["score", str(sub), str(solution)]) == 0
    assert "accuracy of" in capsys.readouterr().out


# --- config files and overrides -----------------------------------------------------------------

@pytest.mark.parametrize(
    "raw, pattern",
    [
        ("train:\n  epochs: 3\n  augment: caf\u00e9\n".encode("latin-1"),
         r"x.yaml line 3: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"),
        ("train:\n  epochs: 3\n".encode("utf-16-le"), r"x.yaml line 1: not UTF-8 text \(byte 0x00\)"),
        (b"train:\n  epochs: true\n",
         r"x.yaml: config key 'train.epochs': Input should be a valid integer \(got True\)"),
        (b"runtime:\n  amp: 1\n", r"x.yaml: config key 'runtime.amp': Input should be a valid boolean \(got 1\)"),
        (b"train:\n  batch_size: '64'\n",
         r"x.yaml: config key 'train.batch_size': Input should be a valid integer \(got '64'\)"),
    ],
    ids=["latin1", "utf16-no-bom", "bool-for-int", "int-for-bool", "text-for-int"],
)
def test_bad_config_files(tmp_path: Path, capsys, raw: bytes, pattern: str):
    (tmp_path / "x.yaml").write_bytes(raw)
    fails(capsys, ["config", "--config", tmp_path / "x.yaml"], pattern)


def test_config_file_that_is_a_folder(tmp_path: Path, capsys):
    fails(capsys, ["config", "--config", tmp_path], r"config file .* is a folder; pass a YAML file")


def test_utf16_config_with_a_bom_loads(tmp_path: Path, capsys):
    (tmp_path / "x.yaml").write_bytes("train:\n  epochs: 3\n".encode("utf-16"))
    assert main(["config", "--config", str(tmp_path / "x.yaml")]) == 0
    assert "  epochs: 3\n" in capsys.readouterr().out


@pytest.mark.parametrize("override, key", [("train.epochs=true", "train.epochs"),
                                           ("folds.n_splits=false", "folds.n_splits"),
                                           ("train.hflip=0", "train.hflip"), ("train.epochs=2.0", "train.epochs")])
def test_overrides_of_the_wrong_type(capsys, override: str, key: str):
    fails(capsys, ["config", override], rf"overrides: config key '{re.escape(key)}': Input should be a valid")


def test_int_for_a_float_key_is_exact_and_accepted(capsys):
    assert main(["config", "train.lr=1", "train.grad_clip=2"]) == 0
    out = capsys.readouterr().out
    assert "  lr: 1.0\n" in out and "  grad_clip: 2.0\n" in out


def test_exponent_floats_read_as_numbers(tmp_path: Path, capsys):
    (tmp_path / "x.yaml").write_text("train:\n  lr: 3e-4\n")
    assert main(["config", "--config", str(tmp_path / "x.yaml"), "train.min_lr=1E-7", "train.weight_decay=-1e-2"]) == 2
    assert "train.weight_decay" in capsys.readouterr().err  # parsed as a number, then refused by ge=0
    assert main(["config", "--config", str(tmp_path / "x.yaml"), "train.min_lr=1E-7"]) == 0
    out = capsys.readouterr().out
    assert "  lr: 0.0003\n" in out and "  min_lr: 1.0e-07\n" in out


# --- train: settings met before the first epoch ---------------------------------------------------

TINY_TRAIN = tiny("train.image_size=8")


def test_unknown_albumentations_argument(comp_dir: Path, tmp_path: Path, capsys):
    before = snapshot(comp_dir)
    fails(capsys, ["train", "--data", comp_dir, "--work", tmp_path / "w", *TINY_TRAIN,
                   "train.transforms=[{Affine: {rotation: 10}}]"],
          r"train.transforms: Affine has no argument 'rotation'; did you mean 'rotate'\?")
    assert (snapshot(comp_dir) == before
            and not (tmp_path / "w" / "runs" / "d2l_lenet" / "fold0" / "last.safetensors").exists())


@pytest.mark.parametrize("spec, pattern", [
    ({"HorizontalFlip": {"prob": 0.5}}, r"HorizontalFlip has no argument 'prob'; it takes p"),
    ({"CoarseDropout": {"p": 0.3, "fil": 1}}, r"CoarseDropout has no argument 'fil'; did you mean 'fill'\?"),
    ({"HorizontalFlip": 0.5}, r"HorizontalFlip: arguments must be a mapping"),
    ({"Compose": {}}, r"albumentations has no transform 'Compose'"),
])
def test_transform_entries_are_checked(spec: dict, pattern: str):
    from pipeline.core.config import TrainConfig
    from pipeline.core.errors import PipelineError
    from pipeline.training.augment import train_transform

    with pytest.raises(PipelineError, match=pattern):
        train_transform(TrainConfig(transforms=[spec]), 0)


@pytest.mark.parametrize("where, pattern", [
    ("missing", r"model.pretrained_path: .*nothing/d2l_lenet.safetensors not found; fix the path"),
    ("folder", r"model.pretrained_path: .*weights is a folder; point it at the weights file"),
])
def test_pretrained_path_missing_or_a_folder(comp_dir: Path, tmp_path: Path, capsys, where: str, pattern: str):
    (tmp_path / "weights").mkdir()
    path = tmp_path / "nothing" / "{backbone}.safetensors" if where == "missing" else tmp_path / "weights"
    fails(capsys, ["train", "--data", comp_dir, "--work", tmp_path / "w", *TINY_TRAIN, f"model.pretrained_path={path}"],
          pattern)


# --- clean and folds: images that cannot be used, competitions too small for the folds ------------

def png_bomb(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit PNG of side x side black pixels: under 100 KB on disk, side**2 pixels once decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(bytes((1 + (side + 7) // 8) * side), 9)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


BOMB = (r"cannot decode image: 400,000,000 pixels, above clean.max_pixels=89,478,485 \(a decompression bomb\?\); "
        r"raise clean.max_pixels")


def test_decompression_bomb_in_train_is_dropped_and_listed(comp_dir: Path, tmp_path: Path, capsys):
    png_bomb(comp_dir / "img" / "cat_1.png")
    before = snapshot(comp_dir)
    assert main(["clean", "--data", str(comp_dir), "--work", str(tmp_path / "w")]) == 0
    assert "unreadable=1" in capsys.readouterr().out
    dropped = pd.read_csv(tmp_path / "w" / "dropped.csv")
    assert list(dropped["id"]) == ["img/cat_1.png"] and re.search(BOMB, dropped["reason"].iloc[0])
    assert snapshot(comp_dir) == before


def test_decompression_bomb_in_test_is_one_line(comp_dir: Path, tmp_path: Path, capsys):
    png_bomb(comp_dir / "img" / "test_1.png")
    lines = (comp_dir / "test.csv").read_text().splitlines()
    (comp_dir / "test.csv").write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")  # test_1 now on line 4
    before = snapshot(comp_dir)
    fails(capsys, ["clean", "--data", comp_dir, "--work", tmp_path / "w"],
          rf"test.csv line 4: .*test_1.png: {BOMB}.*; every test image must be readable")
    assert snapshot(comp_dir) == before


def test_max_pixels_is_configurable_both_ways(tmp_path: Path, monkeypatch):
    from PIL import Image

    from pipeline.core.errors import PipelineError
    from pipeline.data.images import load_image

    path = tmp_path / "x.png"
    Image.new("RGB", (12, 10)).save(path)
    with pytest.raises(PipelineError, match=r"x.png: cannot decode image: 120 pixels, above clean.max_pixels=119 "):
        load_image(path, max_pixels=119)
    assert load_image(path, max_pixels=120).shape == (10, 12, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Pillow refuses above twice its limit: 100 pixels here
    assert load_image(path, max_pixels=1000).shape == (10, 12, 3)


def test_max_pixels_drops_training_images(comp_dir: Path, tmp_path: Path, capsys):
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(comp_dir / "img" / "dog_2.png")
    assert main(["clean", "--data", str(comp_dir), "--work", str(tmp_path / "w"), "clean.max_pixels=1000"]) == 0
    reason = pd.read_csv(tmp_path / "w" / "dropped.csv").set_index("id")["reason"]["img/dog_2.png"]
    assert "cannot decode image: 1,200 pixels, above clean.max_pixels=1,000" in reason


def test_class_without_a_readable_image(comp_dir: Path, tmp_path: Path, capsys):
    for i in range(4):
        (comp_dir / "img" / f"dog_{i}.png").write_bytes(b"not a png")
    before = snapshot(comp_dir)
    fails(capsys, ["clean", "--data", comp_dir, "--work", tmp_path / "w"],
          r"train.csv: class 'dog' has no training image left after cleaning \(4 unreadable\), "
          r"e.g. line 6: .*dog_0.png: cannot decode image .*; fix its images or remove its rows "
          r"\(all listed in .*dropped.csv\)")
    assert len(pd.read_csv(tmp_path / "w" / "dropped.csv")) == 4 and not (tmp_path / "w" / "clean.json").exists()
    assert snapshot(comp_dir) == before


def test_no_readable_training_image(comp_dir: Path, tmp_path: Path, capsys):
    for path in (comp_dir / "img").glob("[cd]*.png"):
        path.write_bytes(b"")
    fails(capsys, ["folds", "--data", comp_dir, "--work", tmp_path / "w"],
          r"train.csv: every training image was dropped \(8 unreadable\), "
          r"e.g. line 2: .*cat_0.png: cannot decode image")


def test_too_few_images_per_class_for_the_folds(comp_dir: Path, tmp_path: Path, capsys):
    before = snapshot(comp_dir)
    fails(capsys, ["folds", "--data", comp_dir, "--work", tmp_path / "w"],
          r"folds.n_splits=5 needs a class with at least 5 images, but the largest, '(cat|dog)', has 4 after cleaning: "
          r"set folds.n_splits=4 or fewer")
    assert snapshot(comp_dir) == before
    assert main(["folds", "--data", str(comp_dir), "--work", str(tmp_path / "w"), "folds.n_splits=4"]) == 0


def test_unreadable_test_image_after_a_blank_line_names_its_line(comp_dir: Path, tmp_path: Path, capsys):
    (comp_dir / "img" / "test_2.png").write_bytes(b"GIF89a truncated")
    lines = (comp_dir / "test.csv").read_text().splitlines()
    (comp_dir / "test.csv").write_text("\n".join(lines[:1] + ["", ""] + lines[1:]) + "\n")  # test_2 now on line 6
    fails(capsys, ["clean", "--data", comp_dir, "--work", tmp_path / "w"],
          r"test.csv line 6: .*test_2.png: cannot decode image")


# --- WORK and SUBMISSIONS that cannot take the outputs --------------------------------------------

def test_work_that_is_a_file(comp_dir: Path, tmp_path: Path, capsys):
    (tmp_path / "w").write_text("notes")
    before = snapshot(comp_dir)
    fails(capsys, ["clean", "--data", comp_dir, "--work", tmp_path / "w"],
          r"WORK folder .*/w: is a file, not a folder; pass another --work")
    assert (tmp_path / "w").read_text() == "notes" and snapshot(comp_dir) == before


def test_work_below_a_file(comp_dir: Path, tmp_path: Path, capsys):
    (tmp_path / "f").write_text("notes")
    fails(capsys, ["folds", "--data", comp_dir, "--work", tmp_path / "f" / "w"],
          rf"WORK folder .*/f/w: lies below the file {tmp_path}/f; pass")


def _refuse_writes_under(folder: Path, monkeypatch) -> None:
    """A read-only folder, whoever runs the tests (root ignores permission bits): creating files there is refused."""
    import errno
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(folder.resolve()):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_read_only_work(comp_dir: Path, tmp_path: Path, capsys, monkeypatch):
    (tmp_path / "w").mkdir()
    _refuse_writes_under(tmp_path / "w", monkeypatch)
    fails(capsys, ["clean", "--data", comp_dir, "--work", tmp_path / "w"],
          r"WORK folder .*/w: not writable \(permission denied\); fix its permissions or pass another --work")
    assert list((tmp_path / "w").iterdir()) == []


@pytest.mark.parametrize("problem", ["file", "below-file", "read-only"])
def test_submissions_folder_checked_before_any_work(comp_dir: Path, tmp_path: Path, capsys, monkeypatch, problem: str):
    subs = tmp_path / "subs"
    if problem == "file":
        subs.write_text("x")
    elif problem == "below-file":
        (tmp_path / "f").write_text("x")
        subs = tmp_path / "f" / "subs"
    else:
        subs.mkdir()
        _refuse_writes_under(subs, monkeypatch)
    fails(capsys, ["ensemble", "--data", comp_dir, "--work", tmp_path / "w", "--submissions", subs, *TINY_TRAIN],
          r"SUBMISSIONS folder .*subs: (is a file|lies below the file|not writable).*--submissions")
    assert not (tmp_path / "w" / "clean.json").exists()


def test_disk_full_during_a_stage_leaves_the_old_outputs(comp_dir: Path, tmp_path: Path, capsys, monkeypatch):
    import errno

    work = tmp_path / "w"
    assert main(["clean", "--data", str(comp_dir), "--work", str(work)]) == 0
    outputs = lambda: {p.name: p.read_bytes() for p in work.iterdir() if p.is_file() and p.name != "config.yaml"}  # noqa: E731
    old = outputs()

    def full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    fails(capsys, ["clean", "--data", comp_dir, "--work", work, "clean.drop_flat=true"],
          rf"No space left on device writing under WORK {work} or SUBMISSIONS .*; "
          r"free disk space .* run the same command again")
    assert outputs() == old  # the old clean.csv and stamp, no partial or temporary file


# --- a killed clean leaves no decoding workers behind --------------------------------------------

def _state(pid: int) -> str | None:
    """The process state letter from /proc (None when the pid is gone); 'Z' is a zombie, already dead."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return kids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_sigkill_of_clean_ends_its_decode_workers(tmp_path: Path):
    """Workers busy on 2400x2400 images (a chunk of 32 takes them ~10 s) must die with the killed stage."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from .conftest import REPO, natural_image, write_competition

    data = write_competition(tmp_path / "comp", n_per_class=35)
    natural_image(0, 2400).save(tmp_path / "big.jpg", quality=90)
    for path in (data / "img").glob("*.png"):
        shutil.copyfile(tmp_path / "big.jpg", path)  # a JPEG under a .png name decodes all the same
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "clean", "--data", str(data),
                             "--work", str(tmp_path / "w"), "clean.workers=2"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            workers = _children(proc.pid)
            time.sleep(0.2)
        assert len(workers) == 2, "clean never started its 2 decode workers"
        time.sleep(2.0)  # decoding the first chunk
        assert all(_state(w) not in (None, "Z") for w in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 3.0
        while any(_state(w) not in (None, "Z") for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [w for w in workers if _state(w) not in (None, "Z")] == []
    finally:
        proc.kill()
        proc.wait()
        for w in workers:  # only our own leftovers (same command line), should the assertion have failed
            if _state(w) not in (None, "Z") and b"pipeline" in Path(f"/proc/{w}/cmdline").read_bytes():
                os.kill(w, signal.SIGKILL)


# --- issue 26 B: failures during and around the work ---

def _tmp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.tmp"))


def _disk_full_in(name: str, monkeypatch) -> None:
    """The disk fills while `name` (best.safetensors or last.pt) is written, as each writer reports it: safetensors
    in its message only, torch.save (to a file object) as a RuntimeError over the OSError."""
    import errno

    import torch
    from safetensors import SafetensorError

    from pipeline.training import checkpoint

    real_file, real_save = checkpoint.save_file, torch.save

    def save_file(tensors, filename, metadata=None):
        if Path(filename).name.startswith(f".{name}."):
            Path(filename).write_bytes(b"\0" * 64)  # what got onto the disk
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_file(tensors, filename, metadata=metadata)

    def save(obj, f, *args, **kwargs):
        if Path(getattr(f, "name", f)).name.startswith(f".{name}."):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("name", ["best.safetensors", "last.pt"])
def test_disk_full_while_saving_a_checkpoint(comp_dir: Path, tmp_path: Path, capsys, monkeypatch, name: str):
    from safetensors import safe_open

    args = ["--data", comp_dir, *TINY_TRAIN, "train.folds=[0]"]
    assert main(["train", "--work", str(tmp_path / "ref"), *map(str, args)]) == 0
    work, run = tmp_path / "w", "runs/d2l_lenet/fold0"
    with monkeypatch.context() as patch:
        _disk_full_in(name, patch)
        fails(capsys, ["train", "--work", work, *args],
              rf"No space left on device writing {work}/{run}/{name}; free disk space .* run the same command again")
    assert _tmp_files(work) == [] and not (work / run / "best.json").exists()
    assert main(["train", "--work", str(work), *map(str, args)]) == 0
    assert (work / run / "best.safetensors").read_bytes() == (tmp_path / "ref" / run / "best.safetensors").read_bytes()
    last = [safe_open(str(w / run / "last.safetensors"), "pt") for w in (work, tmp_path / "ref")]
    assert last[0].metadata() == last[1].metadata()  # their order in the header varies from write to write
    assert all(last[0].get_tensor(k).equal(last[1].get_tensor(k)) for k in last[1].keys())
    drop = ["seconds"]
    history = [pd.read_csv(w / run / "history.csv").drop(columns=drop) for w in (work, tmp_path / "ref")]
    pd.testing.assert_frame_equal(*history)


def test_malformed_tune_storage_is_one_line_before_any_work(comp_dir: Path, tmp_path: Path, capsys):
    for url in ("notaurl", "foo://host/db"):
        fails(capsys, ["tune", "--data", comp_dir, "--work", tmp_path / "w", *TINY_TRAIN, f"tune.storage={url}"],
              rf"tune.storage='{re.escape(url)}': not a database URL SQLAlchemy can use \(.*\); "
              r"use sqlite:///path/to/optuna.db or postgresql://user:password@host:5432/db")
        assert not (tmp_path / "w" / "clean.json").exists()


def test_failed_tuning_trials_are_one_line_each(comp_dir: Path, tmp_path: Path, capsys, monkeypatch):
    import logging

    from pipeline.stages import tune

    calls = []

    def fake(cfg, report):
        calls.append(cfg.train.lr)
        if len(calls) == 1:
            raise FloatingPointError("loss is NaN")
        report(1, 0.5)
        return 0.5

    monkeypatch.setattr(tune, "train_trial", lambda ctx, trial_dir: fake)
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    seen: list[logging.LogRecord] = []
    recorder = logging.Handler()
    recorder.emit = seen.append
    logging.getLogger("optuna").addHandler(recorder)  # Optuna's own handler holds the stderr of its import
    try:
        assert main(["tune", "--data", str(comp_dir), "--work", str(tmp_path / "w"), *TINY_TRAIN, "tune.n_trials=2",
                     f"tune.space={space}", "tune.epochs=1", "tune.pruner=none"]) == 0
    finally:
        logging.getLogger("optuna").removeHandler(recorder)
    out, err = capsys.readouterr()
    assert len(calls) == 3 and "Traceback" not in out + err
    assert [r.getMessage() for r in seen if r.levelno >= logging.WARNING] == []
    failed = [line for line in out.splitlines() if line.startswith("tune: trial") and "failed" in line]
    assert len(failed) == 1, out
    assert re.fullmatch(r"tune: trial 0 failed \(diverged: loss is NaN\) with \{\"train.lr\": .*\}", failed[0])
    trials = pd.read_csv(tmp_path / "w" / "tune" / "trials.csv")
    assert trials["state"].tolist() == ["FAIL", "COMPLETE", "COMPLETE"]


ROUND_2 = "rounds.plan=[{experiments: [{name: lenet-r2, backbone: d2l_lenet}]}]"
TASK_REFUSALS = {
    "rounds-multi_label": ("rounds", "multi_label", [ROUND_2],
                           r"rounds.plan: pseudo-label rounds are for single_label tasks only, this one is "
                           r"multi_label; set rounds.plan=\[\]"),
    "rounds-regression": ("rounds", "regression", [ROUND_2],
                          r"rounds.plan: pseudo-label rounds are for single_label tasks only, this one is regression"),
    "labels-regression": ("labels", "regression", [],
                          r"labels: cleanlab's label issues are for single_label tasks only, this one is regression"),
    "train-class-weights": ("ensemble", "regression", ["train.class_weights=balanced"],
                            r"train.class_weights: for single_label tasks only; this one is regression; "
                            r"set train.class_weights=none"),
    "clean-label-issues": ("folds", "multi_label", ["clean.label_issues=drop"],
                           r"clean.label_issues=drop: label issues are for single_label tasks only, this one is "
                           r"multi_label; set clean.label_issues=report"),
}


@pytest.mark.parametrize("case", TASK_REFUSALS, ids=list(TASK_REFUSALS))
def test_a_stage_that_cannot_do_the_task_refuses_before_any_work(tmp_path: Path, capsys, case: str):
    from .task_data import make_task_folder

    stage, task, extra, pattern = TASK_REFUSALS[case]
    data = make_task_folder(tmp_path / "comp", task, n_train=12, n_test=3)
    subs = tmp_path / "subs"
    fails(capsys, [stage, "--data", data, "--work", tmp_path / "w", "--submissions", subs, *TINY_TRAIN, *extra],
          pattern)
    assert list((tmp_path / "w").iterdir()) == [] and list(subs.rglob("*")) == []  # the CLI's folder checks made them


@pytest.mark.parametrize("policy", ["drop", "relabel"])
def test_label_issues_policy_without_the_list_is_refused(comp_dir: Path, tmp_path: Path, capsys, policy: str):
    work = tmp_path / "w"
    fails(capsys, ["folds", "--data", comp_dir, "--work", work, f"clean.label_issues={policy}"],
          rf"clean.label_issues={policy}: {work}/label_issues.csv not found; run `make labels` first with "
          r"clean.label_issues=report")
    assert not (work / "clean.json").exists()
    assert main(["clean", "--data", str(comp_dir), "--work", str(work), "clean.label_issues=report"]) == 0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_a_killed_writers_temporary_file_goes_with_the_next_write(tmp_path: Path):
    """A writer SIGKILLed between its temporary file and the rename (as in ensemble) leaves the file; the next write
    of the same artifact removes it, and leaves a running writer's own."""
    import signal
    import subprocess
    import sys

    from pipeline.core import artifacts

    from .conftest import REPO

    target = tmp_path / "w" / "ensemble" / "oof.parquet"
    code = ("import sys, time; from pathlib import Path; from pipeline.core.artifacts import atomic_write\n"
            "def write(tmp):\n    tmp.write_bytes(b'half'); print('writing', flush=True); time.sleep(120)\n"
            f"atomic_write(Path({str(target)!r}), write)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    dead = _tmp_files(target.parent)
    assert len(dead) == 1 and dead[0].startswith(f".oof.parquet.{proc.pid}@")
    live = target.parent / f".oof.parquet.{os.getpid()}@{artifacts._HOST}.running.tmp"  # a writer still at work
    other = target.parent / f".oof.parquet.{proc.pid}@another-host.x.tmp"  # WORK shared with another machine
    for path in (live, other):
        path.write_bytes(b"half")
    artifacts.write_text(target, "whole")
    assert target.read_text() == "whole"
    assert _tmp_files(target.parent) == sorted([other.name, live.name])


def _detection_folder(root: Path, train: str, test: str, val: str | None = None) -> Path:
    from PIL import Image

    (root / "img").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (40, 30), (20 * i, 90, 30)).save(root / "img" / f"{i}.png")
    (root / "train.csv").write_text(train)
    (root / "test.csv").write_text(test)
    if val is not None:
        (root / "val.csv").write_text(val)
    return root


DETECT_TINY = ["detect.train.image_size=64", "detect.train.epochs=1", "detect.folds.n_splits=1", "runtime.device=cpu",
               "runtime.threads=1"]
BOXES = "image,label,xmin,ymin,xmax,ymax\nimg/0.png,cat,1,1,20,20\nimg/1.png,dog,2,2,30,25\n"


def test_unknown_class_in_detection_val_csv_names_its_line(tmp_path: Path, capsys):
    val = "image,label,xmin,ymin,xmax,ymax\nimg/2.png,cat,1,1,9,9\n\nimg/2.png,bird,3,3,12,12\n"
    data = _detection_folder(tmp_path / "d", BOXES, "image\nimg/3.png\n", val)
    fails(capsys, ["detect", "--data", data, "--work", tmp_path / "w", *DETECT_TINY],
          rf"{data}/val.csv line 4: label 'bird' never occurs in train.csv; the model cannot learn it")


def test_a_test_image_listed_in_detection_train_csv_is_reported(tmp_path: Path, capsys, monkeypatch):
    from pipeline.core.errors import PipelineError
    from pipeline.training import runtime

    def stop(*args, **kwargs):
        raise PipelineError("stopped after reading the folder")

    monkeypatch.setattr(runtime, "from_config", stop)
    data = _detection_folder(tmp_path / "d", BOXES + "img/2.png,cat,1,1,9,9\n", "image\nimg/3.png\n\nimg/1.png\n")
    assert main(["detect", "--data", str(data), "--work", str(tmp_path / "w"), *DETECT_TINY]) == 2
    out = capsys.readouterr().out
    warned = [line for line in out.splitlines() if "leak" in line]
    assert warned == [f"detect: warning: 1 test image(s) also listed for training (a train/test leak), e.g. "
                      f"{data}/test.csv line 4: 'img/1.png' is {data}/train.csv line 3; remove them from one of the "
                      "files"], out


# --- issue 26 A: label columns that read wrong ------------------------------------------------------

def _numeric_comp(root: Path, cells: dict[int, str] | None = None, every: str | None = None) -> Path:
    """A competition whose label is a number (1.5 * digit + 0.25, 3 rows each: 30 rows on lines 2-31), with the
    cells of `cells` (row -> text) written in, or every cell `every`."""
    from .conftest import write_competition

    write_competition(root, n_per_class=3, classes=tuple(str(1.5 * d + 0.25) for d in range(10)))
    train = pd.read_csv(root / "train.csv", dtype=str)
    for row, text in (cells or {}).items():
        train.loc[row, "label"] = text
    if every is not None:
        train["label"] = every
    train.to_csv(root / "train.csv", index=False)
    return root


@pytest.mark.parametrize("cells, named", [
    ({3: "inf", 8: "inf"}, r"2 of 30 cells \(line 5: 'inf', line 10: 'inf'\)"),
    ({3: "n/a", 8: "n/a"}, r"2 of 30 cells \(line 5: 'n/a', line 10: 'n/a'\)"),
    ({3: "inf"}, r"1 of 30 cells \(line 5: 'inf'\)"),
    ({3: "not known", 8: "not known", 9: "-", 12: "NaN"},
     r"4 of 30 cells \(line 5: 'not known', line 10: 'not known', line 11: '-' and 1 more\)"),
], ids=["inf-twice", "n/a-twice", "inf-once", "four-with-spaces"])
def test_auto_refuses_numbers_but_for_a_few_cells(tmp_path: Path, capsys, cells: dict, named: str):
    """Read as classes, the bad cells became classes of their own and every test row was predicted 'inf'."""
    data = _numeric_comp(tmp_path / "comp", cells)
    before = snapshot(data)
    fails(capsys, ["clean", "--data", data, "--work", tmp_path / "w", "clean.workers=1"],
          rf"comp/train.csv: column 'label' holds numbers but for {named}; competition.task=auto cannot tell a "
          r"number to regress from classes: fix or remove those rows, or set competition.task explicitly")
    assert snapshot(data) == before


@pytest.mark.parametrize("task", ["auto", "regression"])
def test_regression_target_beyond_float32_names_the_row(tmp_path: Path, capsys, task: str):
    """1e308 overflowed the float32 cast and crashed in scikit-learn's input validation after training."""
    data = _numeric_comp(tmp_path / "comp", {7: "1e308"})
    fails(capsys, ["clean", "--data", data, "--work", tmp_path / "w", "clean.workers=1", f"competition.task={task}"],
          r"comp/train.csv line 9: target '1e308' in column 'label' is outside the accepted range -1e\+30 to "
          r"1e\+30 \(training computes in float32, at most 3.4e38, on the standardised target\); rescale the column")


def test_constant_regression_target_is_refused(tmp_path: Path, capsys):
    """A target that is always 3.5 trained and predicted about 3.72, without a word."""
    data = _numeric_comp(tmp_path / "comp", every="3.5")
    fails(capsys, ["clean", "--data", data, "--work", tmp_path / "w", "clean.workers=1"],
          r"comp/train.csv: every target in column 'label' is '3.5' \(30 rows, lines 2 to 31\); a constant has "
          r"nothing to learn: submit the value itself without a model, or check competition.label_column")


def test_ordinal_with_a_single_grade_is_refused(tmp_path: Path, capsys):
    """One grade trained (CV NaN), then crashed in thresholds.py."""
    data = _numeric_comp(tmp_path / "comp", every="2")
    fails(capsys, ["clean", "--data", data, "--work", tmp_path / "w", "clean.workers=1", "competition.task=ordinal"],
          r"comp/train.csv: every grade in column 'label' is '2' \(30 rows, lines 2 to 31\); ordinal needs at least "
          r"two grades to cut between")


@pytest.mark.parametrize("value, reads", [(",", None), ("|", "''"), ("#", "None"), ("-", r"\[None\]")])
def test_override_of_yaml_punctuation_says_how_to_quote_it(capsys, value: str, reads: str | None):
    """`,` was 'not valid YAML' with no hint; `|` silently became '' (no separator at all)."""
    what = "value is not valid YAML" if reads is None else rf"YAML reads '{re.escape(value)}' as {reads}, not as"
    fails(capsys, ["config", f"competition.label_separator={value}"],
          rf"override 'competition.label_separator={re.escape(value)}': {what}.*; if it is text, quote it: "
          rf"\"competition.label_separator='{re.escape(value)}'\"")
    assert main(["config", f"competition.label_separator='{value}'"]) == 0
    assert f"label_separator: '{value}'" in capsys.readouterr().out
