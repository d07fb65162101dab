"""cifar_dist.compare on runs the real trainer made (finished, stopped, resumed), and its table and refusals."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import conftest
from cifar_dist.compare import RunRow, differing, main, table
from cifar_dist.config import make_config, save_config
from conftest import REPO, TINY, records, run_train

RUN = [*TINY, "--checkpoint-every-steps", "0"]


def compare(env, *dirs: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "cifar_dist.compare", *map(str, dirs)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def rows(text: str) -> dict[str, list[str]]:
    """Table rows by run name, as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


@pytest.mark.slow
def test_finished_stopped_and_resumed_runs(test_env, tmp_path):
    root = tmp_path / "runs"
    # Three epochs of 8 steps: a stop is acted on at the next multiple of 10 steps, so a signal sent once epoch 1
    # has ended lands before the last step even on a busy machine (at step 10 or 20).
    stopped = [*RUN, "--num-epochs", "3", "--output-dir", str(root / "long")]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cifar_dist.train", *stopped], env=test_env, cwd=REPO,
                                stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        while not (root / "long" / "metrics.jsonl").exists():  # the end of epoch 1
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 75  # stopped with a checkpoint
    step = int(re.search(r"stopped by SIGTERM at step (\d+)", (tmp_path / "log").read_text())[1])
    epochs_done = len(records(root / "long"))
    run_train(test_env, [*RUN, "--num-epochs", "1", "--lr", "3e-4", "--output-dir", str(root / "short")])

    text = compare(test_env, root)
    table_rows = rows(text)
    head = text.splitlines()[0]
    assert [c.strip() for c in head.strip("|").split("|")][:4] == ["run", "lr", "num_epochs", "status"]
    assert table_rows["long"][1:4] == ["0.001", "3", f"unfinished, checkpoint at step {step}"]
    assert table_rows["long"][8] == f"{epochs_done}/3" and table_rows["short"][3:4] == ["finished"]
    assert table_rows["short"][-2:] == ["cpu (cpu), no", "1"]
    assert (root / "compare.md").is_file() and (root / "compare.png").read_bytes()[:4] == b"\x89PNG"

    run_train(test_env, stopped)  # the same command resumes and finishes
    table_rows = rows(compare(test_env, root))
    assert table_rows["long"][3] == "finished, resumed" and table_rows["long"][8] == "3/3"
    # Sorted by best validation top-1.
    best = {name: float(cells[5].split("%")[0]) for name, cells in table_rows.items()}
    assert list(table_rows) == sorted(best, key=lambda n: -best[n])


def record(epoch: int, acc: float, **kw) -> dict:
    return {"epoch": epoch, "step": 8 * epoch, "val_loss": 1.0, "val_acc": acc, "val_top5": acc + 0.1,
            "epoch_time_s": 2.0, "train_images_per_s": 100.0 * epoch, **kw}


def test_table_sorts_by_best_and_shows_only_differences():
    base = {k: v for s in make_config().to_dict().values() for k, v in s.items()}
    runs = [RunRow(Path("a"), "a", {**base, "lr": 1e-3, "output_dir": "x"}, [record(1, 0.2), record(2, 0.4)],
                   "finished"),
            RunRow(Path("b"), "b", {**base, "lr": 3e-4, "output_dir": "y"}, [record(1, 0.5), record(2, 0.3)],
                   "unfinished"),
            RunRow(Path("c"), "c", {**base, "lr": 3e-4}, [], "not started")]
    assert differing(runs) == ["lr"]  # output_dir differs too, but says nothing about what was computed
    lines = table(runs).splitlines()
    assert lines[0].startswith("| run | lr | status | val top-1 | best top-1 (epoch) |")
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["b", "a", "c"]
    assert "| b | 0.0003 | unfinished | 30.00% | 50.00% (1) | 40.00% | 60.00% | 2/10 | 4.0 s | 150 |" in lines[2]


