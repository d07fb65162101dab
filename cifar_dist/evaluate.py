"""Evaluate a trained model on a whole split: the trainer's own eval pass, plus a look at its mistakes.

    python -m cifar_dist.evaluate outputs/cifar100-resnet50               # the run's data source, test split
    accelerate launch -m cifar_dist.evaluate outputs/cifar100-resnet50    # several processes: the same numbers
    python -m cifar_dist.evaluate RUN/checkpoints/step-00001562 --split train
    python -m cifar_dist.evaluate model.safetensors --config config.yaml --data-source /shared/cifar100

RUN is a run's output dir (its model.safetensors; before the run has finished, its newest checkpoint, said in
one line), a checkpoint dir, or a model.safetensors. ``--data-source`` and ``--split`` default to the run's
source and its test split. Writes, to the run's output dir (or ``--output-dir``):

- eval.json and eval.md: loss, top-1, top-5, per-class and per-superclass accuracy, the 10 most confused
  class pairs, expected calibration error (15 equal-width confidence bins) and the eval throughput;
- confusion.png: the 100x100 confusion matrix, classes grouped by CIFAR-100's 20 superclasses;
- with ``--predictions FILE``: every image's top-k classes, in cifar_dist.predict's format;
- and, when the run has a W&B run id, the figures into that run's summary (offline runs: ``cifar_dist.sync``).

Loss, top-1 and top-5 come from the trainer's own ``evaluate`` over the same model build, precision, speed
options, eval batch size and loader, so they equal the run's last-epoch val_loss/val_acc/val_top5 exactly, on
any number of processes (tests/test_evaluate.py checks 1 and 2). The other figures come from the logits of that
same pass, gathered with ``gather_for_metrics``: one pass, at the trainer's eval throughput. Measured on the 2-core
CPU (4,000 synthetic test images at 32 px, batch 256, fp32): 1,228 images/s; the trainer's own eval of that run,
1,392 (the machine is shared with other jobs: the difference is within its noise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from cifar_dist.checkpoint import atomic_write_bytes, atomic_write_text
from cifar_dist.cli import OneLineParser, exit_now, one_line_errors
from cifar_dist.config import DataConfig, UserError
from cifar_dist.runs import (
    EVAL_FILES,
    TrainedModel,
    check_image_size,
    check_output_dir,
    check_output_file,
    check_writable,
    load_model,
    read_records,
    resolve_model,
)

SPLITS = ("test", "train")
ECE_BINS = 15
# CIFAR-100's 20 superclasses ("coarse labels") and their fine classes, as the dataset's authors published them.
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
SUPERCLASS_OF = {fine: coarse for coarse, fines in CIFAR100_SUPERCLASSES.items() for fine in fines}


# -- the figures, from labels and logits


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true, predicted) counts, int64 (num_classes, num_classes)."""
    return torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).view(num_classes, num_classes)


def calibration(confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = ECE_BINS) -> tuple[float, list]:
    """Expected calibration error over equal-width confidence bins, and the bins (count, accuracy, confidence).

    ECE = sum over bins of (images in bin / all images) * |accuracy - mean confidence| in the bin.
    """
    bins = (confidence.double() * num_bins).long().clamp(max=num_bins - 1)  # confidence 1.0 goes in the top bin
    count = torch.bincount(bins, minlength=num_bins).double()
    acc = torch.bincount(bins, weights=correct.double(), minlength=num_bins) / count.clamp(min=1)
    conf = torch.bincount(bins, weights=confidence.double(), minlength=num_bins) / count.clamp(min=1)
    ece = ((count / count.sum()) * (acc - conf).abs()).sum().item()
    table = [{"low": b / num_bins, "high": (b + 1) / num_bins, "count": int(n), "accuracy": a, "confidence": c}
             for b, (n, a, c) in enumerate(zip(count.tolist(), acc.tolist(), conf.tolist()))]
    return ece, table


