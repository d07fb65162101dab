"""SyncBatchNorm2d over real gloo processes equals plain BatchNorm2d on the whole batch in one process."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cifar_dist.model import SyncBatchNorm2d

pytestmark = pytest.mark.multiprocess


def _make_inputs():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3) * 3 + 5  # a large mean, where a naive E[x^2]-E[x]^2 loses precision
    weights = torch.randn(8, 4, 3, 3)  # a non-uniform loss so the gradient through the statistics matters
    return x, weights


def _with_history(bn):
    # Running statistics as after some training, and inputs whose mean is large against their spread.
    bn.running_mean.copy_(torch.tensor([4.0, -2.0, 0.5, 30.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0, 9.0]))
    return bn


def _reference():
    x, w = _make_inputs()
    bn = _with_history(nn.BatchNorm2d(4))
    x = x.clone().requires_grad_(True)
    y = bn(x)
    (y * w).sum().backward()
    return y.detach(), x.grad, bn.weight.grad, bn.running_mean, bn.running_var


def _worker(rank: int, world: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, w = _make_inputs()
    shard = slice(rank * 4, rank * 4 + 4)
    bn = _with_history(SyncBatchNorm2d(4))
    xs = x[shard].clone().requires_grad_(True)
    y = bn(xs)
    (y * w[shard]).sum().backward()
    # DDP would average the affine parameters' gradients; sum here since the reference loss is a sum.
    dist.all_reduce(bn.weight.grad)
    torch.save({"y": y.detach(), "x_grad": xs.grad, "w_grad": bn.weight.grad, "rm": bn.running_mean,
                "rv": bn.running_var}, f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_sync_batchnorm_matches_full_batch_batchnorm(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    y, x_grad, w_grad, rm, rv = _reference()
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]), x_grad, rtol=1e-4, atol=1e-5)
    for p in parts:
        torch.testing.assert_close(p["w_grad"], w_grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p["rm"], rm, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(p["rv"], rv, rtol=1e-5, atol=1e-6)


def test_single_process_falls_back_to_plain_batchnorm():
    x, _ = _make_inputs()
    sync, plain = SyncBatchNorm2d(4), nn.BatchNorm2d(4)
    torch.testing.assert_close(sync(x), plain(x))
