"""The benchmark runs end to end on the CPU at a tiny size; it asserts nothing about speed."""

import json
import subprocess
import sys

from conftest import REPO


def test_bench_reports_every_cpu_variant(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "cifar_dist.bench", "--image-size", "32", "--steps", "2",
                           "--warmup", "1", "--workers", "0", "--eval-batch-size", "64", "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == ["straight_port", "eager", "channels_last", "cached_trunk",
                                                          "eval"]
    assert all(r["images_per_s"] > 0 for r in report["results"])
    assert report["results"][0]["vs_straight_port"] == 1.0
    assert report["device"] and report["torch"] and report["precision"] == "fp32"
    assert "| straight_port |" in proc.stdout and "| eval |" in proc.stdout


def test_bench_refuses_bad_sizes():
    proc = subprocess.run([sys.executable, "-m", "cifar_dist.bench", "--steps", "0"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 2 and "--steps must be positive" in proc.stderr
