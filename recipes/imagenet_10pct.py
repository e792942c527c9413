"""ImageNet-10% with Meta Pseudo Labels (paper §3.2, Table 8; ResNet-50, 224x224).

    python recipes/imagenet_10pct.py --data PATH_TO_LABELED_10PCT --unlabeled PATH_TO_IMAGENET_TRAIN \
        --eval PATH_TO_IMAGENET_VAL [--real-labels real.json] --out runs/imagenet_10pct

The labeled set is the leading 102 of the 1,024 training shards (`mpl_large.data.splits.shard_fraction`);
the unlabeled set is the rest of the training images. With `--real-labels`, evaluation adds ImageNet-ReaL
precision@1 (the validation images must be in file-name order). `--steps`/`--finetune-steps` shorten it.
"""

from mpl_large.config import DataConfig, FinetuneConfig, MPLConfig, ModelConfig, TrainConfig
from mpl_large.commands import recipe_main
from mpl_large.recipe import nesterov_cosine

STEPS = 500_000


def config(steps: int = STEPS, finetune_steps: int = 2000) -> TrainConfig:
    return TrainConfig(
        name="imagenet_10pct",
        method="mpl",
        steps=steps,
        batch_size=2048,
        mu=1,
        teacher=ModelConfig("resnet50", num_classes=1000, drop_rate=0.1),
        student=ModelConfig("resnet50", num_classes=1000, drop_rate=0.1),
        teacher_optim=nesterov_cosine(0.5, 2e-4, 1000, steps),
        student_optim=nesterov_cosine(0.8, 2e-4, 1000, steps),
        # Table 6's ImageNet pseudo-label threshold (0.7) stands in for UDA's, which Table 8 does not give.
        mpl=MPLConfig(feedback="cosine", label_smoothing=0.1, uda_factor=16.0, uda_temperature=0.75,
                      uda_threshold=0.7, uda_ramp_steps=min(5000, steps)),
        data=DataConfig(split="none", augment="imagenet", image_size=224, eval_batch_size=256),
        finetune=FinetuneConfig(steps=finetune_steps, batch_size=512),
    )


if __name__ == "__main__":
    recipe_main(config, __doc__)
