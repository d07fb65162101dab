"""Shared fixtures. Nothing here touches the network: the hub is forced offline, and the ImageNet weights file
is a stand-in written where torchvision's loader looks for its download (see ``imagenet_standin``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from slurm_cluster import (
    free_ports,
    slurm_cluster,  # noqa: F401 (a session fixture: a real two-node SLURM cluster)
)

REPO = Path(__file__).resolve().parents[1]
CPU_2PROC = REPO / "accelerate_configs" / "cpu_2proc.yaml"
FLOAT64 = str(REPO / "tests" / "run_float64.py")  # the real trainer with float64 parameters
V1_FILE = "resnet50-0676ba61.pth"  # basename of torchvision's ResNet50_Weights.IMAGENET1K_V1 url


@pytest.fixture(scope="session")
def test_env(tmp_path_factory) -> dict[str, str]:
    """Environment for every run: private caches, offline hub, a planted IMAGENET1K_V1 file in TORCH_HOME."""
    root = tmp_path_factory.mktemp("env")
    torch_home = root / "torch"
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(imagenet_standin(), checkpoints / V1_FILE)
    # Nothing of the outer W&B set-up (a WANDB_DIR would move runs out of <output-dir>/wandb) or proxies (the
    # tests' refused connections must be refused here, not by a proxy).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WANDB_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update({
        "TORCH_HOME": str(torch_home),
        "HF_HOME": str(root / "hf"),
        "HF_DATASETS_CACHE": str(root / "hf" / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        # The checkout under test, not wherever the venv's editable install points (another checkout, or a
        # worktree's main): the trainer, run_float64.py and the console scripts are imported in subprocesses.
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "TQDM_DISABLE": "1",
        # torchrun kills workers this long after forwarding a stop signal; its 30 s default is short for two
        # processes saving on a busy 2-core machine (slurm/job.sh sets the same)
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300",
    })
    return env


def imagenet_standin() -> dict[str, torch.Tensor]:
    """A ResNet50 state dict shaped like the ImageNet file: seeded random convolutions, with BatchNorm running
    statistics measured on synthetic CIFAR images (at the sizes the tests use) as a trained network's would be.
    Left at their init values (mean 0, var 1) the frozen trunk's activations grow block after block, and
    training on top of it becomes so ill-conditioned that float rounding decides the result."""
    from torchvision.models import resnet50

    from cifar_dist.config import DataConfig
    from cifar_dist.data import build_splits
    from cifar_dist.model import Preprocess

    torch.manual_seed(1234)
    model = resnet50().train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batches
    images = build_splits(DataConfig(data_source="synthetic", synthetic_train_samples=128,
                                     synthetic_eval_samples=1), seed=99).train.images
    with torch.no_grad():
        for size in (32, 64):
            model(Preprocess(size)(images))
    return model.state_dict()


@pytest.fixture(scope="module")
def initial_weights(test_env) -> dict[str, torch.Tensor]:
    """The planted ImageNet stand-in: every run's starting backbone weights."""
    return torch.load(Path(test_env["TORCH_HOME"]) / "hub" / "checkpoints" / V1_FILE, weights_only=True)


def records(out: Path) -> list[dict]:
    """A run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def update_difference(a: Path, b: Path, initial: dict, prefixes: tuple[str, ...] = ("layer4.",)) -> float:
    """|w_a - w_b| / |w_a - w_0| over the trained weights under ``prefixes``: how far apart two runs' training
    moved them. Weights without an initial value (the head) are measured from zero."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    keys = [k for k in wa if k.startswith(prefixes) and ".running_" not in k and "num_batches" not in k]
    w0 = {k: initial.get(k, wa[k] * 0) for k in keys}
    da = torch.cat([(wa[k].double() - w0[k].double()).flatten() for k in keys])
    db = torch.cat([(wb[k].double() - w0[k].double()).flatten() for k in keys])
    return ((da - db).norm() / da.norm()).item()


@pytest.fixture()
def torch_home(test_env, monkeypatch) -> Path:
    """TORCH_HOME with the planted ImageNet weights, for in-process tests."""
    monkeypatch.setenv("TORCH_HOME", test_env["TORCH_HOME"])
    return Path(test_env["TORCH_HOME"])


# Small, fast settings shared by the training tests: 32px images (no resize work), synthetic data, fp32.
TINY = ["--data-source", "synthetic", "--image-size", "32", "--synthetic-train-samples", "256",
        "--synthetic-eval-samples", "100", "--mixed-precision", "no", "--log-every-steps", "2"]


