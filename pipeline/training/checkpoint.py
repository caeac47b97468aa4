"""Resume checkpoints shared by the classification trainer and the detection trainer.

`last.safetensors` holds tensors only (weights, EMA weights) and `last.pt` the rest (optimizer,
scheduler, epoch, history), loadable with weights_only=True. Both carry the epoch and the run's
fingerprint; a pair of another config is ignored. Two files cannot be replaced in one atomic step, so an
epoch's tensors are first written to `last.next.safetensors`, then `last.pt` commits the epoch, then the
tensors are renamed into place: a run killed at any moment resumes from its last committed epoch. A file
that cannot be read (truncated, corrupted) is ignored, with one line saying so: the run starts over and
its first epoch overwrites it.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pipeline.core.artifacts import atomic_write, read_stamp
from pipeline.core.errors import PipelineError
from pipeline.training.models import build_model


def _on_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _os_error(exc: Exception) -> OSError | None:
    """The operating-system error under a writer's own exception: safetensors reports it only in its message
    ("... (os error 28)"), torch.save through a file object as the RuntimeError's context."""
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found:
        return OSError(int(found[1]), os.strerror(int(found[1])))
    inner = exc.__context__
    while inner is not None and not isinstance(inner, OSError):
        inner = inner.__context__
    return inner


def _write(path: Path, save: Callable[[Path], None]) -> None:
    """atomic_write(path, save), with a full or read-only disk raised as the OSError it is, naming `path`: the CLI
    turns that into one line, where the writers' own exceptions would end in a traceback."""
    try:
        atomic_write(path, save)
    except (SafetensorError, RuntimeError) as exc:
        cause = _os_error(exc)
        if cause is None or cause.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from None


def _torch_save(obj: object, tmp: Path) -> None:
    with open(tmp, "wb") as fh:  # a file object, so that a failed write keeps its errno (as the context)
        torch.save(obj, fh)


# what torch.load and safe_open raise on missing, truncated or corrupted files
UNREADABLE = (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, SafetensorError)
LAST_TENSORS, NEXT_TENSORS, LAST_STATE = "last.safetensors", "last.next.safetensors", "last.pt"


def _tensors_epoch(path: Path) -> str | None:
    """The epoch a tensors file records, or None when it is missing or unreadable."""
    try:
        with safe_open(str(path), "pt") as fh:
            return (fh.metadata() or {}).get("epoch")
    except UNREADABLE:
        return None


def _state(run_dir: Path) -> dict | None:
    try:
        state = torch.load(Path(run_dir) / LAST_STATE, map_location="cpu", weights_only=True)
    except UNREADABLE:
        return None
    return state if isinstance(state, dict) else None


def _settle(run_dir: Path) -> None:
    """Finish or drop the next tensors a killed save left behind: renamed into place when last.pt committed
    their epoch, removed otherwise. Only after a kill is there anything to do."""
    nxt = run_dir / NEXT_TENSORS
    if not nxt.exists():
        return
    state = _state(run_dir)
    if state is not None and _tensors_epoch(nxt) == str(state.get("epoch")):
        _promote(run_dir)
    else:
        nxt.unlink()


def save_last(run_dir: Path, tensors: dict[str, torch.Tensor], state: dict, epoch: int, fingerprint: str) -> None:
    run_dir = Path(run_dir)
    _settle(run_dir)
    tensors = _on_host(tensors)
    meta = {"epoch": str(epoch), "fingerprint": fingerprint}
    _write(run_dir / NEXT_TENSORS, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    state = {**state, "epoch": epoch, "fingerprint": fingerprint}
    _write(run_dir / LAST_STATE, lambda tmp: _torch_save(state, tmp))  # the commit
    _promote(run_dir)


def _promote(run_dir: Path) -> None:
    os.replace(run_dir / NEXT_TENSORS, run_dir / LAST_TENSORS)


def load_last(run_dir: Path, fingerprint: str,
              say: Callable[[str], None] = print) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, state) of a complete checkpoint of this run, or None (nothing to resume from).

    Missing files and a pair of another config or epoch are silently not used; an unreadable file
    is reported through `say` in one line, and the run restarts instead of failing on every rerun.
    """
    run_dir = Path(run_dir)
    pt, st = run_dir / LAST_STATE, run_dir / LAST_TENSORS
    nxt = run_dir / NEXT_TENSORS
    if not (pt.exists() and (st.exists() or nxt.exists())):
        return None
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and _tensors_epoch(nxt) == str(state.get("epoch")):
            st = nxt  # killed after the commit, before the rename: the next save renames it
        with safe_open(str(st), "pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except UNREADABLE as exc:
        say(f"{run_dir}: resume state last.pt/last.safetensors unreadable ({type(exc).__name__}); "
            "training restarts from epoch 1")
        return None
    if (not isinstance(state, dict) or state.get("fingerprint") != fingerprint
            or meta.get("epoch") != str(state.get("epoch"))):
        return None
    return tensors, state


def prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def save_weights(path: Path, module: torch.nn.Module) -> None:
    state = _on_host(module.state_dict())
    _write(path, lambda tmp: save_file(state, str(tmp)))


def load_checkpoint(run_dir: Path, folds_hash: str, classes: list[str]) -> tuple[torch.nn.Module, dict]:
    """Model and metadata of a finished fold run, refused when made for another split or class list.

    Only a damaged weights file or weights of another architecture become the one-line "retrain" advice;
    any other exception is a bug and keeps its traceback.
    """
    run_dir = Path(run_dir)
    meta = read_stamp(run_dir / "best.json")
    if meta is None or not (run_dir / "best.safetensors").exists():
        raise PipelineError(f"{run_dir}: no finished training run; run `make train` first")
    if meta["folds_hash"] != folds_hash:
        raise PipelineError(f"{run_dir}/best.json: trained on another split (folds hash {meta['folds_hash']} != "
                            f"{folds_hash}); rerun `make train`")
    if meta["classes"] != classes:
        raise PipelineError(f"{run_dir}/best.json: trained for classes {meta['classes']}, competition has {classes}; "
                            "rerun `make train`")
    n_out = meta["head"]["n_out"] if meta.get("head") else len(classes)  # heads.Head: regression has one output
    model = build_model(meta["backbone"], n_out, meta["in_chans"], drop_rate=meta["drop_rate"])
    try:
        weights = load_file(str(run_dir / "best.safetensors"))
    except (SafetensorError, OSError) as exc:  # truncated or not a safetensors file
        raise PipelineError(f"{run_dir}/best.safetensors: unreadable ({type(exc).__name__}); "
                            f"delete {run_dir} and rerun `make train`") from None
    missing, unexpected = _mismatch(model, weights)
    if missing or unexpected:
        raise PipelineError(f"{run_dir}/best.safetensors: not this model's weights ({len(missing)} tensors missing, "
                            f"{len(unexpected)} unexpected or of another shape); "
                            f"delete {run_dir} and rerun `make train`")
    model.load_state_dict(weights)
    return model, meta


def _mismatch(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Names the model lacks in `weights`, and names of `weights` the model lacks or holds in another shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k, v in weights.items() if k not in own or own[k].shape != v.shape]
    return missing, unexpected
