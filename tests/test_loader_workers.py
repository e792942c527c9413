"""Data-loader workers: the batches, their resume and the corrupt-image counts do not depend on how many worker
processes decode them; no worker outlives a run (success, exception, Ctrl-C); the progress report.

Images are the 4x4 PNGs of test_data.py (every pixel = the example's id), so a batch says what it holds.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time

import datasets
import psutil
import pytest
import torch
from rich.console import Console

from mpl_large.data.loader import BatchStream
from mpl_large.data.pipeline import split_workers
from mpl_large.data.sources import load_images
from mpl_large.progress import PhaseProgress
from multiproc import ROOT, WORKERS
from test_data import assert_same_batches, in_memory, two_views

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 parquet shards of 10 rows (ids 0..29); row 13 holds random bytes."""
    root = tmp_path_factory.mktemp("shards")
    full = in_memory(30, corrupt=(13,))
    paths = [root / f"part-{k}.parquet" for k in range(3)]
    for k, path in enumerate(paths):
        full.shard(3, k, contiguous=True).to_parquet(str(path))
    return paths


def source(kind, shards):
    return in_memory(23, corrupt=(4, 9)) if kind == "map" else load_images(shards, streaming=True)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # more than the 2 CPUs here
@pytest.mark.parametrize("kind", ["map", "streaming"])
def test_same_batches_counts_and_resume_for_0_1_3_workers(kind, shards, caplog):
    """8 batches of 5 (map: 23 examples, 2 corrupt; streaming: 30 in 3 shards, 1 corrupt, blocks of 4) cross
    epoch, shard and block boundaries; every worker count gives the same batches, counts the same corrupt
    images, logs them with their location in this process; a stream resumed with 2 workers in the middle of
    an epoch (and of a shard and block) goes on exactly."""
    ds = source(kind, shards)
    kw = dict(seed=3, shuffle_block=4)
    runs, counts, states = {}, {}, []
    for workers in (0, 1, 3):
        stream = BatchStream(ds, 5, two_views, workers=workers, **kw)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            batches = []
            for _ in range(8):
                batches.append(next(stream))
                if workers == 0:
                    states.append(json.loads(json.dumps(stream.state_dict())))
        stream.close()
        runs[workers], counts[workers] = batches, stream.corrupt_log.count
        assert caplog.text.count("skipping unreadable image") == stream.corrupt_log.count
        assert ("row 4" if kind == "map" else "stream position") in caplog.text
    assert counts[0] >= (2 if kind == "map" else 1) and counts[0] == counts[1] == counts[3]
    assert all(len(b.indices) == 5 for b in runs[0])
    assert_same_batches(runs[1], runs[0])
    assert_same_batches(runs[3], runs[0])
    for k in (2, 6):  # map: mid-epoch 0 and mid-epoch 1; streaming: mid-shard, mid-block (positions 15, 35)
        resumed = BatchStream(ds, 5, two_views, workers=2, **kw)
        resumed.load_state_dict(states[k])
        assert_same_batches([next(resumed) for _ in range(7 - k)], runs[0][k + 1:])
        resumed.close()


def test_split_workers_between_streams():
    assert split_workers(0, 4, 4) == (0, 0)
    assert split_workers(1, 4, 4) == (0, 1)
    assert split_workers(2, 4, 4) == (1, 1)
    assert split_workers(8, 4, 4) == (2, 6)
    assert split_workers(8, 4, 28) == (1, 7)


# ---------------------------------------------------------------------------------------------------------
# No worker outlives a run


def children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_no_worker_outlives_the_run(tmp_path):
    """Real training runs with 2 data workers, in one process (tests/workers/loader_run.py): one raises in a
    step, one gets Ctrl-C (SIGINT to the process group, as a terminal sends it, workers included), one ends
    normally. After each failed run the process finds no worker of its own left; once it has exited, none of
    the workers seen while it ran is left. The last run's data holds a corrupt image, skipped in a worker: it
    is logged with its path and counted in results.json."""
    run = subprocess.Popen([sys.executable, str(WORKERS / "loader_run.py"), str(tmp_path)], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    interrupted, deadline = False, time.time() + 300
    while run.poll() is None and time.time() < deadline:
        seen.update({c.pid: c for c in children(run.pid)})
        metrics = tmp_path / "sigint" / "metrics.jsonl"
        if not interrupted and metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            os.killpg(run.pid, signal.SIGINT)
            interrupted = True
        time.sleep(0.02)
    if run.poll() is None:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail(f"loader_run.py still running after 300 s (Ctrl-C sent: {interrupted})\n"
                    f"{run.communicate()[0][-3000:]}")
    output = run.communicate(timeout=60)[0]
    assert run.returncode == 0, output[-3000:]
    assert "exception: no worker left" in output and "sigint: no worker left" in output
    assert len(seen) >= 4, f"too few data workers seen: {len(seen)}"
    time.sleep(0.5)
    assert not [p.pid for p in seen.values() if alive(p)], f"workers outlived the run\n{output[-3000:]}"
    assert json.loads((tmp_path / "success" / "results.json").read_text())["skipped_images"] >= 1
    assert "broken.png" in output


# ---------------------------------------------------------------------------------------------------------
# Progress


def test_progress_bar_keeps_count_rate_and_eta_at_80_columns():
    """In an 80-column terminal the bar's count, step rate and ETA stay whole; only the metrics are cut."""
    clock = iter(range(0, 10_000, 2))  # 2 s per step
    console = Console(width=80, file=io.StringIO(), force_terminal=True, record=True)
    progress = PhaseProgress("finetune", 300_000, 12_000, enabled=True, console=console)
    assert progress.bar
    progress._progress.get_time = lambda: float(next(clock))
    for step in range(12_001, 12_006):
        progress.update(step, {"h": 1.5e-3, "teacher_accuracy": 0.5, "student_accuracy": 0.4, "teacher_lr": 0.05,
                               "student_lr": 0.05, "images_per_s": 300.0})
    console.print(progress._progress.make_tasks_table(progress._progress.tasks))
    [line] = console.export_text().splitlines()
    assert len(line) <= 80 and line.endswith("…"), line
    assert "12005/300000 0.5 step/s ETA 159:59:50 h=0.0015" in line, line


def test_plain_progress_line_when_not_a_terminal():
    out = io.StringIO()
    progress = PhaseProgress("finetune", 100, 0, enabled=True, console=Console(file=io.StringIO()), stream=out)
    assert not progress.bar
    progress.update(9, None)
    progress.update(10, {"accuracy": 0.25, "lr": 0.01, "images_per_s": 123.4, "loss": 1.0})
    line = out.getvalue().splitlines()
    assert len(line) == 1
    assert line[0].startswith("finetune 10/100 | 123.4 img/s | ETA ") and line[0].endswith("accuracy=0.25 lr=0.01")
