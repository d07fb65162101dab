#!/usr/bin/env bash
# cifar_dist's speed figures on one GPU node:   sbatch slurm/bench.sh
# The one-process benchmark with the compute floor and the real trainer end to end (10 epochs, 50,000 + 10,000
# synthetic images, with default flags and from images), then the communication cost at each world size
# up to the node's GPU count. Writes logs/bench-<job>-*.json; logs/ must exist before sbatch (SLURM opens the
# --output file before this script runs).
#SBATCH --job-name=cifar_dist_bench
#SBATCH --partition=gpu
#SBATCH --time=00:30:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
cd "${CIFAR_DIST_DIR:-${SLURM_SUBMIT_DIR:-.}}"
python="${PYTHON:-python}"
job="${SLURM_JOB_ID:-local}"
mkdir -p logs
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
"$python" -m cifar_dist.bench --end-to-end --json "logs/bench-$job-1gpu.json"
n=2
while [ "$n" -le "$gpus" ]; do
    "$python" -m torch.distributed.run --standalone --nproc_per_node "$n" -m cifar_dist.bench --variants ddp \
        --no-floor --json "logs/bench-$job-ddp-x$n.json"
    n=$((n * 2))
done