def most_confused(confusion: torch.Tensor, class_names: list[str], k: int = 10) -> list[dict]:
    """The k largest off-diagonal cells: images of class ``true`` predicted as ``predicted``."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().sort(descending=True, stable=True)  # stable: ties in class order
    totals = confusion.sum(1)
    n = confusion.shape[0]
    return [{"true": class_names[i // n], "predicted": class_names[i % n], "count": int(c),
             "share_of_true": c / max(int(totals[i // n]), 1)}
            for c, i in zip(counts.tolist()[:k], flat.tolist()[:k]) if c > 0]


def superclass_order(class_names: list[str]) -> list[tuple[str, list[int]]] | None:
    """[(superclass, class indices)] in CIFAR-100's order, or None when the names are not CIFAR-100's."""
    index = {name: i for i, name in enumerate(class_names)}
    if set(index) != set(SUPERCLASS_OF):
        return None
    return [(coarse, [index[f] for f in fines]) for coarse, fines in CIFAR100_SUPERCLASSES.items()]


def analyse(logits: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """Confusion, most confused pairs, calibration and per-superclass accuracy from the gathered logits and the
    trainer's top-1 (GatherLogits)."""
    confidence = logits.double().softmax(1).gather(1, predicted[:, None])[:, 0]
    confusion = confusion_matrix(labels, predicted, len(class_names))
    ece, bins = calibration(confidence, predicted == labels)
    groups = superclass_order(class_names)
    per_group = {}
    for coarse, members in groups or []:
        rows = confusion[members]
        per_group[coarse] = {"fine_top1": rows[:, members].diagonal().sum().item() / max(rows.sum().item(), 1),
                             "superclass_top1": rows[:, members].sum().item() / max(rows.sum().item(), 1)}
    return {"confusion": confusion, "ece": ece, "calibration_bins": bins, "superclasses": per_group,
            "most_confused": most_confused(confusion, class_names), "top1_correct": int(confusion.trace())}


