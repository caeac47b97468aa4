"""Scale-out on PyTorch's and Optuna's engines: real process groups, multi-node torchrun, Optuna on PostgreSQL."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from pipeline import distributed

from .conftest import REPO

TORCHRUN = Path(sys.executable).with_name("torchrun")

REDUCE = textwrap.dedent("""
    import sys, torch
    import torch.distributed as dist
    from pipeline import distributed
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
