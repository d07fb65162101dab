"""The preflight over real gloo processes: a late process is named, not waited for."""

import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from cifar_dist.config import UserError
from cifar_dist.preflight import preflight

pytestmark = pytest.mark.multiprocess


def _worker(rank: int, init_file: str, out_dir: str, late_rank: int | None):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    if rank == late_rank:
        time.sleep(4)
    try:
        message = preflight(2, processes_per_node=1, timeout_s=1.5)
    except UserError as exc:
        message = f"UserError: {exc}"
    with open(f"{out_dir}/{rank}.txt", "w") as f:
        f.write(message)


def run(tmp_path, late_rank):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), late_rank), nprocs=2)
    return [(tmp_path / f"{r}.txt").read_text() for r in range(2)]


def test_all_processes_check_in(tmp_path):
    first, _ = run(tmp_path, late_rank=None)
    assert first.startswith("preflight: 2 processes on 1 node(s) (")


def test_a_process_that_does_not_arrive_is_named(tmp_path):
    first, _ = run(tmp_path, late_rank=1)
    assert first.startswith("UserError: preflight: not every process joined within 2 s: rank 1 (node 1 of the job)")