def plot_confusion(confusion: torch.Tensor, class_names: list[str], title: str) -> bytes:
    """confusion.png: row-normalised (share of each true class), classes grouped by superclass when possible."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    groups = superclass_order(class_names)
    order = [i for _, members in groups for i in members] if groups else list(range(len(class_names)))
    rows = confusion.double()[order][:, order]
    share = (rows / rows.sum(1, keepdim=True).clamp(min=1)).numpy()
    fig = Figure(figsize=(15, 14), dpi=110)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.17 if groups else 0.01,
                 label="share of the true class's images (sqrt scale)")
    names = [class_names[i] for i in order]
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
    ax.set_yticks(range(len(names)), names, fontsize=5)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if groups:
        edges = [len(members) * (g + 1) - 0.5 for g, (_, members) in enumerate(groups)]
        for edge in edges[:-1]:
            ax.axhline(edge, color="white", linewidth=0.6)
            ax.axvline(edge, color="white", linewidth=0.6)
        for g, (coarse, members) in enumerate(groups):  # superclass names beside the rows
            ax.text(len(names) + 0.5, g * len(members) + (len(members) - 1) / 2, coarse, fontsize=6, va="center")
    else:
        title += " (class names are not CIFAR-100's: no superclass grouping)"
    ax.set_title(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def render_markdown(report: dict) -> str:
    """eval.md: the headline figures (beside the trainer's own last epoch), mistakes, calibration, classes."""
    pct = _pct
    setup = (f"{report['num_samples']} images of the {report['split']} split of {report['data_source']}, "
             f"{report['num_processes']} process(es) on {report['device']} ({report['mixed_precision']}), eval "
             f"batch {report['eval_batch_size']}: {report['eval_time_s']:.2f} s, {report['images_per_s']:.0f} "
             f"images/s.")
    ours = (f"| this evaluation | {report['loss']:.4f} | {pct(report['top1'])} | {pct(report['top5'])} | "
            f"{pct(report['ece'])} |")
    lines = [f"# Evaluation of the {report['model']}", "", setup, "", "| | loss | top-1 | top-5 | ECE |",
             "|---|---:|---:|---:|---:|", ours]
    last = report.get("trainer_last_epoch")
    if last:
        lines.append(f"| trainer, epoch {last['epoch']} | {last['val_loss']:.4f} | {pct(last['val_acc'])} | "
                     f"{pct(last['val_top5'])} | |")
        same = "yes, exactly" if last["same"] else "no"
        lines += ["", f"Same as the trainer's: {same}; its eval ran at {last['eval_images_per_s']:.0f} images/s."]
    lines += ["", "## Most confused pairs", "", "| true | predicted as | images | share of the true class |",
              "|---|---|---:|---:|"]
    lines += [f"| {p['true']} | {p['predicted']} | {p['count']} | {pct(p['share_of_true'])} |"
              for p in report["most_confused"]]
    lines += ["", f"## Calibration: ECE {pct(report['ece'])} ({len(report['calibration_bins'])} bins)", "",
              "| confidence | images | accuracy | mean confidence |", "|---|---:|---:|---:|"]
    lines += [f"| {b['low']:.2f}-{b['high']:.2f} | {b['count']} | {pct(b['accuracy'])} | {pct(b['confidence'])} |"
              for b in report["calibration_bins"] if b["count"]]
    per_class = report["per_class_accuracy"]
    lines += ["", "## Accuracy per class", ""]
    if report["superclasses"]:
        lines += ["| superclass | top-1 | right superclass | classes |", "|---|---:|---:|---|"]
        for coarse, figures in report["superclasses"].items():
            fines = ", ".join(f"{f} {100 * per_class[f]:.0f}%" for f in CIFAR100_SUPERCLASSES[coarse])
            lines.append(f"| {coarse} | {pct(figures['fine_top1'])} | {pct(figures['superclass_top1'])} | {fines} |")
    else:
        lines += ["| class | top-1 |", "|---|---:|"] + [f"| {c} | {pct(a)} |" for c, a in per_class.items()]
    return "\n".join(lines) + "\n\n![confusion](confusion.png)\n"


# -- the pass


class GatherLogits:
    """Forward hook: each eval batch's logits, and the trainer's top-1 of them, gathered over processes as the
    trainer's metrics are (gather_for_metrics drops the padding of uneven shards), so the rows are the split's
    images in order."""

    def __init__(self, accelerator):
        self.accelerator, self.parts, self.top1 = accelerator, [], []

    def __call__(self, module, inputs, output):
        # Top-1 exactly as steps.evaluate takes it, on this device and in this dtype: between tied logits (common
        # in bf16) topk(1) and topk(5)[:, 0], or the CPU and a GPU, can pick different classes.
        top1 = output.topk(min(5, output.shape[1]), dim=1).indices[:, 0]
        logits, top1 = self.accelerator.gather_for_metrics((output.detach().float(), top1))
        self.parts.append(logits)
        self.top1.append(top1)


def build_eval_loader(found: TrainedModel, model, splits, split: str, accelerator, eval_batch_size: int, fast):
    """The trainer's eval loader over ``split`` (and its input: images, or cached trunk features, decided as the
    trainer decides it on this device), prepared."""
    from cifar_dist.data import ImageTensorDataset, eval_loader
    from cifar_dist.feature_cache import cache_for_run

    cfg = found.config
    data = dataclasses.replace(splits, test=splits.train) if split == "train" else splits
    one = ImageTensorDataset(data.test.images[:1], data.test.labels[:1])  # a train cache, if any, is not needed
    cached, fast = cache_for_run(accelerator.unwrap_model(model), dataclasses.replace(data, train=one), accelerator,
                                 eval_batch_size, cfg.speed, fast)
    data = dataclasses.replace(data, test=cached.test)
    # The eval loader alone: a training split cut below one global batch (--max-eval-samples) is fine here.
    loader = accelerator.prepare(eval_loader(data.test, eval_batch_size))
    return loader, "features" if "test" in fast.features_cached else "images", data.test.labels


def eval_data_config(data: DataConfig, args) -> DataConfig:
    """The run's data settings with the command's: --max-eval-samples limits the split evaluated, which for
    --split train is the training split (the test split is then swapped in for it, already cut)."""
    data = dataclasses.replace(data, data_source=args.data_source or data.data_source)
    if args.split == "train":  # default: the run's max_train_samples, the images it trained on
        return dataclasses.replace(data, max_train_samples=args.max_eval_samples or data.max_train_samples)
    return dataclasses.replace(data, max_eval_samples=args.max_eval_samples or data.max_eval_samples)


def evaluate_model(found: TrainedModel, args):
    """Run the trainer's evaluate over the split: (report, confusion, gathered logits, labels, accelerator)."""
    from accelerate import Accelerator

    from cifar_dist.data import build_splits, loader_config
    from cifar_dist.preflight import main_first
    from cifar_dist.speed import (
        apply_backends,
        device_name,
        prepare_model_layout,
        resolve_fast_path,
        resolve_mixed_precision,
    )
    from cifar_dist.steps import evaluate

    cfg = found.config
    model = load_model(found)  # before any data: a wrong model is refused first
    data_cfg = eval_data_config(cfg.data, args)
    eval_batch_size = args.eval_batch_size or cfg.train.eval_batch_size
    cpu = not torch.accelerator.is_available()
    precision = resolve_mixed_precision(args.mixed_precision or cfg.train.mixed_precision)
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision, dataloader_config=loader_config())
    fast = resolve_fast_path(cfg.speed, accelerator.device, precision, accelerator.num_processes,
                             deterministic=cfg.train.deterministic)
    apply_backends(fast)
    splits = main_first(accelerator, lambda: build_splits(data_cfg, seed=cfg.train.seed))
    if accelerator.device.type == "cuda":
        splits = splits.to(accelerator.device)
    model = accelerator.prepare(prepare_model_layout(model, fast))
    loader, input_name, labels = build_eval_loader(found, model, splits, args.split, accelerator,
                                                   eval_batch_size, fast)
    gather = GatherLogits(accelerator)
    hook = accelerator.unwrap_model(model).register_forward_hook(gather)
    start = time.perf_counter()
    metrics, per_class = evaluate(model, loader, accelerator, splits.class_names, input_name)
    seconds = time.perf_counter() - start
    hook.remove()
    logits = torch.cat(gather.parts).cpu()
    figures = analyse(logits, torch.cat(gather.top1).cpu(), labels.cpu(), splits.class_names)
    count = metrics["val_num_samples"]
    assert len(logits) == count and figures["top1_correct"] == round(metrics["val_acc"] * count), "eval pass mismatch"
    report = {"model": found.describe(), "weights": str(found.weights), "data_source": data_cfg.data_source,
              "split": args.split, "num_samples": count, "loss": metrics["val_loss"], "top1": metrics["val_acc"],
              "top5": metrics["val_top5"], "ece": figures["ece"], "class_names": splits.class_names,
              "per_class_accuracy": dict(per_class), "superclasses": figures["superclasses"],
              "most_confused": figures["most_confused"], "calibration_bins": figures["calibration_bins"],
              "num_processes": accelerator.num_processes, "device": device_name(accelerator),
              "mixed_precision": accelerator.mixed_precision, "eval_batch_size": eval_batch_size,
              "eval_time_s": round(seconds, 3), "images_per_s": round(count / seconds, 1)}
    same_setup = (args.split == "test" and data_cfg == cfg.data and eval_batch_size == cfg.train.eval_batch_size)
    report["trainer_last_epoch"] = trainer_record(found, metrics) if same_setup else None
    return report, figures["confusion"], logits, labels.cpu(), accelerator


