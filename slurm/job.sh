#!/usr/bin/env bash
# The body every cifar_dist sbatch script runs (train.sh and train_cpu.sh set the settings):
# one `accelerate launch` per node through srun, a graceful stop on SLURM's warning signal, and a requeue
# only once that stop's checkpoint is complete. Training flags are passed through: job.sh [cifar_dist flags].
set -uo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}          # SLURM_GPUS_PER_NODE may read "h100:8"
MIXED_PRECISION=${MIXED_PRECISION:-}           # empty: the trainer's --mixed-precision auto (bf16 where native)
MAX_REQUEUES=${MAX_REQUEUES:-3}
NNODES=${SLURM_NNODES:-1}
NUM_PROCESSES=$((NNODES * GPUS_PER_NODE))
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The address SLURM itself reaches the head node by (an InfiniBand name if the site set NodeAddr to one).
HEAD_ADDR=${HEAD_ADDR:-$(scontrol show node "$HEAD_NODE" -o | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')}
HEAD_ADDR=${HEAD_ADDR:-$HEAD_NODE}
PORT=${PORT:-$((15000 + SLURM_JOB_ID % 20000))}   # per job, so two jobs sharing a node do not collide

if [ "${OFFLINE:-0}" = 1 ]; then                  # compute nodes without internet (see slurm/prepare.sh)
    export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
fi
# TORCHINDUCTOR_CACHE_DIR: compiled kernels outlive the node's /tmp, so a requeued or repeated job skips most of
# the compile warm-up.
[ -n "${CACHE_DIR:-}" ] && export TORCH_HOME="$CACHE_DIR/torch" HF_HOME="$CACHE_DIR/huggingface" \
    TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$CACHE_DIR/inductor}"
[ -n "${WANDB_PROJECT:-}" ] && export WANDB_PROJECT
# torchrun (inside accelerate launch) forwards these signals to the training processes and then waits up to
# the timeout for them to save, instead of dying on SIGUSR1 or killing them after 30 s.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-300}
# Since Slurm 22.05 srun does not take --cpus-per-task from sbatch by itself; the launchers' CPUs come from it.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK

echo "cifar_dist job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) [$SLURM_JOB_NODELIST]" \
     "x $GPUS_PER_NODE process(es) = $NUM_PROCESSES, head $HEAD_ADDR:$PORT, precision ${MIXED_PRECISION:-auto}"

# Preflight: every node answers and shows its GPUs within a minute, or the job says which did not.
expected=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sort | tr '\n' ' ')
# Every srun here says --export=ALL: under `sbatch --export=NONE` a step would otherwise follow the
# SLURM_EXPORT_ENV=NONE it inherits and start without even a PATH. Single quotes: each node reports its own.
# shellcheck disable=SC2016
answered=$(timeout 60 srun --export=ALL --ntasks-per-node=1 bash -c \
    'echo "$SLURMD_NODENAME $(nvidia-smi -L 2>/dev/null | wc -l)"' | sort)
echo "$answered" | while read -r node gpus; do echo "preflight: $node sees $gpus GPU(s)"; done
missing=$(comm -23 <(echo "$expected" | tr ' ' '\n' | sed '/^$/d') <(echo "$answered" | cut -d' ' -f1))
if [ -n "$missing" ]; then
    echo "cifar_dist job: node(s) did not answer the preflight within 60 s: $missing" >&2
    exit 1
fi

STOP_MARKER="${TMPDIR:-/tmp}/cifar_dist-stopped-$SLURM_JOB_ID"   # written by rank 0, which runs on this node
rm -f "$STOP_MARKER"
# shellcheck disable=SC2317  # called by the traps below
forward() {
    echo "cifar_dist job: got SIG$1, asking training to checkpoint and stop"
    scancel --signal="$1" "$SLURM_JOB_ID"          # every process of the job's steps, not this shell
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# The launch settings travel to every node as environment variables, and the body below is one single-quoted
# script that each node expands itself: its own SLURM_NODEID as the machine rank (expanded here, in the batch
# shell, every node would be rank 0). The training flags follow it as arguments, "$@" there, word for word.
# One process runs as the task itself: accelerate's launcher for one process forwards no signal and dies of
# SIGUSR1, and the step's end would then kill the trainer before its checkpoint. Several run under torchrun
# (--multi_gpu), which forwards the signals (PET_SIGNALS_TO_HANDLE) and waits for them to save.
export NNODES NUM_PROCESSES HEAD_ADDR PORT MIXED_PRECISION
[ "$NUM_PROCESSES" -eq 1 ] && echo "cifar_dist job: one process, run as the task itself (no launcher)"
# MIXED_PRECISION goes to the trainer as its flag, before yours (a --mixed-precision of yours wins): as an
# accelerate setting, "no" would leave the trainer's auto to pick bf16.
# shellcheck disable=SC2016
srun --export=ALL --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c '
    precision=()
    [ -n "$MIXED_PRECISION" ] && precision=(--mixed-precision "$MIXED_PRECISION")
    if [ "$NUM_PROCESSES" -eq 1 ]; then
        exec "${PYTHON:-python}" -m cifar_dist.train "${precision[@]}" "$@"
    fi
    exec accelerate launch --multi_gpu --num_machines "$NNODES" --num_processes "$NUM_PROCESSES" \
        --machine_rank "$SLURM_NODEID" --main_process_ip "$HEAD_ADDR" --main_process_port "$PORT" \
        --rdzv_backend static --same_network -m cifar_dist.train "${precision[@]}" "$@"
' bash "$@" --stop-marker "$STOP_MARKER" &
SRUN=$!
# A trapped signal interrupts `wait`; keep waiting until srun itself has ended.
while :; do
    wait "$SRUN"
    status=$?
    kill -0 "$SRUN" 2>/dev/null || break
done

if [ -f "$STOP_MARKER" ]; then
    rm -f "$STOP_MARKER"
    if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
        echo "cifar_dist job: checkpoint saved; requeueing (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )) of at most $MAX_REQUEUES)"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        echo "cifar_dist job: checkpoint saved, but SLURM refused the requeue (above); submit again to continue" >&2
        exit 75
    fi
    echo "cifar_dist job: checkpoint saved, but already requeued $MAX_REQUEUES times; submit again to continue" >&2
    exit 75
fi
if [ "$status" -ne 0 ]; then
    echo "cifar_dist job: training failed with exit code $status (not requeued); the error is above" >&2
fi
exit "$status"
