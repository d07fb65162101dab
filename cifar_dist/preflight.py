"""Before any work: every process answers, or the run names the ones that did not, instead of hanging.

A node that never starts its processes, or a wrong network interface, otherwise shows up as a collective that
waits until the backend's timeout (10 minutes for NCCL) with no word about which node is at fault.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch.distributed as dist

from cifar_dist.config import UserError


def node_name() -> str:
    # On SLURM every node of a job can report the same hostname (containers, test clusters); the node name is
    # what the scheduler and its users call it.
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def preflight(num_processes: int, processes_per_node: int, timeout_s: float = 60.0) -> str:
    """Check every process checks in within ``timeout_s`` and say where they run; raises UserError.

    Uses the rendezvous key-value store rather than a collective, so the main process can see who is missing
    instead of just waiting. Ranks are laid out node after node, so a missing rank's node is known even if it
    never said anything.
    """
    if num_processes == 1 or not dist.is_initialized():
        return f"preflight: 1 process on {node_name()}"
    start = time.perf_counter()
    store = dist.distributed_c10d._get_default_store()
    keys = [f"cifar_dist/preflight/{r}" for r in range(num_processes)]
    result_key = "cifar_dist/preflight/result"
    store.set(keys[dist.get_rank()], node_name())
    if dist.get_rank() == 0:
        deadline = time.monotonic() + timeout_s
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.05)
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        store.set(result_key, ",".join(map(str, missing)))
    else:
        store.wait([result_key], timedelta(seconds=timeout_s + 60))
    missing = [int(r) for r in store.get(result_key).decode().split(",") if r]
    if missing:
        where = ", ".join(f"rank {r} (node {r // processes_per_node} of the job)" for r in missing)
        raise UserError(f"preflight: not every process joined within {timeout_s:.0f} s: {where}; check that "
                        "node, its network interface (NCCL_SOCKET_IFNAME) and the job's log")
    per_node: dict[str, int] = {}
    for key in keys:
        name = store.get(key).decode()
        per_node[name] = per_node.get(name, 0) + 1
    nodes = ", ".join(f"{name}: {count}" for name, count in per_node.items())
    return (f"preflight: {num_processes} processes on {len(per_node)} node(s) ({nodes}) checked in within "
            f"{time.perf_counter() - start:.1f} s")


def main_first(accelerator, load):
    """``load()`` on the main process first (it downloads and decodes into the shared caches), then on the
    others, which reuse what it left. A UserError in it (a bad data source or weights file) stops every process:
    the main process with its one line, the others silently with the same exit code. Under accelerate's
    main_process_first the others waited at its barrier for a main process that had stopped, then failed with
    tracebacks of their own."""
    from accelerate.utils import broadcast_object_list

    failed, loaded = [None], None
    if accelerator.is_main_process:
        try:
            loaded = load()
        except UserError as exc:
            failed[0] = str(exc)
    if accelerator.num_processes > 1:
        broadcast_object_list(failed)  # the others wait here, as at main_process_first's barrier
    if failed[0] is not None:
        if accelerator.is_main_process:
            raise UserError(failed[0])
        raise SystemExit(2)  # train.EXIT_USER_ERROR; the main process says why
    return loaded if accelerator.is_main_process else load()

