"""cifar_dist.sweep as a job array on the real SLURM test cluster, one point preempted, requeued and resumed,
then in compare. (The SLURM tests live in test_slurm*.py files, which run in one pytest-xdist worker.)"""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_sweep import GRID, compare_rows, sweep, write
from wandb_log import read_records

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def array_states(cluster, job: int) -> list[dict]:
    from slurm_cluster import parse_scontrol

    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=cluster.subprocess_env(),
                         capture_output=True, text=True, timeout=30, check=False).stdout
    return [parse_scontrol(line) for line in out.splitlines() if line.strip()]


@pytest.mark.slurm
def test_slurm_job_array_sweep_with_a_preempted_point(slurm_cluster, test_env, tmp_path):
    # A checkpoint every 3 steps: task 0 is told to stop as it starts training, stops at one and must requeue.
    # Two epochs (16 steps): the signal's way through SLURM has seconds to land before the last step.
    grid = write(tmp_path / "g.yaml", GRID.replace("checkpoint_every_steps: 0", "checkpoint_every_steps: 3")
                 .replace("num_epochs: 1", "num_epochs: 2") + "tracker: wandb\n")
    root = tmp_path / "sweep"
    # The user's environment as sbatch passes it on; on this CPU cluster one process per point, no GPU, fp32.
    env = {**test_env, **slurm_cluster.env, "PATH": f"{Path(sys.executable).parent}:{test_env['PATH']}",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "GPUS_PER_NODE": "1", "MIXED_PRECISION": "no"}
    env.pop("WANDB_RUN_GROUP", None)
    # slurm/sweep.sh asks for a GPU partition; these options make the same script fit the CPU test nodes.
    proc = sweep(env, grid, "--submit", root, "--", "--partition=debug", "--gpus-per-node=0", "--cpus-per-task=1",
                 f"--output={tmp_path}/task-%a.out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    job = int(proc.stdout.split("job array ")[1].split(":")[0])
    deadline = time.monotonic() + 600
    # Signalled once task 0's training begins (its start-up line), so that the stop lands on a checkpoint (every
    # 3 steps), not after the last step (a stop there finishes the run instead: nothing to requeue).
    log = tmp_path / "task-0.out"
    while not (log.exists() and "start-up: " in log.read_text()):
        assert time.monotonic() < deadline, (array_states(slurm_cluster, job), slurm_cluster.log_tail())
        time.sleep(0.05)
    task0 = next(s for s in array_states(slurm_cluster, job) if s.get("ArrayTaskId") == "0")
    slurm_cluster.signal_batch(int(task0["JobId"]), "USR1")  # what --signal=B:USR1@180 does before the limit
    while True:
        states = sorted(array_states(slurm_cluster, job), key=lambda s: s.get("ArrayTaskId", ""))
        if len(states) == 2 and all(s.get("JobState") in FINAL for s in states):
            break
        assert time.monotonic() < deadline, (states, slurm_cluster.log_tail())
        time.sleep(0.5)
    logs = {p.name: p.read_text() for p in tmp_path.glob("task-*.out")}
    assert [(s["JobState"], s["Restarts"]) for s in states] == [("COMPLETED", "1"), ("COMPLETED", "0")], logs
    assert "cifar_dist sweep: array task 0 -> " in logs["task-0.out"]
    assert "requeueing (restart 1 of at most 3)" in logs["task-0.out"]
    assert f"resuming from {root / 'lr=0.0003' / 'checkpoints'}" in logs["task-0.out"]
    rows = compare_rows(test_env, root)
    assert {name: r[2] for name, r in rows.items()} == {"lr=0.0003": "finished, resumed", "lr=0.001": "finished"}
    # One W&B group for the sweep (the root's folder name), each point's runs named after it: the preempted
    # point's two segments log to one run.
    for point, segments in (("lr=0.0003", 2), ("lr=0.001", 1)):
        files = sorted((root / point / "wandb").glob("offline-run-*/run-*.wandb"))
        runs = [next(r.run for r in read_records(f) if r.WhichOneof("record_type") == "run") for f in files]
        assert [(r.run_group, r.display_name) for r in runs] == [("sweep", point)] * segments
        assert len({r.run_id for r in runs}) == 1
