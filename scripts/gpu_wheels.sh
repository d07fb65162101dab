#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh on a GPU machine without network: what cifar_dist needs beyond the torch,
# torchvision and accelerate preinstalled there, for CPython 3.12 on x86-64 Linux, into .whl/ at the repository
# root. That is `datasets` and the packages it pins or caps, which such an image may lack or hold in other
# versions: dill, multiprocess, fsspec, and pyarrow (datasets wants >= 24; 55 MB of the 57); and safetensors 0.8,
# whose writes let the GIL go (an older one would hold it through every background checkpoint's weights). Run it
# where pip reaches PyPI; the versions are those the package is tested with. Also pytest-xdist and execnet, so
# that the GPU tests' files run side by side, a worker each.
#
#     scripts/gpu_wheels.sh                    # all eight
#     scripts/gpu_wheels.sh --without-pyarrow  # 1.8 MB, when the machine's own pyarrow is 24 or newer
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 safetensors==0.8.0
          pytest-xdist==3.8.0 execnet==2.1.2)
[ "${1:-}" = "--without-pyarrow" ] || PACKAGES+=(pyarrow==26.0.1)
"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}"
du -sh .whl
