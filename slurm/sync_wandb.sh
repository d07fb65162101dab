#!/usr/bin/env bash
# Upload the offline W&B runs of every job under a folder (run on a login node, which has internet).
#   slurm/sync_wandb.sh /shared/runs            # safe to repeat: runs already uploaded are skipped
set -euo pipefail
exec python -m cifar_dist.sync "$@"
