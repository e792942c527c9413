"""One rank of the kill -9 / resume test (tests/test_checkpoint.py): a small MPL + finetune run on
2 ranks with ZeRO-3, checkpointing every 2 steps. argv: OUT DATA [--resume] [--workers=N] (data-loader workers
per rank, default 0)."""

import sys

from mpl_large.config import (DataConfig, FinetuneConfig, MPLConfig, ModelConfig, OptimConfig, ParallelConfig,
                               TrainConfig)
from mpl_large.trainer import train


def config(out: str, data: str, resume: bool, workers: int) -> TrainConfig:
    model = ModelConfig("digits_cnn", num_classes=3, drop_rate=0.3)
    optim = OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, schedule="cosine", warmup_steps=2,
                        total_steps=10)
    return TrainConfig(
        name="resume", out_dir=out, method="mpl", seed=3, steps=10, batch_size=4, mu=2, teacher=model,
        student=model, teacher_optim=optim, student_optim=optim,
        mpl=MPLConfig(uda_factor=1.0, uda_threshold=0.0, uda_ramp_steps=2),
        data=DataConfig(labeled=data, unlabeled=data, augment="svhn", image_size=8, workers=workers),
        finetune=FinetuneConfig(steps=4, batch_size=4, optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9)),
        log_every=1, progress=False, checkpoint_every=2, resume=resume, parallel=ParallelConfig(deepspeed="zero3"),
    )


if __name__ == "__main__":
    workers = [int(a.split("=")[1]) for a in sys.argv if a.startswith("--workers=")]
    train(config(sys.argv[1], sys.argv[2], "--resume" in sys.argv, workers[0] if workers else 0))
