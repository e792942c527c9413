"""Three small supervised runs with 2 data-loader workers in one process, for tests/test_loader_workers.py
(argv: ROOT): `exception` (a step raises at step 3), `sigint` (runs until the test sends Ctrl-C) and `success`
(6 steps; the data holds one corrupt image). After each failed run this process checks that no worker is left
before going on, and prints `<run>: no worker left`."""

import random
import signal
import sys
from pathlib import Path

import psutil

from images import image_folder
from mpl_large import steps
from mpl_large.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from mpl_large.trainer import train


def run(root: Path, name: str, data: Path, steps_: int) -> None:
    train(TrainConfig(
        name=name, out_dir=str(root / name), method="supervised", seed=0, steps=steps_, batch_size=4,
        teacher=ModelConfig("digits_cnn", num_classes=3), teacher_optim=OptimConfig(lr=0.01, total_steps=6),
        data=DataConfig(labeled=str(data), augment="svhn", image_size=8, workers=2), log_every=1, progress=False,
    ))


def no_worker_left(name: str) -> None:
    # PyTorch's shutdown joins each worker for 5 s, then terminates it without waiting: on a loaded machine a
    # terminated worker may take a moment to go. One that is still there after 10 s is left running.
    _, alive = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=10)
    left = [p.pid for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"{name}: workers {left} outlived the run"
    print(f"{name}: no worker left", flush=True)


if __name__ == "__main__":
    # Ctrl-C must raise KeyboardInterrupt even when this process inherited SIGINT ignored (a background job of
    # a non-interactive shell, e.g. `make test &`): Python installs its handler only where SIGINT is not ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    root = Path(sys.argv[1])
    data = image_folder(root / "data", 12, size=8)
    step = steps.FinetuneStep.__call__

    def failing(self, x, y, t):
        if t == 3:
            raise RuntimeError("a step failed")
        return step(self, x, y, t)

    steps.FinetuneStep.__call__ = failing
    try:
        run(root, "exception", data, 6)
    except RuntimeError as error:
        assert str(error) == "a step failed", error
    no_worker_left("exception")
    steps.FinetuneStep.__call__ = step
    try:
        run(root, "sigint", data, 100_000)
    except KeyboardInterrupt:
        no_worker_left("sigint")
    (data / "class0" / "broken.png").write_bytes(random.Random(0).randbytes(100))
    run(root, "success", data, 6)
