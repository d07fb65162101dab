"""Fine-tune ImageNet ResNet50 on CIFAR-100: the seed recipe on Accelerate.

ResNet50 (ImageNet weights) + GAP -> Dense 1024 ReLU -> Dense 100, 32x32 images resized to 224 on the device,
Adam lr 1e-3, global batch 32, 10 epochs, only ``layer4`` and the head trainable. The seed notebook (Keras, one
GPU) reports 74.9% validation accuracy after 10 epochs.

    python -m cifar_dist.train                                   # one process (GPU if present, else CPU)
    accelerate launch -m cifar_dist.train                        # your default accelerate config
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m cifar_dist.train
    sbatch slurm/train.sh                                        # SLURM, several nodes, requeued on preemption
    python -m cifar_dist.train --no-cache-frozen-features             # every epoch from images, not the cache
    python -m cifar_dist.train --data-source synthetic --weights none --image-size 64 --num-epochs 2  # no network

The global batch stays 32 on any number of processes: per-device batch x processes x accumulation steps = 32.
Runs checkpoint to <output-dir>/checkpoints/ and resume by default: kill one at any moment and run the same
command again. SIGTERM/SIGUSR1 make every process stop at a step boundary, save and exit with code 75.
Metrics go to metrics.jsonl, results.md, curves.png and W&B (online when logged in, else offline).
On CUDA the frozen stages run once per image where their output fits in GPU memory (the feature cache,
cifar_dist/feature_cache.py), and the step uses fused Adam and channels_last and, with one process and no
accumulation, is one CUDA graph (from the cache) or compiled with CUDA graphs (from images; cifar_dist/speed.py);
none of that changes what is computed.
"""

from __future__ import annotations

import errno
import sys
import time

from cifar_dist.cli import TrainingStopped, exit_now, one_line_errors, parse_config

# Exit codes (the README's table).
EXIT_USER_ERROR = 2  # bad input or a busy output dir; nothing was changed
EXIT_DIVERGED = 3  # the loss became NaN or inf
EXIT_OUT_OF_MEMORY = 4  # the GPU ran out of memory; nothing was saved since the newest checkpoint
EXIT_NO_SPACE = 74  # EX_IOERR: the disk filled up; the newest complete checkpoint, if any, is intact
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal with a checkpoint saved; run the same command to resume
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report it


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, then train; every way a run ends early is one line and an exit code.

    torch, accelerate and datasets are imported only once the flags are good: --help and a mistyped flag answer
    at once.
    """
    with one_line_errors("cifar_dist.train", EXIT_USER_ERROR):
        try:  # a Ctrl-C from the first line on is one line, during the parsing and the imports too
            cfg = parse_config(argv)
            importing = time.perf_counter()
            from cifar_dist.trainer import run

            run(cfg, imports_s=time.perf_counter() - importing)  # the start-up line's "imports"
        except TrainingStopped as exc:
            print(f"cifar_dist.train: {exc}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None
        except KeyboardInterrupt:
            print("cifar_dist.train: interrupted; nothing was saved since the newest checkpoint: run the same "
                  "command to resume from it", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None
        except OSError as exc:
            if not no_space(exc):
                raise
            # Before the output dir was claimed (the trainer names what a full disk left once it was).
            print(f"cifar_dist.train: no space left on the device writing {exc.filename or 'the run'}; free some "
                  "and run the same command", file=sys.stderr)
            raise SystemExit(EXIT_NO_SPACE) from None


def no_space(exc: BaseException) -> bool:
    """A full disk or quota: the run stops with EXIT_NO_SPACE and one line on what it left."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def __getattr__(name: str):
    # The loop's names (run, TrainingStopped, ...) stay importable from here without importing torch for the
    # CLI. Dunder look-ups (the import system asks for __path__) must not pull the trainer in.
    if name.startswith("__"):
        raise AttributeError(name)
    from cifar_dist import trainer

    return getattr(trainer, name)


def cli() -> None:
    """The command (``python -m cifar_dist.train``, ``cifar-dist-train``): ``main``, then, once it has returned
    (the run ended well, its files written and closed, its tracker finished), ``cli.exit_now``. Exits with a
    code take the interpreter's own way out."""
    main()
    exit_now(0)


if __name__ == "__main__":
    cli()
