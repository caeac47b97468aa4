import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.competition import read_competition, sort_classes
from pipeline.config import CompetitionConfig
from pipeline.errors import PipelineError
from pipeline.images import load_image, to_channels

CFG = CompetitionConfig()


def _edit(path: Path, fn) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    fn(frame).to_csv(path, index=False)


def test_reads_a_valid_folder(comp_dir: Path):
    comp = read_competition(comp_dir, CFG)
    assert comp.id_column == "image" and comp.label_column == "label"
    assert comp.classes == ["cat", "dog"] and list(comp.train["y"]) == [0] * 4 + [1] * 4
    assert all(Path(p).is_absolute() for p in comp.train["path"]) and len(comp.test) == 3
    assert comp.name == "comp"


def test_never_writes_into_the_folder(comp_dir: Path):
    before = {p: p.stat().st_mtime_ns for p in comp_dir.rglob("*")}
    read_competition(comp_dir, CFG)
    assert {p: p.stat().st_mtime_ns for p in comp_dir.rglob("*")} == before


def test_bare_ids_with_image_dir_and_suffix(comp_dir: Path):
    for name in ("train.csv", "test.csv"):
        _edit(comp_dir / name, lambda f: f.assign(image=f.image.str.slice(4, -4)))
    comp = read_competition(comp_dir, CompetitionConfig(image_dir="img", image_suffix=".png"))
    assert comp.train["id"].iloc[0] == "cat_0" and comp.train["path"].iloc[0].endswith("img/cat_0.png")


def test_explicit_columns(comp_dir: Path):
    _edit(comp_dir / "train.csv", lambda f: f.rename(columns={"image": "file", "label": "breed"}).assign(extra="x"))
    _edit(comp_dir / "test.csv", lambda f: f.rename(columns={"image": "file"}))
    _edit(comp_dir / "sample_submission.csv", lambda f: f.rename(columns={"image": "file"}))
    comp = read_competition(comp_dir, CompetitionConfig(label_column="breed"))
    assert comp.id_column == "file" and comp.label_column == "breed"


def test_numeric_labels_sort_as_numbers():
    assert sort_classes(["10", "2", "1"]) == ["1", "2", "10"]
    assert sort_classes(["b", "a"]) == ["a", "b"]


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda d: os.remove(d / "train.csv"), r"train.csv: file not found"),
        (lambda d: (d / "test.csv").write_text("image\n"), r"test.csv: has a header but no rows"),
        (lambda d: (d / "train.csv").write_text(""), r"train.csv: file is empty"),
        (lambda d: _edit(d / "train.csv", lambda f: f.iloc[:0]), r"train.csv: has a header but no rows"),
        (lambda d: os.remove(d / "img" / "dog_1.png"), r"train.csv line 7: image 'img/dog_1.png' not found"),
        (lambda d: _edit(d / "train.csv", lambda f: f.assign(image=["../x.png"] + list(f.image[1:]))),
         r"train.csv line 2: image path '../x.png' leads outside the competition folder"),
        (lambda d: _edit(d / "test.csv", lambda f: f.assign(image=["/etc/passwd"] + list(f.image[1:]))),
         r"test.csv line 2: image path '/etc/passwd' is absolute"),
        (lambda d: _edit(d / "train.csv", lambda f: f.assign(image=list(f.image[:3]) + [f.image[0]] + list(f.image[4:]))),
         r"train.csv line 5: duplicate id 'img/cat_0.png' \(first on line 2\)"),
        (lambda d: _edit(d / "train.csv", lambda f: f.assign(label=list(f.label[:-1]) + ["bird"])),
         r"train.csv line 9: class 'bird' has only 1 sample"),
        (lambda d: _edit(d / "train.csv", lambda f: f.assign(label=[""] + list(f.label[1:]))), r"train.csv line 2: empty label"),
        (lambda d: _edit(d / "test.csv", lambda f: f.rename(columns={"image": "file"})), r"no column shared"),
    ],
    ids=["no-train", "empty-test", "zero-byte-csv", "empty-train", "missing-image", "dotdot", "absolute", "dup-id",
         "single-sample", "empty-label", "no-id-column"],
)
def test_contract_violations_are_one_line_errors(comp_dir: Path, mutate, pattern):
    mutate(comp_dir)
    with pytest.raises(PipelineError, match=pattern) as err:
        read_competition(comp_dir, CFG)
    assert "\n" not in str(err.value)


def test_symlink_leading_out_is_refused(comp_dir: Path, tmp_path: Path):
    outside = tmp_path / "secret.png"
    Image.new("L", (4, 4)).save(outside)
    (comp_dir / "img" / "link.png").symlink_to(outside)
    _edit(comp_dir / "test.csv", lambda f: f.assign(image=["img/link.png"] + list(f.image[1:])))
    with pytest.raises(PipelineError, match="leads outside the competition folder"):
        read_competition(comp_dir, CFG)


def test_missing_explicit_label_column(comp_dir: Path):
    with pytest.raises(PipelineError, match=r"column 'target' \(competition.label_column\) missing"):
        read_competition(comp_dir, CompetitionConfig(label_column="target"))


def test_missing_folder():
    with pytest.raises(PipelineError, match="competition folder not found"):
        read_competition(Path("/nonexistent/comp"), CFG)


# --- image modes -------------------------------------------------------------------------------

def _save(tmp_path: Path, im: Image.Image, name: str, **kw) -> Path:
    path = tmp_path / name
    im.save(path, **kw)
    return path


def test_gray_rgb_rgba_palette_and_16bit(tmp_path: Path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    assert load_image(_save(tmp_path, Image.fromarray(gray), "g.png")).shape == (8, 8)
    rgb = np.dstack([gray, gray // 2, 255 - gray])
    assert (load_image(_save(tmp_path, Image.fromarray(rgb), "c.png")) == rgb).all()
    rgba = Image.fromarray(np.dstack([rgb, np.zeros_like(gray)]), "RGBA")
    assert (load_image(_save(tmp_path, rgba, "a.png")) == 255).all()  # fully transparent -> white
    pal = Image.fromarray(rgb).convert("P")
    assert load_image(_save(tmp_path, pal, "p.png")).shape == (8, 8, 3)
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    out = load_image(_save(tmp_path, sixteen, "s.png"))
    assert out.dtype == np.uint8 and np.abs(out.astype(int) - gray).max() <= 1


def test_exif_rotation_is_applied(tmp_path: Path):
    arr = np.zeros((4, 8, 3), np.uint8)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    path = _save(tmp_path, im, "r.jpg", exif=exif)
    assert load_image(path).shape[:2] == (8, 4)


def test_unreadable_and_zero_size_files(tmp_path: Path):
    (tmp_path / "z.png").write_bytes(b"")
    (tmp_path / "t.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for name in ("z.png", "t.png"):
        with pytest.raises(PipelineError, match=f"{name}: cannot decode image"):
            load_image(tmp_path / name)


def test_channel_conversion():
    gray = np.full((2, 2), 7, np.uint8)
    assert to_channels(gray, 3).shape == (2, 2, 3)
    assert to_channels(np.dstack([gray] * 3), 1).shape == (2, 2, 1)
