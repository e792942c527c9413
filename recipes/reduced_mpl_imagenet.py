"""Reduced Meta Pseudo Labels on ImageNet (paper Appendix E, Table 11; EfficientNet-B7 student, 600x600).

    # 1. The large teacher T (trained to convergence on the labeled set) scores YFCC-100M once and the
    #    12,800 most confident images per class are kept with T's distributions:
    python -m mpl_large.reduced precompute --model TEACHER --weights teacher.safetensors --num-classes 1000 \
        --data PATH_TO_YFCC100M --image-size 600 --top-k 12800 --out runs/yfcc_selected
    # 2. The student with the reduced teacher (`--method noisy_student`: Table 11's fixed-teacher baseline):
    python recipes/reduced_mpl_imagenet.py --data PATH_TO_IMAGENET_TRAIN --unlabeled PATH_TO_YFCC100M \
        --distributions runs/yfcc_selected --eval PATH_TO_IMAGENET_VAL --out runs/reduced_mpl_imagenet

Labeled data: the ImageNet training shards less the 40 Appendix E reserves for tuning
(`mpl_large.data.splits.held_out_shards(files, 40)` names them). Appendix E gives architectures, data and K
only; the rest is ours: EfficientNet-B7 at its own resolution with its defaults (dropout 0.5, C.4's RMSProp
with exponential decay, weight decay 1e-5), Table 8's ImageNet batch, steps, warm-up and label smoothing,
and Table 8's teacher learning rate for the 5-layer, 512-unit reduced teacher. `--steps`/`--finetune-steps`
shorten the run (tests use them).
"""

from mpl_large.config import DataConfig, FinetuneConfig, MPLConfig, ModelConfig, ReducedConfig, TrainConfig
from mpl_large.commands import recipe_main
from mpl_large.recipe import nesterov_cosine, rmsprop_exponential

STEPS = 500_000
BATCH = 2048
UNLABELED = 1000 * 12_800  # K = 12,800 per class


def config(steps: int = STEPS, finetune_steps: int = 2000) -> TrainConfig:
    return TrainConfig(
        name="reduced_mpl_imagenet",
        method="reduced_mpl",
        steps=steps,
        batch_size=BATCH,
        mu=1,
        student=ModelConfig("efficientnet_b7", num_classes=1000, drop_rate=0.5),
        # EfficientNet's 0.016 per 256 images, decayed x0.97 every 2.4 epochs of the unlabeled set.
        student_optim=rmsprop_exponential(0.016 * BATCH / 256, 1e-5, 1000, steps,
                                          decay_steps=round(2.4 * UNLABELED / BATCH)),
        teacher_optim=nesterov_cosine(0.5, 2e-4, 1000, steps),  # the reduced teacher's
        reduced=ReducedConfig(hidden=512, layers=5),
        mpl=MPLConfig(feedback="cosine", label_smoothing=0.1, uda_factor=0.0),
        data=DataConfig(split="none", augment="imagenet", image_size=600, eval_batch_size=64),
        finetune=FinetuneConfig(steps=finetune_steps, batch_size=512),
    )


if __name__ == "__main__":
    recipe_main(config, __doc__)
