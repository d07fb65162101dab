"""Runs on disk, as the after-training tools (evaluate, predict, compare, sweep) find and read them.

A run is an output dir of ``cifar_dist.train``: ``config.yaml``, ``metrics.jsonl``, ``results.md``,
``checkpoints/step-N/`` and, once it has finished, ``model.safetensors``. Nothing here needs the network, the
dataset or the ImageNet weights: a trained model is rebuilt from its config with ``weights: none`` and then
given its own weights.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cifar_dist.checkpoint import CHECKPOINTS, STATE_FILE, checkpoint_problem, find_latest, read_state
from cifar_dist.cli import parse_config
from cifar_dist.config import _OWNER, Config, UserError, _coerce, make_config
from cifar_dist.model import ResNet50Classifier, build_model
from cifar_dist.rundir import LOCK, PREVIOUS, RUN_ENTRIES, STARTING

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
SWEEP_POINT_FILE = "sweep_point.yaml"  # written by cifar_dist.sweep before a point's run has started
_RUN_HELP = "a run's output dir, one of its checkpoints/step-N dirs, or a model.safetensors"
EVAL_FILES = ("eval.json", "eval.md", "confusion.png")  # cifar_dist.evaluate's report, in the run or its eval-*/
# A run's own entries: what the trainer and the sweep write into its output dir.
_RUN_OWN = (*RUN_ENTRIES, LOCK, STARTING, PREVIOUS, SWEEP_POINT_FILE)


@dataclass(frozen=True)
class TrainedModel:
    """A weights file, the config of the run that made it, and that run's output dir."""

    weights: Path
    config: Config
    config_source: str
    run_dir: Path
    checkpoint: str | None  # "step-00001234" for a checkpoint's weights, None for the final model
    note: str | None = None  # said to the user when the choice of weights is not the obvious one

    def describe(self) -> str:
        return f"{self.checkpoint or 'final model'} of {self.run_dir}"


def resolve_model(path: str, config_path: str | None = None) -> TrainedModel:
    """Find the weights and config for RUN (``path``); ``config_path`` replaces the config found beside it."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such file or folder; expected {_RUN_HELP}")
    if p.is_dir() and (p / STATE_FILE).exists():  # a checkpoint
        problem = checkpoint_problem(p)
        if problem:
            raise UserError(f"{path}: {problem}")
        run_dir = p.parent.parent if p.parent.name == CHECKPOINTS else p
        return _with_config(p / MODEL_FILE, run_dir, p.name, config_path, checkpoint_dir=p)
    if p.is_dir():
        _check_not_replaced(p, path)
        if not (p / CONFIG_FILE).is_file():
            raise UserError(f"{path}: not a cifar_dist run (no {CONFIG_FILE}); expected {_RUN_HELP}")
        if (p / MODEL_FILE).is_file():
            return _with_config(p / MODEL_FILE, p, None, config_path)
        latest = find_latest(p / CHECKPOINTS)
        if latest is None:
            raise UserError(f"{path}: the run has no {MODEL_FILE} (it has not finished) and no complete checkpoint")
        found = _with_config(latest / MODEL_FILE, p, latest.name, config_path, checkpoint_dir=latest)
        return dataclasses.replace(found, note=f"{p} has not finished: using its newest checkpoint {latest.name}")
    if p.suffix != ".safetensors":
        raise UserError(f"{path}: not a .safetensors file; expected {_RUN_HELP}")
    if (p.parent / STATE_FILE).is_file():  # the model file inside a checkpoint
        return resolve_model(str(p.parent), config_path)
    return _with_config(p, p.parent, None, config_path)


def replaced_run(run_dir: Path) -> Path | None:
    """Where the run in ``run_dir`` is while an --overwrite start there has not reached its first checkpoint:
    moved aside intact, until the next start in the dir undoes that start (rundir.undo_start); else None."""
    aside = run_dir / PREVIOUS
    return aside if (run_dir / STARTING).exists() and (aside / CONFIG_FILE).is_file() else None


def _check_not_replaced(run_dir: Path, path: str) -> None:
    # What is in the dir now is that start's, and goes; the tools only read, so the user puts the run back.
    aside = replaced_run(run_dir)
    if aside is not None:
        raise UserError(f"{path}: a start with --overwrite has not reached its first checkpoint here; the earlier "
                        f"run is intact in {aside}/ and, once that start has stopped, the next cifar_dist.train "
                        f"start with --output-dir {path} puts it back first (`python -m cifar_dist.train "
                        f"--output-dir {path} --resume never --tracker none` does only that: it then stops, the dir "
                        "holding a run)")


def _with_config(weights: Path, run_dir: Path, checkpoint: str | None, config_path: str | None,
                 checkpoint_dir: Path | None = None) -> TrainedModel:
    if config_path is not None and not _names_own_config(weights, run_dir, config_path, checkpoint_dir):
        return TrainedModel(weights, load_config(Path(config_path)), config_path, run_dir, checkpoint)
    if checkpoint_dir is not None:  # the checkpoint's own record of the run's config
        source = str(checkpoint_dir / STATE_FILE)
        # Read as a config file is: older runs wrote some auto/yes/no settings as booleans.
        flat = {k: _coerce(k, v, source) if k in _OWNER else v
                for section in read_state(checkpoint_dir)["config"].values() for k, v in section.items()}
        return TrainedModel(weights, make_config(**flat), source, run_dir, checkpoint)
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        raise UserError(f"{weights}: no {CONFIG_FILE} beside it; pass the run's config with --config")
    return TrainedModel(weights, load_config(config), str(config), run_dir, checkpoint)


def _names_own_config(weights: Path, run_dir: Path, config_path: str, checkpoint_dir: Path | None) -> bool:
    """Whether --config names the weights' own config (a run's config.yaml, a checkpoint's state file), which
    changes nothing and is read as it is without --config; False for weights without a config. --config is for
    those alone: over a run's own it would give another model's image size and data, and evaluate would write
    those figures over the run's own eval.json, so any other file is refused."""
    own = checkpoint_dir / STATE_FILE if checkpoint_dir is not None else run_dir / CONFIG_FILE
    if not own.is_file():
        return False
    if own.resolve() != Path(config_path).resolve():
        raise UserError(f"--config {config_path}: {weights} has its own config ({own}), which is the one it was "
                        "trained with; drop --config (--data-source selects other data)")
    return True


