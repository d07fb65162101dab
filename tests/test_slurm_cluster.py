"""Real jobs on the single-host SLURM test cluster (tests/slurm_cluster.py): placement, signals, requeue, cleanup."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from slurm_cluster import SlurmCluster

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -u\n" + body)
    path.chmod(0o755)
    return path


def wait_for_file(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not written within {timeout}s")
        time.sleep(0.1)
    return path.read_text()


def alive(pid: int) -> bool:
    """True if pid runs (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_nodes_idle(slurm_cluster):
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env={**os.environ, **slurm_cluster.env},
                         capture_output=True, text=True, check=True).stdout
    assert sorted(line.split()[0] for line in out.splitlines()) == ["n1", "n2"], out
    assert all(line.split()[1] == "idle" for line in out.splitlines()), out


def test_two_node_job_runs_one_task_per_node(slurm_cluster, tmp_path):
    script = write_script(tmp_path / "job.sh", "srun bash -c 'echo $SLURMD_NODENAME $SLURM_NODEID'\n")
    job = slurm_cluster.sbatch(script, cwd=tmp_path,
                               sbatch_opts=["--nodes=2", "--ntasks-per-node=1", "--output=out.txt"])
    info = slurm_cluster.wait_for_state(job, FINAL, timeout=30)
    assert info["JobState"] == "COMPLETED", (info, slurm_cluster.log_tail())
    assert info["NodeList"] == "n[1-2]"
    lines = set((tmp_path / "out.txt").read_text().split("\n")) - {""}
    assert lines == {"n1 0", "n2 1"}


def test_usr1_reaches_batch_shell(slurm_cluster, tmp_path):
    # `wait` returns early when a trapped signal arrives, so the script exits right after the trap ran.
    script = write_script(tmp_path / "job.sh", (
        "trap 'echo got-usr1 >> marker' USR1\n"
        "sleep 60 &\n"
        "echo ready > ready\n"
        "wait $!\n"
        "kill %1 2>/dev/null\n"
        "echo done >> marker\n"
    ))
    job = slurm_cluster.sbatch(script, cwd=tmp_path, sbatch_opts=["--output=out.txt"])
    slurm_cluster.wait_for_state(job, {"RUNNING"}, timeout=30)
    wait_for_file(tmp_path / "ready", timeout=10)  # the trap is installed
    slurm_cluster.signal_batch(job, "USR1")
    assert wait_for_file(tmp_path / "marker", timeout=30).startswith("got-usr1")
    info = slurm_cluster.wait_for_state(job, FINAL, timeout=30)
    assert info["JobState"] == "COMPLETED", info
    assert (tmp_path / "marker").read_text() == "got-usr1\ndone\n"


def test_requeued_job_restarts_and_completes(slurm_cluster, tmp_path):
    # First run requeues itself (and sleeps so it is the requeue, not an exit, that ends it); the second run sees
    # SLURM_RESTART_COUNT=1 and succeeds. --open-mode=append keeps the first run's output.
    script = write_script(tmp_path / "job.sh", (
        'echo "start restart=${SLURM_RESTART_COUNT:-unset}"\n'
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then\n'
        "  scontrol requeue $SLURM_JOB_ID\n"
        "  sleep 60\n"
        "  exit 3\n"
        "fi\n"
        f'echo "$SLURM_RESTART_COUNT" > {tmp_path}/restart_count\n'
    ))
    job = slurm_cluster.sbatch(script, cwd=tmp_path, sbatch_opts=["--output=out.txt", "--open-mode=append",
                                                                  "--requeue"])
    info = slurm_cluster.wait_for_state(job, FINAL, timeout=60)
    assert info["JobState"] == "COMPLETED", (info, slurm_cluster.log_tail())
    assert info["Restarts"] == "1"
    assert info["ExitCode"] == "0:0"
    assert (tmp_path / "restart_count").read_text().strip() == "1"
    # slurmstepd also appends its "CANCELLED ... DUE TO JOB REQUEUE" line here.
    starts = [line for line in (tmp_path / "out.txt").read_text().splitlines() if line.startswith("start ")]
    assert starts == ["start restart=unset", "start restart=1"]


def test_stop_leaves_no_started_process(slurm_cluster, tmp_path):
    # A second cluster beside the session one: it must not clash with it, and stopping it (with a job still
    # running) must end its own daemons and job processes and nothing of the other cluster.
    cluster = SlurmCluster(tmp_path / "c2").start(timeout=60)
    try:
        pids = cluster.pids()
        assert set(pids) == {"munged", "slurmctld", "slurmd-n1", "slurmd-n2"}
        script = write_script(tmp_path / "job.sh", "echo $$ > job.pid\nsleep 300\n")
        job = cluster.sbatch(script, cwd=tmp_path, sbatch_opts=["--output=out.txt"])
        cluster.wait_for_state(job, {"RUNNING"}, timeout=30)
        job_pid = int(wait_for_file(tmp_path / "job.pid", timeout=10))
    finally:
        cluster.stop()
    assert [name for name, pid in pids.items() if alive(pid)] == []
    assert not alive(job_pid)
    assert cluster.pids() == {}
    cluster.stop()  # idempotent
    assert all(alive(pid) for pid in slurm_cluster.pids().values())
