import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.config import CompetitionConfig
from pipeline.core.errors import PipelineError
from pipeline.data.competition import read_competition
from pipeline.data.images import load_image, to_channels
from pipeline.data.labels import sort_classes

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
    for name in ("train.csv", "test.csv", "sample_submission.csv"):
        _edit(comp_dir / name, lambda f: f.assign(image=f.image.str.slice(4, -4)))
    comp = read_competition(comp_dir, CompetitionConfig(image_dir="img", image_suffix=".png"))
    assert comp.train["id"].iloc[0] == "cat_0" and comp.train["path"].iloc[0].endswith("img/cat_0.png")


def _split_folders(comp_dir: Path, suffix: bool) -> None:
    """Kaggle's layout: train images in train_images/, test images in test/images/, bare ids in the CSVs."""
    for name, folder in (("train.csv", "train_images"), ("test.csv", "test/images")):
        frame = pd.read_csv(comp_dir / name, dtype=str, keep_default_na=False)
        (comp_dir / folder).mkdir(parents=True)
        for image in frame.image:
            os.replace(comp_dir / image, comp_dir / folder / Path(image).name)
    strip = (lambda f: f.assign(image=f.image.str.slice(4, -4))) if suffix else (
        lambda f: f.assign(image=f.image.str.slice(4)))
    for name in ("train.csv", "test.csv", "sample_submission.csv"):
        _edit(comp_dir / name, strip)


@pytest.mark.parametrize("suffix", [False, True])
def test_bare_ids_find_their_split_folders(comp_dir: Path, suffix: bool, caplog):
    _split_folders(comp_dir, suffix)
    with caplog.at_level("INFO"):
        comp = read_competition(comp_dir, CFG)
    assert comp.train["path"].iloc[0] == str((comp_dir / "train_images" / "cat_0.png").resolve())
    assert comp.test["path"].iloc[2] == str((comp_dir / "test" / "images" / "test_2.png").resolve())
    assert comp.train["id"].iloc[0] == ("cat_0" if suffix else "cat_0.png")
    assert "train.csv: images found in train_images/*" + (".png" if suffix else "") in caplog.text


def test_an_id_in_two_folders_is_one_line(comp_dir: Path):
    _split_folders(comp_dir, suffix=False)
    (comp_dir / "extra").mkdir()
    (comp_dir / "extra" / "cat_0.png").write_bytes((comp_dir / "train_images" / "cat_0.png").read_bytes())
    with pytest.raises(PipelineError, match=r"^\S*train.csv line 2: image 'cat_0.png' is in several folders "
                                            r"\(extra/cat_0.png, train_images/cat_0.png\); set competition.image_dir"):
        read_competition(comp_dir, CFG)


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
        (lambda d: _edit(d / "train.csv",
                         lambda f: f.assign(image=list(f.image[:3]) + [f.image[0]] + list(f.image[4:]))),
         r"train.csv line 5: duplicate id 'img/cat_0.png' \(first on line 2\)"),
        (lambda d: _edit(d / "train.csv", lambda f: f.assign(label=list(f.label[:-1]) + ["bird"])),
         r"train.csv line 9: class 'bird' has only 1 sample"),
        (lambda d: _edit(d / "train.csv", lambda f: f.assign(label=[""] + list(f.label[1:]))),
         r"train.csv line 2: empty label"),
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


# --- CSV text: encodings, delimiters, quoting, line numbers, missing labels, sample_submission ---------

def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write_lines(path: Path, lines: list[str], encoding: str = "utf-8") -> None:
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))


def _blank_line_then_missing_image(d: Path) -> None:
    lines = _lines(d / "train.csv")
    _write_lines(d / "train.csv", lines[:3] + [""] + lines[3:])  # dog_1 now sits on line 8
    os.remove(d / "img" / "dog_1.png")


def _quoted_line_break_then_missing_image(d: Path) -> None:
    (d / "img" / "cat\nx.png").write_bytes((d / "img" / "cat_0.png").read_bytes())
    lines = _lines(d / "train.csv")
    _write_lines(d / "train.csv", lines[:2] + ['"img/cat', 'x.png",cat'] + lines[2:])  # one record on lines 3-4
    os.remove(d / "img" / "dog_1.png")  # dog_1 now sits on line 9


def _latin1_label(d: Path) -> None:
    lines = _lines(d / "train.csv")
    lines[3] = "img/cat_2.png,caf\u00e9"
    _write_lines(d / "train.csv", lines, "latin-1")


