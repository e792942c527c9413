"""CIFAR-10-4K with Meta Pseudo Labels (paper §3.2, Table 8; WRN-28-2, 32x32).

    python recipes/cifar10_4k.py --data PATH_TO_CIFAR10_TRAIN --eval PATH_TO_CIFAR10_TEST --out runs/cifar10_4k

PATH_TO_CIFAR10_TRAIN holds the 50,000 training images in the order of the five official batch files
(an image folder or parquet/Arrow files); the C.1 split drops the first 5,000, labels the next 4,000 and
leaves the other 41,000 unlabeled. `--steps`/`--finetune-steps` shorten the run (tests use them).
"""

from mpl_large.config import DataConfig, FinetuneConfig, MPLConfig, ModelConfig, TrainConfig
from mpl_large.commands import recipe_main
from mpl_large.recipe import nesterov_cosine

STEPS = 1_000_000


def config(steps: int = STEPS, finetune_steps: int = 1000) -> TrainConfig:
    return TrainConfig(
        name="cifar10_4k",
        method="mpl",
        steps=steps,
        batch_size=128,
        mu=1,  # Table 8: teacher and student batches are both 128
        teacher=ModelConfig("wrn_28_2", num_classes=10, drop_rate=0.5),
        student=ModelConfig("wrn_28_2", num_classes=10, drop_rate=0.35),
        teacher_optim=nesterov_cosine(0.125, 5e-4, 2000, steps),
        student_optim=nesterov_cosine(0.3, 5e-4, 2000, steps),
        # UDA's confidence threshold is not in Table 8; 0.95 is Table 6's pseudo-label threshold for CIFAR-10.
        mpl=MPLConfig(feedback="cosine", label_smoothing=0.1, uda_factor=1.0, uda_temperature=0.8,
                      uda_threshold=0.95, uda_ramp_steps=min(5000, steps)),
        data=DataConfig(split="paper", num_labeled=4000, num_dropped=5000, augment="cifar10", image_size=32),
        finetune=FinetuneConfig(steps=finetune_steps, batch_size=512),
    )


if __name__ == "__main__":
    recipe_main(config, __doc__)
