"""The real slurm/train_cpu.sh submitted with sbatch to a real two-node SLURM cluster on this machine.

Each node runs one gloo training process; the job script is the one users submit (slurm/job.sh behind it).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cifar_dist.runs import load_config
from conftest import REPO, TINY, run_train
from wandb_log import config, run_id, run_record

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "slurm" / "train_cpu.sh"


@pytest.fixture()
def job_env(test_env, slurm_cluster):
    # sbatch passes the submitting environment on: the venv's accelerate, the test caches, offline W&B.
    path = f"{Path(sys.executable).parent}:{test_env['PATH']}"
    return {**test_env, **slurm_cluster.env, "PATH": path, "CIFAR_DIST_DIR": str(REPO), "WANDB_MODE": "offline",
            "WANDB_SILENT": "true"}


def submit(cluster, env, tmp_path: Path, args: list[str], sbatch_opts: tuple[str, ...] = ()) -> tuple[int, Path]:
    log = tmp_path / "job.out"
    job = cluster.sbatch(SCRIPT, *args, cwd=tmp_path, extra_env=env, sbatch_opts=[f"--output={log}", *sbatch_opts])
    return job, log


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not appear within {timeout} s"
        time.sleep(0.2)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# A flag value that any re-splitting, re-quoting, expansion or globbing on its way through sbatch, the batch
# shell and each node's shell would change: two spaces, both quotes, a variable each node has, a glob that
# matches job.out in the job's directory.
RUN_NAME = """a  b's "run" $SLURM_NODEID *"""


def test_two_node_job_trains_to_completion_with_flags_word_for_word(slurm_cluster, job_env, tmp_path):
    out = tmp_path / "out"
    job, log = submit(slurm_cluster, job_env, tmp_path, [*TINY, "--num-epochs", "1", "--output-dir", str(out),
                                                         "--tracker", "wandb", "--run-name", RUN_NAME])
    state = slurm_cluster.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED", text[-3000:]
    assert load_config(out / "config.yaml").tracking.run_name == RUN_NAME
    [segment] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_record(segment).display_name == RUN_NAME
    assert config(segment)["tracking"]["run_name"] == RUN_NAME
    assert "2 node(s)" in text and "x 1 process(es) = 2" in text
    assert "preflight: n1 sees" in text and "preflight: n2 sees" in text
    assert "preflight: 2 processes on 2 node(s) (n1: 1, n2: 1)" in text
    assert "global 32 = 16 per device x 2 processes x 1 accumulation steps" in text
    assert [r["step"] for r in records(out)] == [8]
    assert (out / "model.safetensors").exists()


def test_preempted_job_requeues_resumes_and_ends_like_an_uninterrupted_one(slurm_cluster, job_env, test_env,
                                                                          tmp_path):
    args = [*TINY, "--num-epochs", "3", "--checkpoint-every-steps", "0", "--tracker", "wandb"]
    out = tmp_path / "out"
    job, log = submit(slurm_cluster, job_env, tmp_path, [*args, "--output-dir", str(out)])
    # Signalled once epoch 1's record is written: the stop lands on a check (every 10 steps) before the last of
    # the 24 steps, at step 10 unless the signal's way through SLURM takes longer than the two steps to it.
    first_record = out / "metrics.jsonl"
    wait_until(first_record.exists, timeout=300, what=str(first_record))
    slurm_cluster.signal_batch(job, "USR1")  # what --signal=B:USR1@N does before the time limit
    state = slurm_cluster.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED", text[-3000:]
    assert state["Restarts"] == "1"
    assert "got SIGUSR1, asking training to checkpoint and stop" in text
    step = int(re.search(r"stopped by SIGUSR1 at step (\d+)", text)[1])
    assert "requeueing (restart 1 of at most 3)" in text
    assert f"cifar_dist job {job} (restart 1)" in text
    assert f"resuming from {out / 'checkpoints' / f'step-{step:08d}'}" in text
    # One W&B run: both segments of the job log under the same id.
    segments = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(segments) == 2 and run_id(segments[0]) == run_id(segments[1])
    # The same final weights as the same two-process run never interrupted.
    reference = tmp_path / "reference"
    run_train({**test_env, "WANDB_MODE": "offline"}, [*args, "--output-dir", str(reference)], num_processes=2)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["val_acc"] for r in records(out)] == [r["val_acc"] for r in records(reference)]