def trainer_record(found: TrainedModel, metrics: dict) -> dict | None:
    """The trainer's own figures for these weights: its last epoch (final model) or the epoch whose end the
    checkpoint is; None for a mid-epoch checkpoint or a run without metrics.jsonl."""
    records = read_records(found.run_dir)
    if found.checkpoint is None:
        record = records[-1] if records else None
    else:
        step = int(found.checkpoint.removeprefix("step-"))
        record = next((r for r in records if r["step"] == step), None)
    if record is None:
        return None
    keys = ("val_loss", "val_acc", "val_top5", "val_num_samples")
    return {"epoch": record["epoch"], **{k: record[k] for k in keys},
            "eval_images_per_s": record["val_num_samples"] / max(record.get("eval_time_s", 0), 1e-9),
            "same": all(record[k] == metrics[k] for k in keys)}


def report_to_wandb(found: TrainedModel, report: dict, confusion_png: Path, output_dir: Path) -> str | None:
    """Add the figures to the run's W&B summary when it has a run id; returns the line that says what happened.

    W&B's files go beside the run's own (RUN/wandb), or, where the run's folder cannot be written (a run on a
    read-only share), into ``output_dir``, which the line then names: wandb would otherwise put them in a
    temporary folder of its own, and the line would name RUN/wandb."""
    from cifar_dist.tracking import RUN_ID_FILE, offline_retry, wandb_init_kwargs, wandb_project

    id_file = found.run_dir / RUN_ID_FILE
    if not id_file.is_file():
        return None
    try:
        import wandb
    except ImportError:
        return "W&B: not updated, wandb does not import here"
    try:
        check_writable(found.run_dir / "wandb", "W&B", "")
        home = found.run_dir
    except UserError:
        home = output_dir
    kwargs, note = wandb_init_kwargs(found.config.tracking, home, id_file.read_text().strip())
    if kwargs["mode"] == "disabled":
        return note
    if home != found.run_dir and not os.environ.get("WANDB_DIR"):
        note += f" ({found.run_dir} cannot be written)"
    prefix = "eval" if report["split"] == "test" else f"eval_{report['split']}"
    project = wandb_project(found.config.tracking)
    try:
        run = wandb.init(project=project, **kwargs)
    except Exception as exc:  # the server out of reach: into the offline copy of the run, as the trainer does
        retry = offline_retry(kwargs, exc)
        if retry is None:
            raise
        kwargs, note = retry
        run = wandb.init(project=project, **kwargs)
    run.summary.update({f"{prefix}/{k}": report[k] for k in ("loss", "top1", "top5", "ece", "num_samples")})
    run.summary[f"{prefix}/confusion"] = wandb.Image(str(confusion_png))
    run.finish()
    return note


