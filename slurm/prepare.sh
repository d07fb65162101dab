#!/usr/bin/env bash
# Run once on a login node with internet: cache CIFAR-100 and the ImageNet weights where compute nodes
# without internet will find them.   slurm/prepare.sh /shared/cache   then   OFFLINE=1 CACHE_DIR=/shared/cache sbatch ...
set -euo pipefail
CACHE_DIR=${1:?usage: slurm/prepare.sh CACHE_DIR}
export TORCH_HOME="$CACHE_DIR/torch" HF_HOME="$CACHE_DIR/huggingface"
python - <<'PY'
import datasets
from torchvision.models import ResNet50_Weights

for name in ("IMAGENET1K_V1", "IMAGENET1K_V2"):
    ResNet50_Weights[name].get_state_dict(progress=True, check_hash=True)
dataset = datasets.load_dataset("uoft-cs/cifar100")
print({split: len(ds) for split, ds in dataset.items()})
PY
echo "cached in $CACHE_DIR; train with: OFFLINE=1 CACHE_DIR=$CACHE_DIR sbatch slurm/train.sh ..."