def run_train(env: dict, args: list[str], num_processes: int = 1, check: bool = True, timeout: int = 600,
              script: str | None = None):
    """Run the real trainer in fresh processes: one plain process, or ``accelerate launch`` (gloo) for several.

    ``script`` runs a file (e.g. tests/run_float64.py) instead of ``-m cifar_dist.train``.
    """
    _require_slow_marker()
    target = [script] if script else ["-m", "cifar_dist.train"]
    if num_processes == 1:
        cmd = [sys.executable, *target, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
               "--num_processes", str(num_processes), "--main_process_port", str(_free_port()), *target, *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_trains_at_once(env: dict, runs: list[list[str]], script: str | None = None,
                       num_processes: list[int] | None = None) -> list:
    """Independent trainer runs (of ``num_processes[k]`` processes, one by default) side by side, as many at a
    time as there are cores, each checked as ``run_train`` checks one. A test run's process keeps about one core
    busy (OMP_NUM_THREADS=1) and a GPU mostly idle, and spends much of its time starting."""
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        return list(pool.map(lambda args, n: run_train(env, args, num_processes=n, script=script), runs,
                             num_processes or [1] * len(runs)))


def start_train(env: dict, args: list[str], log_dir: Path, num_processes: int = 1) -> subprocess.Popen:
    _require_slow_marker()
    if num_processes == 1:
        cmd = [sys.executable, "-m", "cifar_dist.train", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
               "--num_processes", str(num_processes), "--main_process_port", str(_free_port()),
               "-m", "cifar_dist.train", *args]
    # Output to files, not pipes: a full pipe would block the run before it reaches the point we wait for.
    # Ctrl-C as a terminal sends it: the run starts with SIGINT's default action even where pytest runs as a
    # script's background job, which starts with SIGINT ignored (and so would the run).
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(log_dir / "stdout", "w"),
                            stderr=open(log_dir / "stderr", "w"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` read-only to this process, as a run on a read-only share or in another user's folder is: a
    read-only bind mount over it for root, whom permission bits do not stop; else its write permission taken."""
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(mode & ~0o222)
        try:
            yield folder
        finally:
            folder.chmod(mode)
        return
    if shutil.which("mount") is None or subprocess.run(["mount", "--bind", str(folder), str(folder)],
                                                       capture_output=True).returncode:
        pytest.skip("a folder read-only to root needs a bind mount, which cannot be made here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True, capture_output=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@contextlib.contextmanager
def tmpfs(folder: Path, size_mb: int):
    """A real filesystem of ``size_mb`` MB mounted at ``folder`` (made here) while the block runs, to fill up for
    real; the test is skipped where it cannot be mounted (that needs root)."""
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, main, argv: list[str]) -> str:
    """The one line a command's ``main(argv)`` prints on standard error as it exits with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    return err[0]


def _free_port() -> int:
    """A bindable port below the ephemeral range: between this call and the launcher binding it, an outgoing
    connection (another test's gloo processes) cannot take it, as it could one the system handed out."""
    return free_ports(1)[0]


def pytest_collection_modifyitems(items):
    """Tests that launch several processes or a SLURM cluster are slow by definition. The SLURM tests live in
    test_slurm*.py files, which pytest-xdist runs in one worker (pytest_xdist_make_scheduler)."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            if not item.path.name.startswith("test_slurm"):
                raise pytest.UsageError(f"{item.nodeid} uses the SLURM cluster: move it into a test_slurm*.py file")
            item.add_marker(pytest.mark.slurm)
        if item.get_closest_marker("multiprocess") or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (``-n 2``), each file's tests run in one worker, so that its module fixtures (reference
    runs, some of them minutes long) are built once, and all the test_slurm*.py files' tests in one worker, as
    they share the session's cluster. (By file name: pytest 9.2 ignores xdist_group marks, pytest-xdist #1386.)"""
    from xdist.scheduler import LoadFileScheduling

    class OneWorkerPerFile(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return "slurm" if Path(file).name.startswith("test_slurm") else file

    return OneWorkerPerFile(config, log)


_RUNNING: dict = {}


def pytest_runtest_setup(item):
    _RUNNING["item"] = item  # before any of its fixtures, module-scoped ones included, are set up


def _require_slow_marker():
    """Keeps -m "not slow" in-process: a test (or its fixture) that starts the trainer must be marked slow."""
    item = _RUNNING.get("item")
    if item is not None and item.get_closest_marker("slow") is None:
        raise AssertionError(f"{item.nodeid} starts trainer processes: mark it @pytest.mark.slow")
