"""Scale-out on PyTorch's and Optuna's engines: real process groups, multi-node torchrun, Optuna on PostgreSQL."""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.errors import PipelineError
from pipeline.training import distributed, feeding, tuning
from pipeline.training.models import build_model

from .conftest import REPO

TORCHRUN = Path(sys.executable).with_name("torchrun")

REDUCE = textwrap.dedent("""
    import sys, torch
    import torch.distributed as dist
    from pipeline.training import distributed
    distributed.backend_for = lambda cuda: sys.argv[1]  # the group spec under test, through the real setup()
    rank, world = distributed.setup()
    assert (world, distributed.backend()) == (2, sys.argv[1]), (world, distributed.backend())
    assert distributed.reduction_device(distributed.backend()) == torch.device("cpu")
    # 2**30 + 1: a float32 tensor would round it; the counts of a long epoch must stay exact
    out = distributed.sum_across([float(rank + 1), 2.5, 2.0**30 if rank else 1.0])
    assert out == [3.0, 5.0, 2.0**30 + 1], out
    distributed.barrier()
    open(sys.argv[2] + f"/rank{rank}.txt", "w").write(repr(out))
    dist.destroy_process_group()
""")


def test_a_cuda_machine_groups_nccl_for_gpu_tensors_and_gloo_for_cpu_ones(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert distributed.backend_for(True) == "cpu:gloo,cuda:nccl" and distributed.backend_for(False) == "gloo"
    assert distributed.reduction_device("cpu:gloo,cuda:nccl") == torch.device("cpu")  # gloo takes the CPU tensor
    assert distributed.reduction_device("gloo") == torch.device("cpu")
    assert distributed.reduction_device("nccl") == torch.device("cuda", 1)  # a pure NCCL group: this rank's GPU
    assert distributed.reduction_device("cuda:nccl") == torch.device("cuda", 1)


def test_sum_across_reduces_in_a_real_two_process_group(tmp_path: Path):
    """The CUDA machine's group spec has a `cpu:gloo` part; a CPU machine can start that part (NCCL needs a GPU), so
    two processes run setup() with `cpu:gloo` and reduce through it, as rank 0 and 1 of a CUDA run reduce metrics."""
    script = tmp_path / "reduce.py"
    script.write_text(REDUCE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script), "cpu:gloo",
                          str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["[3.0, 5.0, 1073741825.0]"] * 2


@pytest.mark.parametrize("n, drop_last", [(50, True), (45, True), (13, False)])
def test_ranks_split_exactly_the_batches_one_process_trains_on(n: int, drop_last: bool):
    """Step i of two ranks at batch 8 = batch i of one process at batch 16 (the same rows), every epoch."""
    def batches(rank: int, world: int, batch: int) -> list[list[int]]:
        sampler = feeding.EpochSampler(n, 0, rank, world, drop_last)
        out = []
        for epoch, epoch_seed in enumerate((11, 12)):  # reseeded per epoch as Trainer.reseed does
            sampler.set_epoch(epoch, epoch_seed)
            rows = [i for i, _seed in sampler]
            stop = len(rows) - len(rows) % batch if drop_last else len(rows)  # as the DataLoader batches them
            out += [rows[k:k + batch] for k in range(0, stop, batch)]
        return out

    single = batches(0, 1, 16)
    shards = [batches(rank, 2, 8) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(single)  # every rank makes the same number of steps
    if drop_last:
        assert [sorted(a + b) for a, b in zip(*shards, strict=True)] == [sorted(s) for s in single]
    else:  # 13 rows: one process trains on 13, two ranks on 14 (one row twice, as DistributedSampler pads)
        assert [sorted(set(a + b)) for a, b in zip(*shards, strict=True)] == [sorted(s) for s in single]


def test_an_unreachable_storage_is_one_line_without_the_password():
    with pytest.raises(PipelineError) as err:
        tuning._storage(f"postgresql://user:secret@127.0.0.1:{_free_port()}/optuna", attempts=1)
    message = str(err.value)
    assert message.startswith("tune.storage: cannot open postgresql://user:***@127.0.0.1:") and "\n" not in message
    assert "Connection refused" in message and message.endswith("check that the database server is running and "
                                                                 "the URL is right")


def _postgres_bin() -> Path:
    """The directory of initdb/pg_ctl: PATH first, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # a link (Debian puts them in /usr/lib/postgresql/<v>/bin)
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not versions:
        pytest.fail("PostgreSQL is not installed (no initdb on PATH nor in /usr/lib/postgresql/*/bin): "
                    "`make test` installs Debian's postgresql package; or `apt-get install -y postgresql`")
    return versions[-1].parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of its own in a temporary folder (initdb, pg_ctl on a free localhost port, its unix socket in
    the same folder), stopped and removed at the end. initdb refuses root, so as root it runs as the `postgres` user
    (the Debian package creates it). A server that cannot start fails the test with its log."""
    bin_dir = _postgres_bin()
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root and there is no `postgres` user for the server (initdb refuses root); "
                        "install Debian's postgresql package, which creates it")
    root = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))  # not under pytest's tmp_path: that is root's alone
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    as_server = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user is not None else {}
    data, port = root / "data", _free_port()

    def pg(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                              cwd=root, **as_server)

    try:
        init = pg("initdb", "-D", str(data), "-U", "pipeline", "-A", "trust", "-E", "UTF8", "--no-sync")
        assert init.returncode == 0, f"initdb failed: {init.stderr[-2000:]}"
        start = pg("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
                   f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        assert start.returncode == 0, f"PostgreSQL did not start: {start.stdout[-1000:]} {start.stderr[-1000:]} {log}"
        made = pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "pipeline", "optuna")
        assert made.returncode == 0, f"createdb failed: {made.stderr[-1000:]}"
        yield f"postgresql://pipeline@127.0.0.1:{port}/optuna"
    finally:
        if (data / "postmaster.pid").exists() and pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop",
                                                      timeout=60).returncode != 0:
            try:  # pg_ctl could not stop it: the postmaster's pid is the file's first line
                os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_make_tune_workers_on_postgresql_finish_exactly_n_trials(postgres_url: str, small_digits: Path,
                                                                     tmp_path: Path):
    """`make tune JOBS=2 STORAGE=postgresql://...`: both workers run trials and the study ends with exactly
    tune.n_trials finished trials. With 3 trials and two workers in step, Optuna's own MaxTrialsCallback finishes 4."""
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n")
    overrides = (f"folds.n_splits=2 train.image_size=16 train.batch_size=32 model.backbones=[resnet10t] tune.epochs=1 "
                 f"tune.n_trials=3 tune.pruner=none tune.space={space}")
    cmd = ["make", "--no-print-directory", "-C", str(REPO), "-o", ".venv/.installed", "tune", "JOBS=2",
           f"PY={sys.executable}", f"DATA={small_digits}", "CONFIG=configs/digits.yaml", f"WORK={tmp_path / 'w'}",
           f"STORAGE={postgres_url}", f"OVERRIDES={overrides}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("tune: study '") == 2, res.stdout  # two workers joined the same study
    # read back by Optuna alone, naming the installed driver (SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3)
    study = optuna.load_study(study_name=None, storage=postgres_url.replace("postgresql:", "postgresql+psycopg2:"))
    states = [t.state for t in study.trials]
    finished = [t for t in study.trials if t.state in tuning.FINISHED]
    assert len(finished) == 3, states
    assert all(t.user_attrs.get("fail_reason", "").startswith("over budget") for t in study.trials
               if t not in finished), states  # a trial two workers created at once is turned away, not run
    assert sorted(t.number for t in study.trials if "lr" in str(t.params)) == sorted(t.number for t in finished)


def _where(data: Path, work: Path) -> list[str]:
    return ["--data", str(data), "--config", str(REPO / "configs" / "digits.yaml"), "--work", str(work)]


@pytest.mark.slow
def test_two_torchrun_nodes_train_a_fold_as_one_process_with_the_same_global_batch(small_digits: Path, tmp_path: Path):
    """`torchrun --nnodes 2` on one machine (two one-process "nodes", c10d rendezvous on localhost, gloo) against one
    process at the same global batch (2 x 8 = 16). The course's GoogLeNet has no BatchNorm and no dropout at
    model.drop_rate 0 (BatchNorm would normalise over each rank's 8 images, and SyncBatchNorm needs GPUs), so the two
    runs compute the same function of the same rows. Exact: the rows of every step (EpochSampler, tested above), the
    number of updates, the lr schedule and the validation accuracy. Within float rounding (1e-5): the weights and the
    training loss, because DDP averages two 8-image gradients where one process averages 16 in another order."""
    base = ["folds.n_splits=2", "train.folds=[0]", "train.image_size=16", "model.backbones=[d2l_googlenet]",
            "train.epochs=1", "train.augment=none", "train.mixup_alpha=0", "train.cutmix_alpha=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = _free_port()
    one = subprocess.Popen([sys.executable, "-m", "pipeline", "train", *_where(small_digits, tmp_path / "one"), *base,
                            "train.batch_size=16"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           cwd=REPO, env=env)  # at the same time as the nodes: the runs do not depend on each other
    nodes = [subprocess.Popen([str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(k),
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "scale",
                               "-m", "pipeline", "train", *_where(small_digits, tmp_path / "two"), *base,
                               "train.batch_size=8"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
             for k in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    one_out = one.communicate(timeout=600)[0]
    assert one.returncode == 0, one_out[-2000:]
    assert all(p.returncode == 0 for p in nodes), "\n".join(o[-2000:] for o in outs)
    assert sum("train: distributed over 2 processes (gloo)" in o for o in outs) == 1  # rank 0 alone prints
    runs = {name: tmp_path / name / "runs" / "d2l_googlenet" / "fold0" for name in ("one", "two")}
    hist = {name: pd.read_csv(run / "history.csv") for name, run in runs.items()}
    a, b = (load_file(str(run / "best.safetensors")) for run in runs.values())
    torch.manual_seed(42 * 1000 + 0)  # train.seed * 1000 + fold, as pipeline/stages/train.py seeds the initial weights
    init = build_model("d2l_googlenet", 10, 1).state_dict()
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    assert a.keys() == b.keys() and max(diffs.values()) < 1e-5 < moved, (max(diffs.items(), key=lambda d: d[1]), moved)
    assert hist["one"]["lr"].tolist() == hist["two"]["lr"].tolist()  # same updates, same schedule
    assert hist["one"]["val_accuracy"].tolist() == hist["two"]["val_accuracy"].tolist()
    assert np.allclose(hist["one"]["train_loss"], hist["two"]["train_loss"], rtol=0, atol=1e-5), hist
