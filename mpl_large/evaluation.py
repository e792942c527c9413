"""`mpl-eval`: score a trained model on a labeled set, from a run directory or from an `mpl-export` folder.

    mpl-eval runs/photos --data photos_test/            # the run's final model (--weights best: best.safetensors)
    mpl-eval runs/photos/export --data photos_test/     # an export, loaded the way its model card says

Both are scored as training evaluated (`mpl_large.metrics.evaluate`): short side resized (bilinear) to
size / crop_pct, center crop, the run's mean/std; top-1, top-5 (>= 5 classes) and, with `--real-labels`,
ImageNet-ReaL precision@1. A run directory's weights are verified against results.json first.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torchvision.transforms.v2 import functional as TF

import mpl_large.models  # noqa: F401  (registers our architectures with timm)
from mpl_large.data.loader import eval_batches
from mpl_large.data.pipeline import Normalize
from mpl_large.data.sources import check_labels, load_images
from mpl_large.export import ExportError, exported_model_config, read_run, run_preprocessing
from mpl_large.metrics import evaluate, load_real_labels


class EvalError(ValueError):
    """The model folder cannot be evaluated; the message names the file."""


def load_model(path: str | Path, weights: str = "final") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, timm preprocessing) from a run directory or an export folder."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise EvalError(f"{config_path}: no such file; give a run directory or an mpl-export folder")
    config = json.loads(config_path.read_text())
    if "architecture" in config:  # an export: timm's hub config
        model = timm.create_model(f"local-dir:{path.resolve()}", pretrained=True)
        return model.eval(), timm.data.resolve_model_data_config(model)
    try:
        config, _, weights_path = read_run(path, weights)
    except ExportError as e:
        raise EvalError(str(e)) from None
    model_cfg = exported_model_config(config)
    model = timm.create_model(model_cfg["name"], num_classes=model_cfg["num_classes"])
    model.load_state_dict(load_file(weights_path))
    return model.eval(), run_preprocessing(config)


def evaluate_path(model_path: str | Path, data: str, *, split: str = "train", weights: str = "final",
                  real_labels: str | None = None, batch_size: int = 256) -> dict:
    """Top-1/top-5/(ReaL) of the model at `model_path` on the labeled set `data`."""
    model, pre = load_model(model_path, weights)
    dataset = load_images(data, split=split)
    check_labels(dataset, model.num_classes, data, "the model's num_classes")
    size = pre["input_size"][-1]
    resize = round(size / pre["crop_pct"])
    normalize = Normalize(pre["mean"], pre["std"])

    def transform(img, generator):
        return normalize(TF.center_crop(TF.resize(img, resize), size))

    batches = ((b.inputs, b.labels, b.indices) for b in eval_batches(dataset, batch_size, transform))
    real = load_real_labels(real_labels, len(dataset)) if real_labels else None
    scores = evaluate(model, batches, real)
    return {"images": len(dataset), **scores}