# -- command line


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cifar_dist.evaluate", allow_abbrev=False,
                     description="Evaluate a trained cifar_dist model on a whole split (exactly as the trainer does).")
    parser.add_argument("run", metavar="RUN", help="a run's output dir, a checkpoint dir or a model.safetensors")
    parser.add_argument("--config", help="the run's config.yaml, for a model.safetensors without one beside it")
    parser.add_argument("--data-source", help="default: the run's")
    parser.add_argument("--split", choices=SPLITS, default="test", help="default: test")
    parser.add_argument("--max-eval-samples", type=int, help="only the first N images of the split (default: the "
                        "run's setting for that split)")
    parser.add_argument("--eval-batch-size", type=int, help="images per process per forward pass (default: the "
                        "run's, which exact agreement with its metrics needs)")
    parser.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), help="default: the run's")
    parser.add_argument("--image-size", type=int, help="must be the run's image size, which is the default")
    parser.add_argument("--output-dir", help="default: the run's output dir; eval-<checkpoint>[-<split>] in it for a "
                        "checkpoint or a split other than test")
    parser.add_argument("--predictions", help="also write every image's top-k classes to this CSV file")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image in --predictions (default: 5)")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=True,
                        help="add the figures to the run's W&B summary when it has a run id (default: yes)")
    return parser


def default_output_dir(found: TrainedModel, split: str) -> Path:
    tags = [t for t in (found.checkpoint, None if split == "test" else split) if t]
    return found.run_dir / f"eval-{'-'.join(tags)}" if tags else found.run_dir


