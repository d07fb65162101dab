"""The one place metrics leave the run: metrics.jsonl, results.md, curves.png, and the experiment tracker.

Only the main process writes or talks to a tracker; every method of RunLog is a no-op elsewhere, so exactly
one W&B run exists per job whatever the number of processes or nodes.
"""

from __future__ import annotations

import importlib
import json
import netrc
import os
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch

from cifar_dist.atomic import atomic_write_bytes, atomic_write_text
from cifar_dist.config import BatchPlan, Config, TrackingConfig, UserError
from cifar_dist.speed import FastPath, adam_implementation, cudnn_autotuning, device_name, mixed_precision_note

# The seed notebook's reported table (Keras, one GPU): epoch -> (train acc, val acc, train loss, val loss).
SEED_RESULTS = {1: (0.498, 0.691, 1.92, 1.02), 5: (0.942, 0.728, 0.17, 1.40), 10: (0.980, 0.749, 0.06, 1.52)}
CIFAR100_SIZES = (50_000, 10_000)  # training and test images: the data the notebook's figures are for
RUN_ID_FILE = "wandb_run_id"
TENSORBOARD_DIR = "tensorboard"  # --tracker tensorboard logs into <output-dir>/tensorboard/<project>/
_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}
# WANDB_MODE values wandb accepts, by what they do ('run' and 'dryrun' are its old names).
_WANDB_MODES = {"online": "online", "run": "online", "shared": "online", "offline": "offline", "dryrun": "offline",
                "disabled": "disabled"}
# How long wandb.init may wait for the W&B server before the run goes offline (wandb's own default is 90 s).
# A cluster job must not sit idle for minutes because a dashboard is unreachable; WANDB_INIT_TIMEOUT overrides.
WANDB_INIT_TIMEOUT_S = 20


def tracker_backend(cfg: TrackingConfig, env=os.environ) -> str | None:
    """The ``log_with`` value for the Accelerator ('auto': wandb when it imports), checking the package imports
    and, for W&B, that WANDB_MODE is valid and that an online run has credentials. Raises UserError; call it
    before anything is written."""
    tracker = cfg.tracker
    if tracker == "auto":
        tracker = "wandb" if _importable("wandb") else "none"
    if tracker == "none":
        return None
    if not _importable(_PACKAGES[tracker]):
        raise UserError(f"--tracker {tracker} needs the '{_PACKAGES[tracker]}' package, which does not import "
                        f"here: pip install {_PACKAGES[tracker]}, or pass --tracker none")
    if tracker == "wandb":
        check_wandb_login(env)
    return tracker


def check_wandb_login(env=os.environ) -> None:
    """UserError when WANDB_MODE is no W&B mode, or asks for an online run that has no credentials (which wandb
    reports only once the data and model are loaded, with a traceback)."""
    mode = env.get("WANDB_MODE")
    if mode and mode not in _WANDB_MODES:
        raise UserError(f"WANDB_MODE={mode} is not a W&B mode; use online, offline or disabled")
    if mode and _WANDB_MODES[mode] == "online" and not wandb_logged_in(env):
        raise UserError(f"WANDB_MODE={mode} but no W&B credentials (WANDB_API_KEY, or a netrc entry for "
                        f"{_wandb_host(env)}): run `wandb login` or set WANDB_API_KEY; or unset WANDB_MODE to log "
                        f"offline and upload later with `wandb sync`")


def _importable(package: str) -> bool:
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


def wandb_logged_in(env=os.environ) -> bool:
    """Credentials wandb would use: an API key or identity token file in the environment, or a netrc entry for
    the W&B host (what `wandb login` leaves behind)."""
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = env.get("NETRC")
    try:
        return netrc.netrc(os.path.expanduser(path) if path else None).authenticators(_wandb_host(env)) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb_host(env) -> str:
    return urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"


