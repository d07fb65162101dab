#!/usr/bin/env bash
# A grid of cifar_dist runs as a SLURM job array, one point per array task:
#   python -m cifar_dist.sweep grid.yaml --list                  # N points, and this line with N filled in
#   sbatch --array=0-$((N-1)) slurm/sweep.sh grid.yaml /shared/sweeps/lr [cifar_dist.train flags]
#   python -m cifar_dist.compare /shared/sweeps/lr               # the table, once the tasks are done
# (python -m cifar_dist.sweep grid.yaml --submit ROOT checks the grid first, then submits exactly that.)
# logs/ must exist (--submit makes it); output is appended, so a requeued task keeps its history.
# Task i trains point i into ROOT/<point name>, in the W&B group ROOT's folder name (or $WANDB_RUN_GROUP), through
# slurm/job.sh as train.sh does: the same graceful stop on USR1, requeue and resume. The settings below are per
# point; the same OFFLINE, CACHE_DIR, GPUS_PER_NODE, MAX_REQUEUES variables as train.sh apply.
#SBATCH --job-name=cifar_dist_sweep
#SBATCH --partition=gpu
#SBATCH --time=01:00:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
set -euo pipefail
usage="usage: sbatch --array=0-N slurm/sweep.sh GRID.yaml ROOT [cifar_dist.train flags]"
GRID=${1:?$usage}
ROOT=${2:?$usage}
shift 2
: "${SLURM_ARRAY_TASK_ID:?not an array job: submit with sbatch --array=0-N}"
DIR="${CIFAR_DIST_DIR:-$SLURM_SUBMIT_DIR}"
[ -f "$DIR/slurm/job.sh" ] || { echo "cifar_dist sweep: no $DIR/slurm/job.sh: submit from the repository root," \
    "or set CIFAR_DIST_DIR=<the repository>" >&2; exit 2; }
# Every task checks the whole grid (a bad one fails here, exit 2, never requeued) and writes its point's config;
# a requeued task writes the same file again and the trainer resumes from ROOT/<point>'s checkpoint.
prepared=$("${PYTHON:-python}" -m cifar_dist.sweep "$GRID" --prepare "$ROOT" --point "$SLURM_ARRAY_TASK_ID")
WANDB_RUN_GROUP=$(sed -n 1p <<< "$prepared")
POINT_CONFIG=$(sed -n 2p <<< "$prepared")
export WANDB_RUN_GROUP
echo "cifar_dist sweep: array task $SLURM_ARRAY_TASK_ID -> $POINT_CONFIG (W&B group $WANDB_RUN_GROUP)"
exec bash "$DIR/slurm/job.sh" --config "$POINT_CONFIG" "$@"