def run_file(path: Path) -> tuple[Path, tuple[str, ...]] | None:
    """(run dir, path in it) when ``path`` is a file of a run (any folder with a config.yaml): its config,
    weights, records, checkpoints, tracker files, markers or evaluation report; None for anything else."""
    path = path.resolve()
    for run in path.parents:
        if (run / CONFIG_FILE).is_file() or (run / SWEEP_POINT_FILE).is_file():
            parts = path.relative_to(run).parts
            report = parts[-1] in EVAL_FILES and (len(parts) == 1 or len(parts) == 2 and parts[0].startswith("eval-"))
            if parts[0] in _RUN_OWN or report:
                return run, parts
    return None


def check_output_file(flag: str, out: str, found: TrainedModel, inputs: list[Path] = ()) -> None:
    """Refuse, before any work, an output file that is an input or a run's own file: writing it would destroy
    them. An earlier call's output (a predictions CSV) may be written again."""
    target = Path(out).resolve()
    if target in {p.resolve() for p in inputs}:
        raise UserError(f"{flag} {out} is one of the input images; give another file name")
    own = {found.weights.resolve(): "the model's weights", Path(found.config_source).resolve(): "the model's config"}
    if target in own:
        raise UserError(f"{flag} {out} is {own[target]}; give another file name")
    where = run_file(target)
    if where:
        run, parts = where
        label = f"{parts[0]}/" if len(parts) > 1 and parts[0] in _RUN_OWN else "/".join(parts)
        raise UserError(f"{flag} {out} is among the run's own files ({label} in {run}); give another file name")


def check_output_dir(out: Path, found: TrainedModel) -> None:
    """Refuse an evaluate --output-dir inside a run's own folders, or in another run, whose report it would replace."""
    where = run_file(out / EVAL_FILES[0])
    if where is None:
        return
    run, parts = where
    if parts[0] in _RUN_OWN:
        raise UserError(f"--output-dir {out} is inside the run's {parts[0]} in {run}; give a folder outside it, "
                        "or leave --output-dir out")
    if run != found.run_dir.resolve():
        raise UserError(f"--output-dir {out} would replace the evaluation of another run ({run}); give a folder "
                        "of its own, or leave --output-dir out")


