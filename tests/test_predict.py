"""cifar_dist.predict in-process: files of any size and mode to CIFAR's 32x32, streaming in batches, bad files
reported and skipped, CSV and JSON output, refusals. (Agreement with evaluate on a real run: test_evaluate.py.)"""

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import conftest
from cifar_dist.checkpoint import save_model
from cifar_dist.config import make_config, save_config
from cifar_dist.model import build_model
from cifar_dist.predict import (
    PredictionWriter,
    build_loader,
    find_images,
    load_cifar_image,
    main,
    predict_files,
    to_rgb,
)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("fmt, factor, mode, kw", [
    ("png", 1, "RGB", {}), ("png", 5, "RGBA", {}), ("webp", 2, "RGB", {"lossless": True}),
    ("png", 3, "P", {})])
def test_lossless_files_of_any_size_come_back_as_the_same_pixels(image, tmp_path, fmt, factor, mode, kw):
    # Nearest-neighbour enlargement by an integer factor is undone exactly by area averaging.
    big = Image.fromarray(image).resize((32 * factor,) * 2, Image.Resampling.NEAREST)
    if mode == "P":  # a palette image: its 8-colour source survives the palette exactly
        source = (image // 128) * 255
        big = Image.fromarray(source).resize((32 * factor,) * 2, Image.Resampling.NEAREST).convert("P")
        image = source
    path = save(big.convert(mode), tmp_path / f"x.{fmt}", **kw)
    assert np.array_equal(load_cifar_image(path), image)


def test_area_averaging_jpeg_and_odd_shapes(tmp_path):
    # A 64x64 checkerboard of 2x2 cells averages to flat grey; a 100x40 image is squeezed, not cropped.
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    out = load_cifar_image(save(Image.fromarray(board), tmp_path / "board.png"))
    assert out.shape == (32, 32, 3) and np.all(np.abs(out.astype(int) - 128) <= 1)
    wide = np.zeros((40, 100, 3), dtype=np.uint8)
    wide[:, 50:] = 200
    out = load_cifar_image(save(Image.fromarray(wide), tmp_path / "wide.jpg", quality=95))
    assert out.shape == (32, 32, 3) and out[:, :15].max() < 20 and out[:, 17:].min() > 180


def test_modes_transparency_16_bit_and_exif(tmp_path):
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    deep = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))
    assert to_rgb(deep).getpixel((0, 0)) == (40000 >> 8,) * 3  # scaled, not clipped to 255
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)
    # EXIF orientation 6 (rotate 90 degrees clockwise to view): a left-half-white image becomes top-half-white.
    half = np.zeros((64, 64), dtype=np.uint8)
    half[:, :32] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(Image.fromarray(half).convert("RGB"), tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = load_cifar_image(path)
    assert out[:12].min() > 200 and out[20:].max() < 50


def test_find_images(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.PNG", "a/b/2.jpeg", "a/b/3.webp", "a/notes.txt", "z.jpg"):
        (tmp_path / name).write_bytes(b"")
    found = find_images([str(tmp_path / "a"), str(tmp_path / "z.jpg")])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/1.PNG", "a/b/2.jpeg", "a/b/3.webp", "z.jpg"]


def test_batches_stream_and_bad_files_are_data(image, tmp_path):
    paths = [save(Image.fromarray(image), tmp_path / f"{i}.png") for i in range(6)]
    paths[4].write_bytes(b"not an image")
    loader = iter(build_loader(paths, batch_size=2, workers=0))
    indices, images, errors = next(loader)
    assert indices == [0, 1] and images.shape == (2, 32, 32, 3) and errors == []
    # Files are read a batch at a time: one removed after the first batch is reported, not already held.
    paths[5].unlink()
    batches = list(loader)
    assert [b[0] for b in batches] == [[2, 3], []]
    assert [(i, why.split(":")[0]) for b in batches for i, why in b[2]] == [(4, "UnidentifiedImageError"),
                                                                           (5, "FileNotFoundError")]


def test_writer_formats():
    for fmt in ("csv", "json"):
        out = io.StringIO()
        writer = PredictionWriter(out, fmt, top_k=2)
        writer.write("a, b.png", ["cat", "dog"], [0.75, 0.2500004])
        writer.write("c.png", ["dog", "cat"], [0.5, 0.5])
        writer.close()
        if fmt == "csv":
            rows = list(csv.DictReader(io.StringIO(out.getvalue())))
            assert rows[0] == {"file": "a, b.png", "class_1": "cat", "prob_1": "0.75", "class_2": "dog",
                               "prob_2": "0.25"}
        else:
            rows = json.loads(out.getvalue())
            assert rows[1] == {"file": "c.png", "top_k": [{"class": "dog", "prob": 0.5}, {"class": "cat", "prob": 0.5}]}
    empty = io.StringIO()
    PredictionWriter(empty, "json", 1).close()
    assert json.loads(empty.getvalue()) == []


def test_predict_files_in_order_with_failures(image, tmp_path, capsys):
    from accelerate.state import AcceleratorState

    from cifar_dist.predict import build_accelerator

    paths = [save(Image.fromarray(image), tmp_path / f"{i}.png") for i in range(3)]
    paths[1].write_bytes(paths[0].read_bytes()[:100])  # truncated
    model = build_model(make_config(weights="none", image_size=32).model, 32).eval()
    try:
        accelerator = build_accelerator("cpu", "no")
        out = io.StringIO()
        failed = predict_files(accelerator.prepare(model), accelerator, paths, [f"c{i}" for i in range(100)],
                               PredictionWriter(out, "csv", 3), 3, batch_size=2, workers=0)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert [p.name for p, _ in failed] == ["1.png"]
    assert f"cifar_dist.predict: cannot read {paths[1]}: " in capsys.readouterr().err
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["file"] for r in rows] == [str(paths[0]), str(paths[2])]
    assert rows[0]["class_1"] == rows[1]["class_1"]  # the same image
    with torch.no_grad():
        expected = model(torch.from_numpy(image)[None]).softmax(1).max().item()
    assert float(rows[0]["prob_1"]) == pytest.approx(expected, abs=1e-5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = make_config(data_source="synthetic", image_size=32, weights="none")
    save_config(cfg, run / "config.yaml")
    save_model(build_model(cfg.model, 32), run / "model.safetensors")
    return run


def refused(capsys, argv) -> str:
    return conftest.refused(capsys, main, argv)


def test_refusals(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "expected RUN and at least one image file or folder" in refused(capsys, [str(run_dir)])
    assert "/nope: no such file or folder" in refused(capsys, [str(run_dir), "/nope"])
    assert "no PNG, JPEG or WebP files in" in refused(capsys, [str(run_dir), str(tmp_path / "empty")])
    assert "--top-k must be positive, got 0" in refused(capsys, [str(run_dir), str(tmp_path), "--top-k", "0"])
    assert "--top-k 101: the model has only 100 classes" in refused(capsys, [str(run_dir), str(tmp_path),
                                                                             "--top-k", "101"])
    assert "--batch-size must be positive" in refused(capsys, [str(run_dir), str(tmp_path), "--batch-size", "0"])
    assert "--image-size 224: this model was trained at 32 px" in refused(
        capsys, [str(run_dir), str(tmp_path), "--image-size", "224"])
    assert "--output /nope/out.csv: its folder does not exist" in refused(
        capsys, [str(run_dir), str(tmp_path), "--output", "/nope/out.csv"])
    assert "invalid choice: 'xml'" in refused(capsys, [str(run_dir), str(tmp_path), "--format", "xml"])
    assert f"--output {tmp_path / 'empty'} is a folder; give a file name" in refused(
        capsys, [str(run_dir), str(tmp_path), "--output", str(tmp_path / "empty")])


def test_refused_under_a_launcher(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "predict runs as one process" in refused(capsys, [str(run_dir), str(tmp_path)])


def test_config_over_the_runs_own_is_refused(run_dir, tmp_path, capsys):
    other = tmp_path / "other.yaml"
    save_config(make_config(data_source="synthetic", image_size=64, weights="none"), other)
    line = refused(capsys, [str(run_dir), str(tmp_path), "--config", str(other)])
    assert f"--config {other}: {run_dir / 'model.safetensors'} has its own config" in line


def test_outputs_over_inputs_or_the_runs_files_are_refused(run_dir, image, tmp_path, capsys):
    # --output imgs/a0.png wrote the CSV over the input image it was predicting.
    photo = save(Image.fromarray(image), tmp_path / "a0.png")
    before = photo.read_bytes()
    assert f"--output {photo} is one of the input images" in refused(
        capsys, [str(run_dir), str(tmp_path), "--output", str(photo)])
    assert f"--output {run_dir / 'model.safetensors'} is the model's weights" in refused(
        capsys, [str(run_dir), str(tmp_path), "--output", str(run_dir / "model.safetensors")])
    assert f"is among the run's own files (eval.json in {run_dir})" in refused(
        capsys, [str(run_dir), str(tmp_path), "--output", str(run_dir / "eval.json")])
    assert photo.read_bytes() == before and not (run_dir / "eval.json").exists()
    # An earlier call's output is written again.
    (tmp_path / "out.csv").write_text("old\n")
    from accelerate.state import AcceleratorState

    try:
        assert main([str(run_dir), str(photo), "--output", str(tmp_path / "out.csv")]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert (tmp_path / "out.csv").read_text().startswith("file,class_1,prob_1")


def test_an_output_in_a_folder_that_cannot_be_written_is_refused_before_any_image_is_read(run_dir, image,
                                                                                          tmp_path, capsys):
    photo = save(Image.fromarray(image), tmp_path / "a0.png")
    shared = tmp_path / "shared"
    shared.mkdir()
    with conftest.read_only(shared):
        line = refused(capsys, [str(run_dir), str(photo), "--output", str(shared / "out.csv")])
    assert line.startswith(f"cifar_dist.predict: error: --output {shared / 'out.csv'}: cannot write into {shared} (")
    assert line.endswith("); give a file in a folder you can write to")
