#!/usr/bin/env bash
# cifar_dist on one GPU node:   sbatch slurm/train_1node.sh [cifar_dist.train flags]
#SBATCH --job-name=cifar_dist
#SBATCH --partition=gpu
#SBATCH --time=01:00:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
exec bash "${CIFAR_DIST_DIR:-$SLURM_SUBMIT_DIR}/slurm/job.sh" "$@"
