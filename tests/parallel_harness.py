"""Multi-rank parity tests: run a function as N real ranks (processes forked from the test process, gloo
over TCP) collecting what each rank returns, and compare tensors against the unsplit computation.

Forked ranks start in milliseconds where spawned ones re-import torch and timm (seconds each on a busy
2-core machine), so a test module runs all its multi-rank cases in one world per size (a module-scoped
fixture) and reports them case by case.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist

from mpl_large.ranks import free_port


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, results, args: tuple) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
        out = fn(rank, world_size, *args)
        dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - every failure goes back to the test, with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)


def run_ranks(fn: Callable, world_size: int, *args, timeout: float = 600) -> list:
    """fn(rank, world_size, *args) on `world_size` forked ranks; the list of their return values (which must
    pickle). If any rank fails, the others are stopped and the failures raised."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, results, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outputs, failures = {}, []
    try:
        while len(outputs) + len(failures) < world_size:
            try:
                rank, ok, out = results.get(timeout=timeout)
            except queue.Empty:
                failures.append(f"timed out after {timeout:.0f} s waiting for a rank")
                break
            if ok:
                outputs[rank] = out
            else:
                failures.append(f"--- rank {rank} ---\n{out}")
                break  # the others may be blocked in a collective with the failed rank
    finally:
        for p in procs:
            if failures and p.is_alive():
                p.kill()
            p.join()
    if failures:
        raise AssertionError(f"{getattr(fn, '__name__', fn)} on {world_size} ranks failed:\n" + "\n".join(failures))
    return [outputs[r] for r in range(world_size)]


def mismatch(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5, floor: float = 1.0) -> list[str]:
    """[] when max |got - want| <= tol * max(floor, max |want|), else a message naming `name`.

    The scale is the tensor's, not each element's: a weight-gradient element is a sum of many terms, and
    where they cancel to near zero its fp32 rounding error is still that of the terms."""
    if got.shape != want.shape:
        return [f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"]
    err, scale = (got.double() - want.double()).abs().max().item(), max(floor, want.abs().max().item())
    return [f"{name}: off by {err:.3g} at scale {scale:.3g}"] if err > tol * scale else []
