"""What the experiments share: runs in forked worker processes, and the report they write."""

from __future__ import annotations

import io
import json
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch
from rich.console import Console
from rich.table import Table

from mpl_large.config import save_config

R = TypeVar("R")


def _init_worker() -> None:
    torch.set_num_threads(1)


def fork_map(run: Callable[..., R], tasks: list[tuple], workers: int) -> list[R]:
    """`run(*task)` for every task, in order: in this process with `workers == 1`, else in up to `workers`
    forked processes with one torch thread each.

    Fork, not spawn: a spawned worker re-imports torch, sklearn and timm, several seconds each, a large
    share of a small experiment's budget. Forked workers set one torch thread before their first op, as
    torch's DataLoader workers do, so they never enter the parent's OpenMP pool."""
    if workers == 1:
        return [run(*task) for task in tasks]
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("fork"),
                             initializer=_init_worker) as pool:
        return list(pool.map(run, *zip(*tasks)))


def start_report(cfg, out_dir: str) -> Path:
    """The output directory, with the experiment's config.json in it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    return out


def write_report(paths: dict[str, str], results: dict, table: Table, console: Console | None = None) -> None:
    """results.json and table.txt (the table as text) at `paths`, and the table printed."""
    Path(paths["results.json"]).write_text(json.dumps(results, indent=2) + "\n")
    record = Console(record=True, width=120, file=io.StringIO())
    record.print(table)
    Path(paths["table.txt"]).write_text(record.export_text())
    (console or Console()).print(table)
