#!/usr/bin/env bash
# The GPU acceptance run of cifar_dist, one command: 6.9 minutes on one H100 (2026-11-27) without --end-to-end,
# 8.5 with one end-to-end run (then give --budget-s 540: a step out of time gets 15 s more to write its results):
#   - first, with --end-to-end (about 3 minutes more; raise --budget-s to match): the recipe's whole
#     workload, launch to final report, with default flags and from images (compiling from an empty
#     compile cache), ahead of the rest so that a short budget cuts the other steps, not the targets' figures;
#   - the GPU tests (tests/test_gpu.py: compiled vs eager, the whole-step graph vs eager, accumulation, no host
#     syncs, feature caches, BatchNorm counters, resume under other speed options; test_gpu_resume.py: a
#     deterministic resume bit for bit; test_gpu_memory.py: a real out-of-memory, the feature cache's fallback;
#     test_gpu_after_training.py: cifar_dist.evaluate equal to the trainer, predict agreeing with it;
#     test_gpu_fp16.py: fp16 under the loss scaler), the files side by side in a pytest-xdist worker each
#     (--test-workers);
#   - the trainer with default flags (where it fits, the feature cache and the whole step as one CUDA graph) and
#     from images (--no-cache-frozen-features: the compiled step) on synthetic data of CIFAR-100's size
#     (50,000 + 10,000 images) at 224 px, 500 steps each: images/s, time to the first steps (compile),
#     checkpoint seconds, peak GPU memory, what was compiled;
#   - the benchmark at reduced steps (python -m cifar_dist.bench --steps 20 --warmup 5);
#   - a profile of the step the feature cache runs (one CUDA graph of eager kernels): host or device, which
#     sets the pace (cifar_dist/step_profile.py);
#   - the whole step as one CUDA graph (--whole-step-graph, cifar_dist/graphed_step.py), with eager and with
#     inductor's kernels, and from the feature cache, to set beside the compiled steps.
# Writes gpu_check.json, gpu_check.md (the tables, with card, torch version and command) and gpu_check.log into
# $OUT when it is set, else ./gpu_check_out. A step that fails is recorded and the next one runs; the exit status
# is 1 if any failed. Extra arguments go to `python -m cifar_dist.gpu_check` (see its --help).
# End to end alone, several runs (each took 55 to 100 s on the H100 of 2026-11-27, the first with an empty
# compile cache):
#   scripts/gpu_check.sh --budget-s 400 --skip data train_default train_images gpu_tests bench profile graphed \
#     --end-to-end --e2e-args="--variants eval_cached --steps 5 --warmup 2 --no-floor --no-checkpoint \
#     --end-to-end --e2e-runs default images graphed_cached"
#
# Run it from anywhere inside the checkout: it runs the package from the checkout (PYTHONPATH), not an install.
# It needs torch with CUDA, torchvision and accelerate (preinstalled on the GPU machines measured here; their
# torch, 2.11, is older than pyproject.toml's pin, which is why nothing is pip-installed), `datasets`, which is
# not there and has no network to come from, and safetensors 0.8 (an older one holds the GIL through each background
# checkpoint's write of the weights). Bring them as wheels in .whl/ at the repository root, made where pip works:
#
#     scripts/gpu_wheels.sh       # datasets and what it pins, safetensors, pytest-xdist; CPython 3.12 (.gitignore'd)
#
# and carry .whl with the checkout (57 MB, 55 of them pyarrow; --without-pyarrow where the machine's is 24+).
# This script installs them with `pip --no-index --no-deps` into a private folder ahead of the system's
# packages. W&B is not needed: the runs use --tracker none.
set -u
cd "$(dirname "$0")/.." || exit
# The folder's name must contain "site-packages": dill (which datasets fingerprints with) pickles a module from any
# other folder by value, and pyarrow's module cannot be, so every in-memory Dataset would fail to build.
SITE=${GPU_CHECK_SITE:-/tmp/cifar_dist/site-packages}
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  # Compiled to bytecode here, once, as the package below: every timed process then imports what a user's
  # installed environment imports, whether or not this machine lets Python write bytecode as it goes.
  "$PYTHON" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || echo "gpu_check: installing the wheels in .whl failed; going on with what imports" >&2
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check: no wheels in .whl (see this script's header); going on with what imports" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -m compileall -q cifar_dist > /dev/null || true
export PYTHONUNBUFFERED=1 CIFAR_DIST_GPU_CHECK_COMMAND="scripts/gpu_check.sh${*:+ $*}"
exec "$PYTHON" -m cifar_dist.gpu_check --out "${OUT:-gpu_check_out}" "$@"
