"""The trainer with spatial partitioning (tests/test_zero.py): MPL + finetune of WRN-28-2 on generated
images with both models in ZeRO-3 engines, in one process or as one rank of a run that splits each image
across 2 ranks. argv: OUT DATA EVAL {single,spatial} DTYPE[,DTYPE]; one run per dtype (float32, float64:
tests/workers/ds_float64.py, which must come last), into OUT/DTYPE."""

import sys

from mpl_large.config import (DataConfig, FinetuneConfig, MPLConfig, ModelConfig, OptimConfig, ParallelConfig,
                               TrainConfig)
from mpl_large.trainer import train

out, data, evaluation, mode, dtypes = sys.argv[1:6]
model = ModelConfig("wrn_28_2", num_classes=3)
optim = OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, schedule="cosine", total_steps=3)
for dtype in dtypes.split(","):
    if dtype == "float64":
        from ds_float64 import use_float64

        use_float64()
    train(TrainConfig(
        name="spatial", out_dir=f"{out}/{dtype}", method="mpl", seed=0, steps=3, batch_size=4, mu=1,
        teacher=model, student=model, teacher_optim=optim, student_optim=optim,
        mpl=MPLConfig(pseudo_labels="argmax", uda_factor=1.0, uda_threshold=0.0, uda_ramp_steps=1),
        data=DataConfig(labeled=data, unlabeled=data, eval=evaluation, augment="cifar10", image_size=32),
        finetune=FinetuneConfig(steps=1, batch_size=4, optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9)),
        log_every=1, progress=False,
        parallel=ParallelConfig(deepspeed="zero3", spatial=2 if mode == "spatial" else 1),
    ))