def wandb_init_kwargs(cfg: TrackingConfig, output_dir: Path, run_id: str, env=os.environ) -> tuple[dict, str]:
    """(keyword arguments for wandb.init, the one line that announces the mode) for this run.

    The mode is W&B's own WANDB_MODE when set; otherwise online when logged in, else offline, which is said
    at start with the command to upload the run later. The run id is fixed per output dir, so a resumed or
    requeued job logs into the same run.
    """
    wandb_dir = Path(env.get("WANDB_DIR") or output_dir)
    mode = _WANDB_MODES.get(env.get("WANDB_MODE") or "", "online" if wandb_logged_in(env) else "offline")
    kwargs = {"id": run_id, "resume": "allow", "dir": str(wandb_dir), "mode": mode}
    if mode == "online":
        # quiet: no "logged in as" line, whose account lookup alone waits 10 s for an unreachable server.
        kwargs["settings"] = {"quiet": True}
        if not env.get("WANDB_INIT_TIMEOUT"):
            kwargs["settings"]["init_timeout"] = WANDB_INIT_TIMEOUT_S
    for key, value in (("entity", cfg.wandb_entity), ("name", cfg.run_name)):
        if value:
            kwargs[key] = value
    if cfg.wandb_tags:
        kwargs["tags"] = [t.strip() for t in cfg.wandb_tags.split(",") if t.strip()]
    if env.get("WANDB_RUN_GROUP"):
        kwargs["group"] = env["WANDB_RUN_GROUP"]
    if mode == "offline":
        note = (f"W&B: offline (not logged in, or WANDB_MODE=offline); {_kept_offline(run_id, wandb_dir)}")
    elif mode == "disabled":
        note = "W&B: disabled by WANDB_MODE=disabled"
    else:
        note = f"W&B: online, run {run_id}"
    return kwargs, note


def _kept_offline(run_id: str, wandb_dir: Path) -> str:
    return f"run {run_id} is kept in {wandb_dir}/wandb; upload it later with: wandb sync {wandb_dir}/wandb"