def _sample_rows(d: Path, fn) -> None:
    _edit(d / "sample_submission.csv", fn)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (_blank_line_then_missing_image, r"train.csv line 8: image 'img/dog_1.png' not found"),
        (_quoted_line_break_then_missing_image, r"train.csv line 9: image 'img/dog_1.png' not found"),
        (_latin1_label, r"train.csv line 4: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"),
        (lambda d: _write_lines(d / "train.csv", [ln.replace(",", ";") for ln in _lines(d / "train.csv")]),
         r"train.csv line 1: columns are separated by semicolons \('image;label'\); .* save the file with commas"),
        (lambda d: _write_lines(d / "train.csv", [ln.replace(",", "\t") for ln in _lines(d / "train.csv")]),
         r"train.csv line 1: columns are separated by tabs"),
        (lambda d: _write_lines(d / "train.csv",
                                _lines(d / "train.csv")[:4] + ['"img/cat_3.png,cat'] + _lines(d / "train.csv")[5:]),
         r"train.csv line 5: badly quoted field"),
        (lambda d: _write_lines(d / "train.csv",
                                _lines(d / "train.csv")[:3] + ['"img/cat_2.png"x,cat'] + _lines(d / "train.csv")[4:]),
         r"train.csv line 4: badly quoted field"),
        (lambda d: _write_lines(d / "train.csv", _lines(d / "train.csv")[:6] + ["img/dog_1.png,dog,extra"]
                                + _lines(d / "train.csv")[7:]),
         r"train.csv line 7: 3 fields but the header has 2; quote values that contain commas"),
        (lambda d: _write_lines(d / "train.csv", ["image,image"] + _lines(d / "train.csv")[1:]),
         r"train.csv line 1: column 'image' appears twice"),
        (lambda d: _edit(d / "train.csv", lambda f: f.assign(label=list(f.label[:5]) + ["NaN"] + list(f.label[6:]))),
         r"train.csv line 7: label 'NaN' in column 'label' is how a missing value is saved, "
         r"not a class; label the row"),
        (lambda d: _edit(d / "train.csv", lambda f: f.assign(label=["nan"] + list(f.label[1:]))),
         r"train.csv line 2: label 'nan'"),
        (lambda d: _sample_rows(d, lambda f: f.assign(image=["img/cat_0.png"] + list(f.image[1:]))),
         r"sample_submission.csv line 2: id 'img/cat_0.png' is not in test.csv; the two files must list the same ids"),
        (lambda d: _sample_rows(d, lambda f: f.iloc[:2]),
         r"sample_submission.csv: no row for test.csv's id 'img/test_2.png' \(test.csv line 4\) and 0 more"),
        (lambda d: _sample_rows(d, lambda f: f.assign(image=list(f.image[:2]) + [f.image[0]])),
         r"sample_submission.csv line 4: duplicate id 'img/test_0.png' \(first on line 2\)"),
        (lambda d: _sample_rows(d, lambda f: f[["image"]]), r"sample_submission.csv: only the id column 'image'"),
        (lambda d: _sample_rows(d, lambda f: f.assign(cat=0.5, bird=0.5).drop(columns="label")),
         r"sample_submission.csv: columns \['cat', 'bird'\] are neither one label column "
         r"nor one probability column .*'bird'"),
        (lambda d: _sample_rows(d, lambda f: f.rename(columns={"image": "file"})),
         r"sample_submission.csv: id column 'image' missing"),
    ],
    ids=["blank-line", "quoted-line-break", "latin1", "semicolons", "tabs", "unterminated-quote", "stray-quote",
         "extra-field", "repeated-column", "NaN-label", "nan-label", "sample-extra-id", "sample-missing-id",
         "sample-dup-id", "sample-no-value", "sample-odd-columns", "sample-no-id-column"],
)
def test_csv_text_problems_are_one_line_errors(comp_dir: Path, mutate, pattern):
    mutate(comp_dir)
    with pytest.raises(PipelineError, match=pattern) as err:
        read_competition(comp_dir, CFG)
    assert "\n" not in str(err.value)


def test_utf16_bom_and_crlf_csvs_read_like_utf8(comp_dir: Path):
    want = read_competition(comp_dir, CFG)
    text = (comp_dir / "train.csv").read_text()
    # Excel's "Unicode text": BOM, CRLF
    (comp_dir / "train.csv").write_bytes(text.replace("\n", "\r\n").encode("utf-16"))
    (comp_dir / "test.csv").write_bytes(b"\xef\xbb\xbf" + (comp_dir / "test.csv").read_bytes())
    got = read_competition(comp_dir, CFG)
    assert got.classes == want.classes and got.train.equals(want.train) and got.test.equals(want.test)


def test_short_rows_blank_lines_and_leading_spaces(comp_dir: Path):
    lines = _lines(comp_dir / "test.csv")
    _write_lines(comp_dir / "test.csv", [lines[0], "", " " + lines[1], "", lines[2], lines[3]])
    comp = read_competition(comp_dir, CFG)
    assert list(comp.test["id"]) == ["img/test_0.png", "img/test_1.png", "img/test_2.png"]
    assert list(comp.test["line"]) == [3, 5, 6] and list(comp.train["line"]) == list(range(2, 10))


def test_na_and_none_stay_labels(comp_dir: Path):
    _edit(comp_dir / "train.csv", lambda f: f.assign(label=["NA"] * 4 + ["None"] * 4))
    assert read_competition(comp_dir, CFG).classes == ["NA", "None"]


def test_symlink_loop_is_one_line(comp_dir: Path):
    (comp_dir / "img" / "a.png").symlink_to("b.png")
    (comp_dir / "img" / "b.png").symlink_to("a.png")
    _edit(comp_dir / "test.csv", lambda f: f.assign(image=list(f.image[:2]) + ["img/a.png"]))
    with pytest.raises(PipelineError,
                       match=r"test.csv line 4: image path 'img/a.png' runs into a loop of symbolic links"):
        read_competition(comp_dir, CFG)
