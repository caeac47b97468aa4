"""Atomic writes, content keys and reading artifacts: the rules every stage's cache relies on."""

import os
from pathlib import Path

import pytest

from pipeline.core import artifacts
from pipeline.core.artifacts import (
    atomic_write,
    content_key,
    file_digest,
    read_json,
    read_stamp,
    write_json,
    write_text,
)
from pipeline.core.errors import PipelineError


def test_a_writer_that_raises_leaves_the_old_file_and_no_temporary_file(tmp_path: Path):
    path = write_text(tmp_path / "out.csv", "old\n")
    for error in (OSError, KeyboardInterrupt):
        def writer(tmp: Path, error=error) -> None:
            tmp.write_text("new, half written")
            raise error("disk full")

        with pytest.raises(error):
            atomic_write(path, writer)
        assert path.read_text() == "old\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def _rewrite_same_size(path: Path) -> None:
    """New bytes of the same length, the old mtime put back: what size+mtime keys miss."""
    st = path.stat()
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_content_key_sees_same_size_bytes_with_the_old_mtime(tmp_path: Path):
    files = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 100)
    before = content_key(files)
    assert content_key(files) == before and content_key(files[::-1]) != before  # order is part of the key
    _rewrite_same_size(files[1])
    assert content_key(files) != before


def test_a_digest_remembered_in_the_process_is_not_reused_after_a_rewrite(tmp_path: Path, monkeypatch):
    """The per-process memo keys on ctime, which a rewrite moves and os.utime cannot set back."""
    monkeypatch.setattr(artifacts, "_SETTLED_NS", -10**18)  # treat every file as settled: the memo is used
    monkeypatch.setattr(artifacts, "_DIGESTS", {})
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 1000)
    first = file_digest(path)
    assert len(artifacts._DIGESTS) == 1
    _rewrite_same_size(path)
    assert file_digest(path) != first


def test_read_json_names_the_file_and_the_fix(tmp_path: Path):
    with pytest.raises(PipelineError, match=r"folds\.json: not found; run `make folds`$"):
        read_json(tmp_path / "folds.json", "run `make folds`")
    (tmp_path / "bad.json").write_text('{"fingerprint": ')
    with pytest.raises(PipelineError, match=r"bad\.json: unreadable \(JSONDecodeError: .*\); rerun `make x`$"):
        read_json(tmp_path / "bad.json", "rerun `make x`")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(PipelineError, match=r"list\.json: not a JSON object"):
        read_json(tmp_path / "list.json", "rerun `make x`")
    assert [read_stamp(tmp_path / n) for n in ("folds.json", "bad.json", "list.json")] == [None, None, None]
    write_json(tmp_path / "ok.json", {"a": 1})
    assert read_json(tmp_path / "ok.json", "unused") == read_stamp(tmp_path / "ok.json") == {"a": 1}


def test_a_stage_reading_a_missing_upstream_artifact_says_which_make_target_to_run(comp_dir: Path, tmp_path: Path):
    from pipeline.context import Context
    from pipeline.core.config import load_config
    from pipeline.training.fold import load_training_data

    ctx = Context(load_config(None, []), comp_dir, tmp_path / "work")
    with pytest.raises(PipelineError, match=r"folds\.json: not found; run `make folds`"):
        load_training_data(ctx.work_dir, 28, 1, ctx.cfg.clean.max_pixels)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "clean.json").write_text("")
    with pytest.raises(PipelineError, match=r"clean\.json: unreadable .*; run `make clean-data`"):
        ctx.input_channels()