def offline_fallback_note(run_id: str, wandb_dir: Path, exc: BaseException) -> str:
    """The one line that says an online start failed and the run goes on offline."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if len(reason) > 240:
        reason = reason[:237] + "..."
    return f"W&B: cannot start the run online ({reason}); continuing offline: {_kept_offline(run_id, wandb_dir)}"


def tensorboard_hparams(config: dict, prefix: str = "") -> dict:
    """``config`` as TensorBoard's hparams take it (int, float, str or bool values, one level): sections become
    prefixes ("optim/lr"), anything else (None, lists, str subclasses such as torch's version) its text."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(tensorboard_hparams(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = value if type(value) in (int, float, str, bool) else str(value)  # str(TorchVersion)
    return flat


def offline_retry(kwargs: dict, exc: BaseException) -> tuple[dict, str] | None:
    """For an online W&B start that could not reach or be accepted by the server: (the same run's wandb.init
    kwargs, offline; the line that says so), with wandb's service restarted; None for any other failure, which
    is a bug to surface."""
    if kwargs.get("mode") != "online" or not _wandb_comm_error(exc):
        return None
    import wandb

    wandb.teardown()  # wandb's service keeps the failed run's id registered ("run ID is in use"); a fresh one frees it
    kwargs = {k: v for k, v in kwargs.items() if k != "settings"} | {"mode": "offline"}
    return kwargs, offline_fallback_note(kwargs["id"], Path(kwargs["dir"]), exc)


def wandb_project(cfg: TrackingConfig, env=os.environ) -> str:
    return cfg.wandb_project or env.get("WANDB_PROJECT") or "cifar_dist"


def _wandb_comm_error(exc: BaseException) -> bool:
    """Whether ``exc`` is wandb failing to reach or be accepted by its server (not a bug to surface)."""
    from wandb.errors import CommError

    return isinstance(exc, (CommError, TimeoutError))


def run_id_for(output_dir: Path) -> str:
    """The run id stored in the output dir, or a new one (SLURM's job id in it when there is one)."""
    path = output_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    job = os.environ.get("SLURM_JOB_ID")
    return f"{'slurm' + job + '-' if job else ''}{uuid.uuid4().hex[:8]}"


def git_commit() -> str | None:
    """The source tree's commit, if the package runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class RunLog:
    """Per-step and per-epoch metrics to disk and trackers, and the end-of-run report."""

    def __init__(self, accelerator, output_dir: Path, header: str, records: list[dict], title: str = "",
                 seed_reference: bool = True):
        """``records``: the epochs already logged before a resume, kept so the files never list one twice (the
        files on disk already hold them: a finished run started again leaves its report as it was).
        ``title`` heads curves.png; ``seed_reference``: show the notebook's figures beside this run's."""
        self.accelerator = accelerator
        self.title = title
        self.seed_reference = seed_reference
        self.enabled = accelerator.is_main_process
        self.output_dir = output_dir
        self.header = header
        self.records: list[dict] = list(records)
        self.run_url: str | None = None
        self.summary: dict | None = None
        self.uses_wandb = "wandb" in [str(t) for t in accelerator.log_with]

    def start(self, cfg: TrackingConfig, run_config: dict) -> None:
        """Start the trackers (main process inside accelerate) and announce where the run goes."""
        if not self.accelerator.log_with:
            return
        init_kwargs = {}
        if self.uses_wandb:
            run_id = run_id_for(self.output_dir)
            if self.enabled:
                atomic_write_text(self.output_dir / RUN_ID_FILE, run_id + "\n")
            kwargs, note = wandb_init_kwargs(cfg, self.output_dir, run_id)
            init_kwargs["wandb"] = kwargs
            self.accelerator.print(note)
        if "tensorboard" in [str(t) for t in self.accelerator.log_with]:
            run_config = tensorboard_hparams(run_config)
        self._init_trackers(wandb_project(cfg), run_config, init_kwargs)
        if self.enabled and "wandb" in init_kwargs:
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.define_metric("epoch")
            for prefix in ("val/*", "epoch/*"):
                run.define_metric(prefix, step_metric="epoch")
            self.run_url = getattr(run, "url", None)

    def _init_trackers(self, project: str, run_config: dict, init_kwargs: dict) -> None:
        """accelerate's init_trackers; an online W&B run that cannot start (server unreachable within the init
        timeout, credentials refused) goes on offline under the same run id: a run is never lost to a dashboard."""
        try:
            self.accelerator.init_trackers(project, config=run_config, init_kwargs=init_kwargs)
            return
        except Exception as exc:
            retry = offline_retry(init_kwargs.get("wandb", {}), exc) if self.enabled else None
            if retry is None:
                raise
        kwargs, note = retry
        self.accelerator.print(note)
        self.accelerator.trackers = []  # drop the tracker whose start failed
        self.accelerator.init_trackers(project, config=run_config, init_kwargs={**init_kwargs, "wandb": kwargs})

    def log_step(self, metrics: dict, step: int) -> None:
        if self.enabled:
            self.accelerator.log(metrics, step=step)

    def log_epoch(self, record: dict, step: int) -> None:
        """Add one epoch's record (replacing an earlier one of the same epoch), rewrite the files, log it."""
        self.records = [r for r in self.records if r["epoch"] != record["epoch"]] + [record]
        if not self.enabled:
            return
        self._write()
        names = {"train_loss": "epoch/train_loss", "train_acc": "epoch/train_acc", "epoch_time_s": "epoch/time_s",
                 "train_time_s": "epoch/train_time_s", "eval_time_s": "epoch/eval_time_s",
                 "train_images_per_s": "epoch/train_images_per_s", "checkpoint_time_s": "epoch/checkpoint_time_s",
                 **{k: f"epoch/{k}" for k in ("partial", "steps_in_epoch", "num_processes", "per_device_batch_size",
                                              "grad_accum_steps")}}
        # A launch's start-up split (a dict, in its first epoch's record) reaches the tracker in the summary.
        self.accelerator.log({names.get(k, k.replace("_", "/", 1)): v for k, v in record.items()
                              if not isinstance(v, dict)}, step=step)

    def finish(self, summary: dict, per_class: list[tuple[str, float]], samples: Callable[[], list[tuple]],
               model_path: Path | None):
        """End-of-run report: summary, per-class accuracy and sample predictions to the tracker; files rewritten.
        ``samples`` (sample_predictions: a pass of the whole model) is called only for W&B's table."""
        if not self.enabled:
            return
        self.summary = summary
        self._write()
        if self.uses_wandb:
            import wandb

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.summary.update(summary)
            run.log({"val/per_class_acc": wandb.Table(columns=["class", "accuracy"], data=per_class),
                     "val/samples": wandb.Table(columns=["image", "predicted", "true"],
                                                data=[[wandb.Image(img), p, t] for img, p, t in samples()])})
            if model_path is not None:
                artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=summary)
                artifact.add_file(str(model_path))
                run.log_artifact(artifact)

    def _write(self) -> None:
        atomic_write_text(self.output_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records))
        atomic_write_text(self.output_dir / "results.md",
                          render_results(self.header, self.records, self.summary, self.run_url,
                                         self.seed_reference))
        if self.summary:  # drawn once, at the end: rendering takes about a second, which every epoch would pay
            atomic_write_bytes(self.output_dir / "curves.png", plot_curves(self.records, self.title,
                                                                                  self.seed_reference))