def test_a_last_epoch_cut_short_by_max_steps_says_so():
    # Its training figures cover 5 of the epoch's steps: "2/10" alone read as two whole epochs. The records of
    # older runs, without the mark or the batch layout, are read as whole epochs.
    base = {k: v for s in make_config().to_dict().values() for k, v in s.items()}
    layout = {"num_processes": 2, "per_device_batch_size": 16, "grad_accum_steps": 1}
    runs = [RunRow(Path("a"), "a", base, [record(1, 0.2), record(2, 0.4, partial=True, steps_in_epoch=5, **layout)],
                   "unfinished"),
            RunRow(Path("b"), "b", base, [record(1, 0.5)], "unfinished")]
    lines = table(runs).splitlines()
    assert "| 40.00% | 40.00% (2) | 50.00% | 50.00% | 2/10 (partial, 5 steps) | 4.0 s | 150 |" in lines[3]
    assert "| 1/10 | 2.0 s | 100 |" in lines[2]


def refused(capsys, argv) -> str:
    return conftest.refused(capsys, main, argv)


def test_refusals_and_unreadable_runs(tmp_path, capsys):
    assert "/nope: no such folder" in refused(capsys, ["/nope"])
    assert "no runs below" in refused(capsys, [str(tmp_path)])
    run = tmp_path / "r"
    run.mkdir()
    save_config(make_config(), run / "config.yaml")
    assert f"--output-dir {run / 'config.yaml'} is a file; give a folder for compare.md and compare.png" in refused(
        capsys, [str(tmp_path), "--output-dir", str(run / "config.yaml")])
    # An --output-dir that does not exist yet is made, parents too (evaluate makes its own); not for a refusal.
    (tmp_path / "empty").mkdir()
    assert "no runs below" in refused(capsys, [str(tmp_path / "empty"), "--output-dir", str(tmp_path / "a" / "b")])
    assert not (tmp_path / "a").exists()
    (run / "metrics.jsonl").write_text('{"epoch": 1,\n')  # cut off mid-write by hand
    main([str(tmp_path), "--output-dir", str(tmp_path / "a" / "b")])
    assert "| r | unreadable: " in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["compare.md", "compare.png"]


def test_a_run_whose_config_is_not_utf8_is_an_unreadable_row_and_the_others_are_listed(tmp_path, capsys):
    for name in ("good", "latin1"):
        (tmp_path / name).mkdir()
    save_config(make_config(), tmp_path / "good" / "config.yaml")
    bad = tmp_path / "latin1" / "config.yaml"
    bad.write_bytes("# résumé\nnum_epochs: 1\n".encode("latin-1"))
    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| good | unfinished |" in out
    assert f"| latin1 | unreadable: --config {bad}: must be UTF-8 text (byte 0xe9 on line 1 is not); " in out


def test_a_run_replaced_by_a_stopped_overwrite_start(tmp_path, capsys):
    from cifar_dist.rundir import FreshStart

    run = tmp_path / "r"
    run.mkdir()
    save_config(make_config(), run / "config.yaml")
    FreshStart(run).begin(overwrite=True)
    save_config(make_config(), run / "config.yaml")  # the new start's, killed before its first checkpoint
    main([str(tmp_path)])
    assert "| r | replaced by an --overwrite start with no checkpoint yet; the run is in .previous-run/ |" in \
        capsys.readouterr().out


def test_a_run_that_a_live_process_holds_is_training_now(tmp_path, capsys):
    from cifar_dist.rundir import acquire_lock

    run = tmp_path / "r"
    run.mkdir()
    save_config(make_config(), run / "config.yaml")
    lock, _ = acquire_lock(run)  # this process, alive on this host: as a run training there
    try:
        main([str(tmp_path)])
        assert f"| r | training now (pid {os.getpid()} on " in capsys.readouterr().out
    finally:
        lock.release()
    main([str(tmp_path)])  # ended: its lock gone
    assert "| r | unfinished |" in capsys.readouterr().out


def test_runs_in_a_folder_that_cannot_be_written_are_compared_into_another(tmp_path, capsys):
    shared, mine = tmp_path / "shared", tmp_path / "mine"
    (shared / "r").mkdir(parents=True)
    mine.mkdir()
    save_config(make_config(), shared / "r" / "config.yaml")
    with conftest.read_only(shared):
        line = refused(capsys, [str(shared)])
        assert line.startswith(f"cifar_dist.compare: error: compare.md and compare.png: cannot write into {shared} (")
        assert line.endswith("); give --output-dir a folder you can write to")
        main([str(shared), "--output-dir", str(mine)])
    assert "| r | unfinished |" in capsys.readouterr().out
    assert sorted(p.name for p in mine.iterdir()) == ["compare.md", "compare.png"]
