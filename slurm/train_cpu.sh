#!/usr/bin/env bash
# cifar_dist on CPU nodes, one process per node over gloo: a smoke test of a cluster's SLURM set-up.
#   sbatch slurm/train_cpu.sh --data-source synthetic --weights none --image-size 32 --num-epochs 1 \
#       --output-dir outputs/smoke
# GPUS_PER_NODE (processes per node; no GPU is needed) and MIXED_PRECISION default to 1 and no here, not to
# what SLURM allocated and auto: GPUS_PER_NODE=2 sbatch slurm/train_cpu.sh ... runs two processes per node.
#SBATCH --job-name=cifar_dist_cpu
#SBATCH --time=00:30:00
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --output=%x-%j.out                # in the submission directory: no logs/ needed
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
export GPUS_PER_NODE=${GPUS_PER_NODE:-1} MIXED_PRECISION=${MIXED_PRECISION:-no}
JOB_SH="${CIFAR_DIST_DIR:-$SLURM_SUBMIT_DIR}/slurm/job.sh"
[ -f "$JOB_SH" ] || { echo "cifar_dist job: no $JOB_SH: submit from the repository root, or set" \
    "CIFAR_DIST_DIR=<the repository>" >&2; exit 2; }
exec bash "$JOB_SH" "$@"