def compares_to_seed(cfg: Config, num_train: int, num_test: int) -> bool:
    """Whether the notebook's figures are a fair reference: all of real CIFAR-100, from ImageNet weights. The
    split sizes tell a local folder of a part of it (or of other images) from the whole."""
    return (cfg.data.data_source != "synthetic" and cfg.model.weights.startswith("IMAGENET1K")
            and cfg.model.num_classes == 100 and cfg.data.max_train_samples is None
            and cfg.data.max_eval_samples is None and (num_train, num_test) == CIFAR100_SIZES)


def plot_title(cfg: Config, output_dir: Path) -> str:
    return (f"{cfg.tracking.run_name or output_dir.name}: {cfg.data.data_source}, weights {cfg.model.weights}, "
            f"{cfg.data.image_size} px, lr {cfg.optim.lr:g}")


def render_results(header: str, records: list[dict], summary: dict | None = None, run_url: str | None = None,
                   seed_reference: bool = True) -> str:
    """results.md: the seed's table for this run, with the seed's own figures alongside, and the summary."""
    seed_column = " Seed val acc |" if seed_reference else ""
    rows = ["| Epoch | Training Accuracy | Validation Accuracy | Training Loss | Validation Loss |" + seed_column,
            "|-------|-------------------|---------------------|---------------|-----------------|"
            + ("--------------|" if seed_reference else "")]
    for r in records:
        seed = SEED_RESULTS.get(r["epoch"])
        row = (f"| {r['epoch']}{partial_note(r)} | {100 * r['train_acc']:.1f}% | {100 * r['val_acc']:.1f}% "
               f"| {r['train_loss']:.2f} | {r['val_loss']:.2f} |")
        rows.append(row + (f" {f'{100 * seed[1]:.1f}%' if seed else ''} |" if seed_reference else ""))
    last = records[-1]
    text = (f"{header}\n\n" + "\n".join(rows) + "\n\n"
            f"Final validation accuracy {100 * last['val_acc']:.2f}% (top-5 {100 * last['val_top5']:.2f}%) "
            f"on {last['val_num_samples']} test images after {last['step']} optimizer steps.\n")
    if summary:
        text += (f"Best validation accuracy {100 * summary['best_val_acc']:.2f}% (epoch {summary['best_epoch']}); "
                 f"total time {summary['total_time_s']:.0f} s{_launches(records)}.\n")
    if run_url:
        text += f"\nW&B run: {run_url}\n"
    return text + "\n![curves](curves.png)\n"


def partial_note(record: dict) -> str:
    """" (partial, 5 steps)" for an epoch that --max-steps ended early, whose training loss and accuracy cover
    those steps only; "" for a whole one (and for records older than the mark)."""
    return f" (partial, {record['steps_in_epoch']} steps)" if record.get("partial") else ""


def _launches(records: list[dict]) -> str:
    """Where the run was resumed, what the total time covers: the last launch, from its start (the epochs' own
    times are in every record, so those of all launches add up; compare's "time" column is that sum)."""
    if not any(r.get("resumed_from_step") is not None for r in records):
        return ""
    epochs_s = sum(r.get("epoch_time_s", 0) for r in records)
    return f" for this launch (the run was resumed; its epochs took {epochs_s:.0f} s in all launches)"


