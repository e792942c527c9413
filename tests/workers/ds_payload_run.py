"""One rank of the no-pickle test (tests/test_run_integrity.py): a small supervised run in a DeepSpeed engine
checkpointing every 2 steps. argv: OUT DATA DEEPSPEED [--resume]."""

import sys

from mpl_large.config import DataConfig, FinetuneConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from mpl_large.trainer import train

if __name__ == "__main__":
    out, data, deepspeed = sys.argv[1:4]
    train(TrainConfig(
        name="payload", out_dir=out, method="supervised", steps=4, batch_size=4,
        teacher=ModelConfig("digits_cnn", num_classes=3), teacher_optim=OptimConfig(lr=0.05),
        data=DataConfig(labeled=data, augment="svhn", image_size=8), finetune=FinetuneConfig(steps=0),
        progress=False, checkpoint_every=2, parallel=ParallelConfig(deepspeed=deepspeed), resume="--resume" in sys.argv,
    ))
