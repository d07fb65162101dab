"""How the trainer's, the evaluation's and the predictions' commands exit once their work is done
(cifar_dist.cli.exit_now): what a normal exit runs first still runs, the interpreter's teardown does not, and a
thread with work left is waited for.

Each case is a real Python process; the package's command-line module imports neither torch nor datasets. The
last case trains through the console script pip installed (pyproject.toml's cifar-dist-train), which exits so.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY

PROLOGUE = """
import atexit, sys, threading, time
from pathlib import Path
from cifar_dist.cli import exit_now
out = Path(sys.argv[1])

class TornDown:  # its __del__ runs when the interpreter tears its modules down, and only then
    def __del__(self):
        print("torn down", flush=True)

kept = TornDown()
atexit.register(lambda: (out / "atexit").write_text("ran"))
print("buffered output", end="")  # a pipe: block-buffered until flushed
"""


def run(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROLOGUE + code, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_exit_now_runs_the_exit_handlers_and_flushes_but_skips_the_teardown(tmp_path):
    proc = run("exit_now(0)", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "buffered output"  # flushed; and no "torn down": the teardown was skipped
    assert (tmp_path / "atexit").read_text() == "ran"


def test_a_normal_exit_tears_down(tmp_path):  # the contrast that makes the assertion above mean something
    proc = run("sys.exit(0)", tmp_path)
    assert proc.returncode == 0 and proc.stdout == "buffered outputtorn down\n"


def test_exit_now_leaves_by_the_normal_way_while_a_thread_still_has_work(tmp_path):
    proc = run("""
def write_late():
    time.sleep(0.5)
    (out / "late").write_text("written")

threading.Thread(target=write_late).start()
exit_now(0)
""", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "late").read_text() == "written" and (tmp_path / "atexit").read_text() == "ran"


@pytest.mark.slow
def test_the_console_script_trains_and_exits_this_way(test_env, tmp_path):
    script = Path(sys.executable).with_name("cifar-dist-train")  # what pip installed from pyproject.toml
    out = tmp_path / "out"
    proc = subprocess.run([str(script), *TINY, "--num-epochs", "1", "--max-steps", "2", "--output-dir", str(out)],
                          env=test_env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 1 (partial, 2 steps): train loss" in proc.stdout  # printed, and flushed before the exit
    assert (out / "model.safetensors").is_file() and (out / "results.md").is_file()


@pytest.mark.slow
def test_the_predict_console_script_writes_every_row_and_exits_with_its_status(test_env, tmp_path):
    # cifar-dist-predict (predict:cli) leaves through exit_now too, with main's status: 1 for an unreadable image.
    import numpy as np
    from PIL import Image

    from cifar_dist.checkpoint import save_model
    from cifar_dist.config import make_config, save_config
    from cifar_dist.model import build_model

    cfg = make_config(data_source="synthetic", image_size=32, weights="none")
    save_config(cfg, tmp_path / "config.yaml")
    save_model(build_model(cfg.model, 32), tmp_path / "model.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for k in range(3):
        Image.fromarray(pixels).save(images / f"{k}.png")
    (images / "1.png").write_bytes(b"not a PNG")
    script = Path(sys.executable).with_name("cifar-dist-predict")
    proc = subprocess.run([str(script), str(tmp_path), str(images)], env=test_env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = proc.stdout.splitlines()  # written to a pipe, so block-buffered until exit_now flushed it
    assert rows[0].startswith("file,") and [r.split(",")[0] for r in rows[1:]] == [str(images / "0.png"),
                                                                                  str(images / "2.png")]
    assert "cifar_dist.predict: 2 of 3 images predicted" in proc.stderr