def plot_curves(records: list[dict], title: str = "", seed_reference: bool = True) -> bytes:
    """curves.png: loss and accuracy per epoch, train vs val, with the seed's reported validation figures when
    they are a fair reference, over this run's epochs only."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(10, 4.4), dpi=100)
    if title:
        fig.suptitle(title, fontsize=10)
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["train_loss"] for r in records], "o-", label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in records], "o-", label="val")
    acc_ax.plot(epochs, [100 * r["train_acc"] for r in records], "o-", label="train")
    acc_ax.plot(epochs, [100 * r["val_acc"] for r in records], "o-", label="val")
    seed_epochs = [e for e in sorted(SEED_RESULTS) if e <= max(epochs)]
    if seed_reference and seed_epochs:
        acc_ax.plot(seed_epochs, [100 * SEED_RESULTS[e][1] for e in seed_epochs], "ks--", label="seed val (Keras)")
        loss_ax.plot(seed_epochs, [SEED_RESULTS[e][3] for e in seed_epochs], "ks--", label="seed val (Keras)")
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


# -- what the run reports about itself: header, tracker facts, sample predictions


def sample_predictions(model, splits, accelerator, num_images: int = 16) -> list[tuple]:
    """(image, predicted class, true class) for the first test images, for a look at what the model does. One
    batch of a shape nothing else runs: not worth cuDNN's timing of every convolution for it."""
    images, labels = splits.test.images[:num_images], splits.test.labels[:num_images]
    model = accelerator.unwrap_model(model).eval()
    with torch.no_grad(), accelerator.autocast(), cudnn_autotuning(False):
        predicted = model(images.to(accelerator.device)).argmax(1).tolist()
    names = splits.class_names
    return [(img.cpu().numpy(), names[p], names[t]) for img, p, t in zip(images, predicted, labels.tolist())]


def run_facts(plan: BatchPlan, accelerator, counts: dict, fast: FastPath, optimizer) -> dict:
    """What the tracker's config records beside the settings: topology, precision, the step as it runs (what
    was compiled, graph breaks, CUDA-graph skips, Adam's implementation), hardware, provenance."""
    return {**plan.layout(), "mixed_precision": accelerator.mixed_precision,
            **fast.facts(), "adam_implementation": adam_implementation(optimizer),
            "device": device_name(accelerator), "torch": torch.__version__, "git_commit": git_commit(),
            **{f"params_{k}": v for k, v in counts.items()}}


def describe_run(cfg: Config, plan: BatchPlan, accelerator, counts: dict, num_train: int, num_test: int,
                 fast: FastPath) -> str:
    device = device_name(accelerator)
    frozen = "nothing frozen" if cfg.model.freeze_until == "none" else f"frozen before {cfg.model.freeze_until}"
    return "\n".join([
        "# cifar_dist run",
        "",
        f"- data: {cfg.data.data_source}, {num_train} train / {num_test} test images, resized to "
        f"{cfg.data.image_size}px on the device",
        f"- model: ResNet50 ({cfg.model.weights}) + {cfg.model.head_hidden_dim}-ReLU-{cfg.model.num_classes} head, "
        f"{frozen}; parameters {counts['total']:,} total, {counts['trainable']:,} trainable, {counts['frozen']:,} "
        f"frozen; {counts['bn_running_stats']:,} BN running-stat values",
        f"- batch: global {plan.global_batch_size} = {plan.per_device_batch_size} per device x "
        f"{plan.num_processes} processes x {plan.grad_accum_steps} accumulation steps",
        f"- optimizer: Adam lr {cfg.optim.lr:g}, eps {cfg.optim.adam_eps:g}; {cfg.train.num_epochs} epochs, "
        f"seed {cfg.train.seed}",
        f"- device: {accelerator.num_processes} x {accelerator.device.type} ({device}), mixed precision "
        f"{accelerator.mixed_precision}{mixed_precision_note(cfg.train.mixed_precision, accelerator.mixed_precision)}, "
        f"torch {torch.__version__}"
        f"{'; deterministic algorithms only' if cfg.train.deterministic else ''}",
        f"- step: {fast.describe()}"
        + "".join(f"; {note}" for note in fast.notes),
    ])
