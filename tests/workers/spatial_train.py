"""The trainer with spatial partitioning (tests/test_zero.py): MPL + finetune of WRN-28-2 on generated
images, in one process or as one rank of a ZeRO-3 run with each image split across 2 ranks.
argv: OUT DATA EVAL {single,spatial}."""

import sys

from mpl_large.config import (DataConfig, FinetuneConfig, MPLConfig, ModelConfig, OptimConfig, ParallelConfig,
                               TrainConfig)
from mpl_large.trainer import train

out, data, evaluation, mode = sys.argv[1:5]
model = ModelConfig("wrn_28_2", num_classes=3)
optim = OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, schedule="cosine", total_steps=3)
train(TrainConfig(
    name="spatial", out_dir=out, method="mpl", seed=0, steps=3, batch_size=4, mu=1, teacher=model, student=model,
    teacher_optim=optim, student_optim=optim,
    # argmax labels: the two runs draw from differently advanced RNG streams (DeepSpeed's set-up).
    mpl=MPLConfig(pseudo_labels="argmax", uda_factor=1.0, uda_threshold=0.0, uda_ramp_steps=1),
    data=DataConfig(labeled=data, unlabeled=data, eval=evaluation, augment="cifar10", image_size=32),
    finetune=FinetuneConfig(steps=1, batch_size=4, optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9)),
    progress=False, **({"parallel": ParallelConfig(deepspeed="zero3", spatial=2)} if mode == "spatial" else {}),
))
