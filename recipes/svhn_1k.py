"""SVHN-1K with Meta Pseudo Labels (paper §3.2, Table 8; WRN-28-2, 32x32; Table 5's SVHN RandAugment set).

    python recipes/svhn_1k.py --data PATH_TO_SVHN_TRAIN --eval PATH_TO_SVHN_TEST --out runs/svhn_1k

PATH_TO_SVHN_TRAIN holds the training images in the order of the official `.mat` file (plus `extra` as
further unlabeled data if wanted, via `--unlabeled`); the C.1 split drops the first 5,000 and labels the
next 1,000. `--steps`/`--finetune-steps` shorten the run.
"""

from mpl_large.config import DataConfig, FinetuneConfig, MPLConfig, ModelConfig, TrainConfig
from mpl_large.commands import recipe_main
from mpl_large.recipe import nesterov_cosine

STEPS = 1_000_000


def config(steps: int = STEPS, finetune_steps: int = 1000) -> TrainConfig:
    return TrainConfig(
        name="svhn_1k",
        method="mpl",
        steps=steps,
        batch_size=128,
        mu=1,
        teacher=ModelConfig("wrn_28_2", num_classes=10, drop_rate=0.65),
        student=ModelConfig("wrn_28_2", num_classes=10, drop_rate=0.45),
        teacher_optim=nesterov_cosine(0.05, 5e-4, 2000, steps),
        student_optim=nesterov_cosine(0.15, 5e-4, 2000, steps),
        # Table 6's SVHN pseudo-label threshold stands in for UDA's, which Table 8 does not give.
        mpl=MPLConfig(feedback="cosine", label_smoothing=0.1, uda_factor=2.5, uda_temperature=1.25,
                      uda_threshold=0.975, uda_ramp_steps=min(5000, steps)),
        data=DataConfig(split="paper", num_labeled=1000, num_dropped=5000, augment="svhn", image_size=32),
        finetune=FinetuneConfig(steps=finetune_steps, batch_size=512),
    )


if __name__ == "__main__":
    recipe_main(config, __doc__)
