#!/usr/bin/env bash
# cifar_dist on several GPU nodes:   sbatch slurm/train.sh [cifar_dist.train flags]
# Submit from the repository root with the environment that has cifar_dist installed activated.
# ---- settings: edit here, or override on the command line (sbatch --nodes=4 ...) ----
#SBATCH --job-name=cifar_dist
#SBATCH --partition=gpu
#SBATCH --time=01:00:00
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1              # one launcher per node; it starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=logs/%x-%j.out          # logs/ must exist; errors go there too, in order with the output
#SBATCH --open-mode=append               # a requeued job keeps its history
#SBATCH --requeue
#SBATCH --signal=B:USR1@180              # warn the batch shell 3 minutes before the time limit
# GPUS_PER_NODE=8                        # default: what SLURM allocated
# OUTPUT_DIR, W&B: pass --output-dir /shared/runs/NAME --wandb-project NAME as flags
# OFFLINE=1 CACHE_DIR=/shared/cache     # compute nodes without internet (after slurm/prepare.sh)
# MAX_REQUEUES=3                         # stop requeueing after this many restarts
# -----------------------------------------------------------------------------------
# sbatch runs a copy of this file, so the body is found from the submission directory.
JOB_SH="${CIFAR_DIST_DIR:-$SLURM_SUBMIT_DIR}/slurm/job.sh"
[ -f "$JOB_SH" ] || { echo "cifar_dist job: no $JOB_SH: submit from the repository root, or set" \
    "CIFAR_DIST_DIR=<the repository>" >&2; exit 2; }
exec bash "$JOB_SH" "$@"
