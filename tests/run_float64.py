"""The real trainer with float64 parameters, for tests that compare runs far below float32 rounding.

    python tests/run_float64.py [flags]    or    accelerate launch ... tests/run_float64.py [flags]
"""

import sys

import torch

from cifar_dist.cli import parse_config
from cifar_dist.trainer import run

if __name__ == "__main__":
    run(parse_config(sys.argv[1:]), dtype=torch.float64)
