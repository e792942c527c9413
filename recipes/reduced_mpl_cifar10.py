"""Reduced Meta Pseudo Labels on CIFAR-10 (paper Appendix E, Table 11; EfficientNet-B0 student, 32x32).

    # 1. The large teacher T (trained to convergence on the labeled set; the paper does not name it) scores
    #    TinyImages once and the 50,000 most confident images per class are kept with T's distributions:
    python -m mpl_large.reduced precompute --model TEACHER --weights teacher.safetensors --num-classes 10 \
        --data PATH_TO_TINYIMAGES --image-size 32 --top-k 50000 --out runs/tinyimages_selected
    # 2. The student with the reduced teacher (`--method noisy_student`: Table 11's fixed-teacher baseline):
    python recipes/reduced_mpl_cifar10.py --data PATH_TO_CIFAR10_TRAIN --unlabeled PATH_TO_TINYIMAGES \
        --distributions runs/tinyimages_selected --eval PATH_TO_CIFAR10_TEST --out runs/reduced_mpl_cifar10

Labeled data: the 50,000 training images in download order less the first 4,000 (Appendix E reserves 4,000
for tuning). Appendix E gives architectures, data and K only; the rest is ours and marked: EfficientNet-B0
with its own defaults (dropout 0.2, C.4's RMSProp with exponential decay, weight decay 1e-5), Table 8's
CIFAR-10 batch, steps, warm-up and label smoothing, and Table 8's teacher learning rate for the 5-layer,
128-unit reduced teacher. `--steps`/`--finetune-steps` shorten the run (tests use them).
"""

from mpl_large.config import DataConfig, FinetuneConfig, MPLConfig, ModelConfig, ReducedConfig, TrainConfig
from mpl_large.commands import recipe_main
from mpl_large.recipe import nesterov_cosine, rmsprop_exponential

STEPS = 1_000_000
BATCH = 128
UNLABELED = 10 * 50_000  # K = 50,000 per class


def config(steps: int = STEPS, finetune_steps: int = 1000) -> TrainConfig:
    return TrainConfig(
        name="reduced_mpl_cifar10",
        method="reduced_mpl",
        steps=steps,
        batch_size=BATCH,
        mu=1,
        student=ModelConfig("efficientnet_b0", num_classes=10, drop_rate=0.2),
        # EfficientNet's 0.016 per 256 images, decayed x0.97 every 2.4 epochs of the unlabeled set.
        student_optim=rmsprop_exponential(0.016 * BATCH / 256, 1e-5, 2000, steps,
                                          decay_steps=round(2.4 * UNLABELED / BATCH)),
        teacher_optim=nesterov_cosine(0.125, 5e-4, 2000, steps),  # the reduced teacher's
        reduced=ReducedConfig(hidden=128, layers=5),
        mpl=MPLConfig(feedback="cosine", label_smoothing=0.1, uda_factor=0.0),
        data=DataConfig(split="paper", num_dropped=4000, num_labeled=46_000, augment="cifar10", image_size=32),
        finetune=FinetuneConfig(steps=finetune_steps, batch_size=512),
    )


if __name__ == "__main__":
    recipe_main(config, __doc__)