def check_args(args, found: TrainedModel) -> Path:
    """Every cheap check, before a model or dataset is loaded; returns the output dir."""
    for name in ("max_eval_samples", "eval_batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 1 <= args.top_k <= found.config.model.num_classes:
        raise UserError(f"--top-k must be between 1 and {found.config.model.num_classes}, got {args.top_k}")
    check_image_size(args.image_size, found)
    from cifar_dist.tracking import RUN_ID_FILE, check_wandb_login

    if args.wandb and (found.run_dir / RUN_ID_FILE).is_file():
        check_wandb_login()  # WANDB_MODE=online without credentials: one line now, not a traceback after the pass
    if args.predictions and not Path(args.predictions).resolve().parent.is_dir():
        raise UserError(f"--predictions {args.predictions}: its folder does not exist")
    if args.predictions and Path(args.predictions).is_dir():
        raise UserError(f"--predictions {args.predictions} is a folder; give a file name for the CSV")
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(found, args.split)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file; give a folder for eval.json, eval.md and "
                        "confusion.png")
    check_output_dir(output_dir, found)
    if args.output_dir:
        check_writable(output_dir, f"--output-dir {args.output_dir}", "give a folder you can write to")
    else:  # the run's own folder, which may be on a read-only share
        check_writable(output_dir, "eval.json, eval.md and confusion.png",
                       "give --output-dir a folder you can write to")
    if args.predictions:
        check_output_file("--predictions", args.predictions, found)
        check_writable(Path(args.predictions).parent, f"--predictions {args.predictions}",
                       "give a file in a folder you can write to")
        if Path(args.predictions).resolve() in {(output_dir / name).resolve() for name in EVAL_FILES}:
            raise UserError(f"--predictions {args.predictions} is where this evaluation writes its report; "
                            "give another file name")
    return output_dir


def write_outputs(report: dict, confusion: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                  output_dir: Path, args) -> None:
    from cifar_dist.predict import write_split_predictions

    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "eval.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(output_dir / "eval.md", render_markdown(report))
    title = (f"{report['model']}: {report['split']} split, {report['num_samples']} images, "
             f"top-1 {100 * report['top1']:.2f}%")
    atomic_write_bytes(output_dir / "confusion.png", plot_confusion(confusion, report["class_names"], title))
    if args.predictions:
        write_split_predictions(Path(args.predictions), logits, labels, report["class_names"], args.top_k)


def run(args) -> dict | None:
    found = resolve_model(args.run, args.config)
    output_dir = check_args(args, found)
    if found.note and os.environ.get("RANK", "0") == "0":
        print(f"cifar_dist.evaluate: {found.note}", flush=True)
    report, confusion, logits, labels, accelerator = evaluate_model(found, args)
    if accelerator.is_main_process:
        write_outputs(report, confusion, logits, labels, output_dir, args)
        last = report["trainer_last_epoch"]
        print(f"{report['model']}, {report['split']} split ({report['num_samples']} images): loss "
              f"{report['loss']:.4f}, top-1 {100 * report['top1']:.2f}%, top-5 {100 * report['top5']:.2f}%, ECE "
              f"{100 * report['ece']:.2f}%; {report['images_per_s']:.0f} images/s on {report['num_processes']} "
              f"process(es)" + (f"; same as the trainer's epoch {last['epoch']}: {'yes' if last['same'] else 'NO'}"
                                if last else ""))
        print(f"wrote {output_dir / 'eval.json'}, eval.md, confusion.png"
              + (f" and {args.predictions}" if args.predictions else ""))
        note = report_to_wandb(found, report, output_dir / "confusion.png", output_dir) if args.wandb else None
        if note:
            print(note)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with one_line_errors("cifar_dist.evaluate"):
        run(args)


def cli() -> None:
    """The command (``python -m cifar_dist.evaluate``, ``cifar-dist-evaluate``): ``main``, then, once its report
    is written, ``cli.exit_now``, without the interpreter's teardown of torch."""
    main()
    exit_now(0)


if __name__ == "__main__":
    cli()