def test_failed_job_is_not_requeued(slurm_cluster, job_env, tmp_path):
    job, log = submit(slurm_cluster, job_env, tmp_path, [*TINY, "--num-epochs", "0",
                                                         "--output-dir", str(tmp_path / "out")])
    state = slurm_cluster.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    text = log.read_text()
    assert state["JobState"] == "FAILED" and state["Restarts"] == "0", text[-3000:]
    assert "cifar_dist.train: error: --num-epochs must be positive, got 0" in text
    assert "training failed with exit code" in text and "(not requeued)" in text


def test_a_one_process_job_that_slurm_will_not_requeue_stops_with_its_checkpoint_and_says_so(slurm_cluster, job_env,
                                                                                               tmp_path):
    # One node, one process: the trainer runs as the task itself, so SLURM's signal reaches it, not a launcher
    # that would die of it. --no-requeue: the stop's checkpoint is saved, the requeue refused, and the job fails
    # with 75 saying so, rather than reporting success with the run unfinished and nothing queued.
    out = tmp_path / "out"
    job, log = submit(slurm_cluster, job_env, tmp_path, [*TINY, "--num-epochs", "3", "--output-dir", str(out)],
                      ("--nodes=1", "--no-requeue"))  # 24 steps: the stop lands before the last
    first_record = out / "metrics.jsonl"
    wait_until(first_record.exists, timeout=300, what=str(first_record))
    slurm_cluster.signal_batch(job, "USR1")
    state = slurm_cluster.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
    text = log.read_text()
    assert "cifar_dist job: one process, run as the task itself (no launcher)" in text
    assert "stopped by SIGUSR1 at step " in text, text[-3000:]
    assert "checkpoint saved, but SLURM refused the requeue (above); submit again to continue" in text
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("FAILED", "75:0", "0"), text[-3000:]
    assert list((out / "checkpoints").glob("step-*"))



def test_a_job_submitted_away_from_the_repository_says_where_to_submit_from(slurm_cluster, job_env, tmp_path):
    # sbatch runs a copy of the script, which finds job.sh from the submission directory (or CIFAR_DIST_DIR).
    env = {k: v for k, v in job_env.items() if k != "CIFAR_DIST_DIR"}
    job, log = submit(slurm_cluster, env, tmp_path, [*TINY, "--output-dir", str(tmp_path / "out")])
    state = slurm_cluster.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=120)
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("FAILED", "2:0", "0")
    assert log.read_text().strip() == (f"cifar_dist job: no {tmp_path}/slurm/job.sh: submit from the repository "
                                       "root, or set CIFAR_DIST_DIR=<the repository>")


@pytest.mark.parametrize("env, shown", [({}, "1 no"), ({"GPUS_PER_NODE": "2", "MIXED_PRECISION": "bf16"}, "2 bf16")])
def test_train_cpu_sh_defaults_processes_and_precision_and_takes_yours(tmp_path, env, shown):
    # It set GPUS_PER_NODE=1 and MIXED_PRECISION=no whatever the environment said. The script itself, with a
    # job.sh in its place that prints what it is handed (no cluster needed).
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "job.sh").write_text('echo "$GPUS_PER_NODE $MIXED_PRECISION $*"\n')
    base = {k: v for k, v in os.environ.items() if k not in ("GPUS_PER_NODE", "MIXED_PRECISION")}
    proc = subprocess.run(["bash", str(SCRIPT), "--num-epochs", "1"],
                          env={**base, **env, "CIFAR_DIST_DIR": str(tmp_path)}, capture_output=True, text=True,
                          check=True)
    assert proc.stdout == f"{shown} --num-epochs 1\n"
