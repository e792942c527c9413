"""Per-rank memory, time and traffic of a training step with each image split along its width (paper §4),
at spatial degree 1, 2 and 4, for a fixed model and resolution.

Each degree runs as that many ranks of one replica (processes forked from this one, gloo on CPU), every
rank on its strip of the same batch, through `mpl_large.parallel.parallelize`. Per rank it reports

    saved     bytes autograd holds for backward at the end of the forward (unique storages, parameters
              excluded): the activation memory proper, exact and free of allocator noise
    peak      resident-set high-water mark of forward + backward above the level before it
              (`mpl_large.memory.measure.MemoryTracker`): saved activations plus transients, received halos, gloo's
              buffers; gradients already exist (zeroed, not freed) and do not count
    time      median wall time of a step: forward, backward, gradient average, SGD update
    halo      bytes this rank sends point to point per step (halo columns forward, their gradients back)
    coll      payload bytes of its activation collectives per step (BN statistics and their backward sums,
              pooled sums, widths)
    grad      payload bytes of the gradient all-reduce per step (what DDP or ZeRO would move instead)

and the ratio of the worst rank's `saved` and `peak` to degree 1 against the targets: <= 0.6 at degree 2,
<= 0.35 at degree 4. Times on a shared 2-core CPU with more ranks than cores are not a scaling result.

    .venv/bin/python benchmarks/spatial_memory.py                       # efficientnet_b0, 256x256, batch 4
    .venv/bin/python benchmarks/spatial_memory.py --model wrn_28_2 --image-size 32 --labeled-batch 16

The script re-executes itself with `mpl_large.memory.measure.MEASURE_ENV` (a fixed glibc mmap threshold, so freed
tensors leave the resident set; one non-spinning OpenMP thread per rank) unless already set.
"""

from __future__ import annotations

import argparse
import os
import sys

TARGETS = {2: 0.6, 4: 0.35}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_b0", help="timm model name")
    p.add_argument("--image-size", type=int, default=256, help="square input resolution")
    p.add_argument("--labeled-batch", type=int, default=4, help="images per step (one replica)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4], help="spatial degrees to run")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one untimed)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def ensure_env() -> None:
    from mpl_large.memory.measure import MEASURE_ENV

    missing = {k: v for k, v in MEASURE_ENV.items() if k not in os.environ}
    if missing:
        print(f"note: re-executing with {' '.join(f'{k}={v}' for k, v in missing.items())}", file=sys.stderr)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})


def rank_main(rank: int, degree: int, port: int, args: argparse.Namespace, results) -> None:
    """One rank: build, warm up, then measure memory, traffic and time of the step."""
    import datetime
    import statistics
    import time

    import timm
    import torch
    import torch.distributed as dist

    import mpl_large.models  # noqa: F401  (registers wrn_28_*)
    from mpl_large.memory.measure import MemoryTracker
    from mpl_large.parallel import ParallelDims, parallelize, reduce_gradients, split_width

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=degree,
                                timeout=datetime.timedelta(seconds=600))
        dims = ParallelDims(sp=degree).build()
        torch.manual_seed(args.seed)
        model = parallelize(timm.create_model(args.model, num_classes=args.num_classes), dims).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator().manual_seed(args.seed)
        images = torch.randn(args.labeled_batch, 3, args.image_size, args.image_size, generator=gen)
        labels = torch.randint(0, args.num_classes, (args.labeled_batch,), generator=gen)
        x = split_width(images, dims)

        def loss_fn() -> torch.Tensor:
            return torch.nn.functional.cross_entropy(model(x), labels)

        def step() -> None:
            loss_fn().backward()
            reduce_gradients(model, dims)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)

        step()  # gradients and optimizer state now exist; later steps only allocate activations

        traffic = {"halo": 0, "coll": 0}
        real = dist.batch_isend_irecv, dist.all_reduce, dist.all_gather

        def counted_p2p(ops):
            traffic["halo"] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op == dist.isend)
            return real[0](ops)

        def counted_all_reduce(tensor, *a, **kw):
            traffic["coll"] += tensor.numel() * tensor.element_size()
            return real[1](tensor, *a, **kw)

        dist.batch_isend_irecv, dist.all_reduce = counted_p2p, counted_all_reduce
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with MemoryTracker() as mem:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = loss_fn()
            loss.backward()
        activation_traffic = dict(traffic)
        traffic["coll"] = 0
        reduce_gradients(model, dims)
        grad_bytes = traffic["coll"]
        dist.batch_isend_irecv, dist.all_reduce = real[0], real[1]
        optimizer.zero_grad(set_to_none=False)

        times = []
        for _ in range(args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        results.put((rank, dict(saved=sum(saved.values()), peak=mem.peak, time=statistics.median(times),
                                **activation_traffic, grad=grad_bytes)))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported by the parent, which stops the other ranks
        import traceback

        results.put((rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_degree(degree: int, args: argparse.Namespace) -> list[dict]:
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, degree, port, args, results)) for r in range(degree)]
    for p in procs:
        p.start()
    out: dict[int, dict] = {}
    try:
        for _ in procs:
            rank, value = results.get(timeout=1800)
            if isinstance(value, str):
                raise RuntimeError(f"degree {degree}, rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            if p.is_alive() and len(out) < degree:
                p.kill()
            p.join()
    return [out[r] for r in range(degree)]


def main() -> None:
    args = parse_args()
    ensure_env()
    import timm  # noqa: F401  (imported once, before the ranks fork)
    import torch  # noqa: F401

    mib = 1 << 20
    print(f"{args.model}, {args.image_size}x{args.image_size}, batch {args.labeled_batch}, {os.cpu_count()} CPUs; per rank:")
    print(f"{'degree':>6} {'rank':>4} {'saved MiB':>10} {'peak MiB':>9} {'time s':>7} {'halo MiB':>9} "
          f"{'coll KiB':>9} {'grad MiB':>9}")
    worst = {}
    for degree in args.degrees:
        ranks = run_degree(degree, args)
        for r, m in enumerate(ranks):
            print(f"{degree:>6} {r:>4} {m['saved'] / mib:>10.1f} {m['peak'] / mib:>9.1f} {m['time']:>7.2f} "
                  f"{m['halo'] / mib:>9.2f} {m['coll'] / 1024:>9.1f} {m['grad'] / mib:>9.1f}")
        worst[degree] = {k: max(m[k] for m in ranks) for k in ("saved", "peak", "time")}
    if 1 in worst:
        print("worst rank vs degree 1:")
        for degree, w in worst.items():
            if degree == 1:
                continue
            target = TARGETS.get(degree)
            verdicts = []
            for key in ("saved", "peak"):
                ratio = w[key] / worst[1][key]
                verdict = "" if target is None else (" ok" if ratio <= target else " MISSED")
                verdicts.append(f"{key} {ratio:.3f}{verdict}")
            target_text = f" (target <= {target})" if target else ""
            print(f"  degree {degree}{target_text}: {', '.join(verdicts)}, time {w['time'] / worst[1]['time']:.2f}x")


if __name__ == "__main__":
    main()