def check_writable(folder: Path, what: str, advice: str) -> None:
    """Refuse, before any work, an output folder this process cannot write into (a run on a read-only share or in
    another user's folder); ``what`` names the output, ``advice`` how to choose another. Tried by writing a file there
    (in the nearest existing folder above, for one still to be made): permission bits say nothing of a
    read-only filesystem, nor to root."""
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    try:
        tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test.").close()
    except OSError as exc:
        raise UserError(f"{what}: cannot write into {existing} ({exc.strerror}); {advice}") from None


def load_config(path: Path) -> Config:
    """A run's config.yaml (or any --config file), validated as the trainer validates it."""
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    return parse_config(["--config", str(path)])


def check_image_size(requested: int | None, found: TrainedModel) -> None:
    """Refuse to run a model at another input size than it was trained at: that would be another model."""
    trained = found.config.data.image_size
    if requested is not None and requested != trained:
        raise UserError(f"--image-size {requested}: this model was trained at {trained} px ({found.config_source}); "
                        f"at another size it computes something else; drop --image-size")


def load_model(found: TrainedModel) -> ResNet50Classifier:
    """The trained classifier on the CPU, in eval mode; UserError when the file is not this config's model."""
    cfg = found.config
    try:
        state = load_file(str(found.weights))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"{found.weights}: not a readable safetensors file ({type(exc).__name__}); "
                        "is it complete?") from None
    # weights "none": the run's backbone file (ImageNet download) is not needed, its own weights replace it all.
    model = build_model(dataclasses.replace(cfg.model, weights="none"), cfg.data.image_size)
    own = model.state_dict()
    for key in ("fc.0.weight", "fc.2.weight"):
        if key not in state:
            raise UserError(f"{found.weights}: no {key}, so not a trained cifar_dist model (an ImageNet backbone "
                            f"file has a 1000-way fc instead); pass a run's model.safetensors")
        if state[key].shape != own[key].shape:
            raise UserError(f"{found.weights}: its head is {_head(state)} but {found.config_source} describes "
                            f"{_head(own)}; pass the config of the run that made these weights with --config")
    problems = sorted(set(own) ^ set(state))
    if problems:
        raise UserError(f"{found.weights}: not a cifar_dist ResNet50 ({len(problems)} keys differ, e.g. "
                        f"{problems[0]!r})")
    model.load_state_dict(state)
    return model.to(torch.float32).eval()


def _head(state: dict) -> str:
    hidden, features = state["fc.0.weight"].shape
    return f"{features} -> {hidden} -> {state['fc.2.weight'].shape[0]} classes"


# -- what compare and sweep read


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's epoch records; [] when there are none yet. A damaged line raises UserError."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not readable JSON lines ({exc.msg} at line {exc.lineno})") from None


def is_finished(run_dir: Path, cfg: Config, records: list[dict]) -> bool:
    """The run reached its planned end (all epochs, or --max-steps) and wrote its final model."""
    if not records or not (run_dir / MODEL_FILE).is_file():
        return False
    last = records[-1]
    max_steps = cfg.train.max_steps
    return last["epoch"] >= cfg.train.num_epochs or (max_steps is not None and last["step"] >= max_steps)


def resumed_segments(records: list[dict]) -> int:
    """How many times the run was resumed and then completed at least one more epoch."""
    return len({r["resumed_from_step"] for r in records if r.get("resumed_from_step") is not None})


_DEVICE_LINE = re.compile(r"^- device: (\d+) x (.+?), mixed precision ([^,\s]+)", re.MULTILINE)


def run_facts(run_dir: Path) -> dict:
    """Processes, device and precision from the header of the run's results.md ({} when it has none)."""
    path = run_dir / "results.md"
    match = _DEVICE_LINE.search(path.read_text()) if path.is_file() else None
    if match is None:
        return {}
    return {"num_processes": int(match.group(1)), "device": match.group(2), "mixed_precision": match.group(3)}
