"""A trained model for timm and the Hugging Face Hub: safetensors weights, timm's config, a model card.

    mpl-export RUN_DIR --out DIR [--weights best] [--push-to-hub USER/REPO [--private]]
    (or python -m mpl_large.export ...)

RUN_DIR is what `mpl_large.trainer.train` writes: `config.json` (the resolved `TrainConfig`),
`results.json` and `model.safetensors`, the final model: the (finetuned) student of MPL and Reduced MPL,
the single model of the `uda` and `supervised` baselines. DIR gets

- `model.safetensors`: those weights, copied byte for byte;
- `config.json`: timm's hub config (`timm.models.save_config_for_hf`): `architecture`, `num_classes`,
  `label_names` (the run's `data.class_names`, when it has them), `model_args` and a `pretrained_cfg` holding
  the run's evaluation preprocessing: input size, mean/std, crop fraction, bilinear resize (what
  `mpl_large.data.pipeline.Streams.eval_batches` does);
- `README.md`: a `huggingface_hub.ModelCard` with the held-out results as `model-index` eval results, the
  loading snippet (tested as written in a fresh interpreter), and the run's whole configuration.

`--weights best` exports OUT/best.safetensors (the evaluated model with the best held-out top-1, verified
against `results["best"]`), `--weights ema` OUT/ema.safetensors (the weights' moving average, `ema_decay`),
instead of the final model.

Nothing unverified is exported: the weights must match the SHA-256 the run recorded in `results.json` and be
finite, and the written folder is loaded back through timm (`local-dir:`) and must give the run's model's
logits exactly before the export is reported done.

timm loads the folder as it is; our own architectures (`wrn_28_2`, `efficientnet_l2_demo`, ...) need
`import mpl_large.models` first, which registers them with timm (the card's snippet includes it then):

    model = timm.create_model("local-dir:DIR", pretrained=True)
    # or, by architecture name:
    cfg = json.load(open("DIR/config.json"))
    model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"],
                              pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file="DIR/model.safetensors"))

`--push-to-hub` uploads DIR with `huggingface_hub`, authenticated by the token in the environment
(`HF_TOKEN`, or a saved `hf auth login`); the token is never printed. Without a token or a network (or
with `HF_HUB_OFFLINE=1`) the command fails with a message saying so, and DIR stays as written.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from timm.models._hub import save_config_for_hf  # timm exports it only from its hub module

import mpl_large.models  # noqa: F401  (registers our architectures with timm)
from mpl_large.checkpoint import sha256

SINGLE_MODEL_METHODS = ("uda", "supervised")
"""Methods whose saved model is `teacher` (the only model); every other method saves its `student`."""
SOURCE_WEIGHT_KEYS = ("tag", "license", "origin_url", "paper_name", "notes", "hf_hub_id", "url", "file")
"""`pretrained_cfg` entries that describe timm's published weights for the architecture, not ours."""


class ExportError(RuntimeError):
    """The run directory cannot be exported, or the upload failed; the message names the file or repo."""


class PushError(ExportError):
    """The upload to the Hub failed; the exported folder is kept."""


def read_run(run_dir: str | Path, which: str = "final") -> tuple[dict, dict, Path]:
    """(config, results, weights path) of a run directory; a missing or unreadable file is named. `which`:
    the final model (`model.safetensors`), the best evaluated one (`best.safetensors`) or the final EMA
    (`ema.safetensors`)."""
    run_dir = Path(run_dir)
    jsons = []
    for name in ("config.json", "results.json"):
        path = run_dir / name
        if not path.is_file():
            raise ExportError(f"{path}: no such file; RUN_DIR must be the out_dir of a finished training run")
        try:
            jsons.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ExportError(f"{path}: not valid JSON ({e})") from None
    if which == "best":
        weights, expected = run_dir / "best.safetensors", jsons[1].get("best", {}).get("sha256")
        if expected is None or not weights.is_file():
            raise ExportError(f"{weights}: no best model recorded; train with eval_every > 0 and save_best")
    elif which == "ema":
        weights, expected = run_dir / "ema.safetensors", jsons[1].get("ema_sha256")
        if expected is None or not weights.is_file():
            raise ExportError(f"{weights}: no EMA recorded; train with ema_decay > 0")
    else:
        weights, expected = run_dir / "model.safetensors", jsons[1].get("model_sha256")
    if not weights.is_file():
        raise ExportError(f"{weights}: no such file; the run did not finish")
    if expected is None:
        raise ExportError(f"{run_dir / 'results.json'}: no model_sha256 to verify {weights} against")
    if sha256(weights) != expected:
        raise ExportError(f"{weights}: corrupt (its SHA-256 differs from the one results.json records)")
    return jsons[0], jsons[1], weights


def exported_model_config(config: dict) -> dict:
    """The `ModelConfig` (as saved in config.json) of the model the run saved."""
    return config["teacher" if config["method"] in SINGLE_MODEL_METHODS else "student"]


def _check_weights(weights: Path, model: torch.nn.Module, name: str) -> None:
    """The file holds exactly the model's tensors, with its shapes (read from the header, not loaded)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{weights}: not a readable safetensors file ({e})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes != expected:
        missing = sorted(expected.keys() - shapes.keys())[:5]
        extra = sorted(shapes.keys() - expected.keys())[:5]
        wrong = [k for k in expected.keys() & shapes.keys() if expected[k] != shapes[k]][:5]
        raise ExportError(f"{weights} does not fit {name} with {model.num_classes} classes: missing {missing}, "
                          f"unexpected {extra}, other shapes {wrong}")


def _load_finite(weights: Path) -> dict[str, torch.Tensor]:
    state = load_file(weights)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ExportError(f"{weights}: {len(bad)} tensors hold NaN or inf ({', '.join(bad[:5])}); not exporting "
                          f"a model that cannot predict")
    return state


@torch.no_grad()
def _test_load(out: Path, name: str, num_classes: int, state: dict[str, torch.Tensor]) -> None:
    """Load `out` the documented way and compare its logits with the run's model's on fixed inputs."""
    try:
        loaded = timm.create_model(f"local-dir:{out.resolve()}", pretrained=True).eval()
    except (RuntimeError, ValueError, OSError) as e:
        raise ExportError(f"{out}: timm cannot load the export ({type(e).__name__}: {e})") from None
    reference = timm.create_model(name, num_classes=num_classes)
    reference.load_state_dict(state)
    reference.eval()
    size = timm.data.resolve_model_data_config(loaded)["input_size"]
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    if not torch.equal(loaded(x), reference(x)):
        raise ExportError(f"{out}: the model timm loads from the export does not give the run's logits")


def run_preprocessing(config: dict) -> dict:
    """The run's evaluation preprocessing in timm's terms."""
    # The run normalised every view with the student's mean/std and cropped with its crop_pct.
    source = timm.models.get_pretrained_cfg(config["student"]["name"])
    size = config["data"]["image_size"]
    return dict(input_size=(3, size, size), mean=tuple(source.mean), std=tuple(source.std),
                crop_pct=source.crop_pct or 1.0, crop_mode="center", interpolation="bilinear")


def write_timm_config(model: torch.nn.Module, config: dict, path: Path) -> dict:
    """timm's hub config for `model` with the run's evaluation preprocessing; returns it."""
    preprocessing = run_preprocessing(config)
    names = config["data"].get("class_names") or []
    save_config_for_hf(model, str(path), model_config={"label_names": names} if names else None,
                       data_config=preprocessing)
    hub_config = json.loads(path.read_text())
    for key in SOURCE_WEIGHT_KEYS:
        hub_config["pretrained_cfg"].pop(key, None)
    hub_config["pretrained_cfg"].update(preprocessing)  # exactly the run's, whatever timm resolved
    path.write_text(json.dumps(hub_config, indent=2) + "\n")
    return hub_config


def load_snippet(architecture: str, load_name: str) -> str:
    """The Python that loads the export in a fresh interpreter (the model card's, tested as written)."""
    ours = timm.models.model_entrypoint(architecture).__module__.startswith("mpl_large.")
    return "\n".join([
        "import timm",
        *(["import mpl_large.models  # registers this architecture with timm"] if ours else []),
        "",
        f'model = timm.create_model("{load_name}", pretrained=True).eval()',
        "config = timm.data.resolve_model_data_config(model)",
        "transform = timm.data.create_transform(**config, is_training=False)",
        'labels = model.pretrained_cfg.get("label_names")  # class id -> name, when the run had names',
    ])


def model_card(config: dict, results: dict, hub_config: dict, load_name: str, which: str = "final"):
    """The `huggingface_hub.ModelCard`: eval results as metadata, what was trained and how, how to load it,
    the results of each phase, the full config."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    architecture, pre = hub_config["architecture"], hub_config["pretrained_cfg"]
    rows = [f"| {phase} | {key} | {value:.4g} |" if isinstance(value, float) else f"| {phase} | {key} | {value} |"
            for phase, metrics in results.items() if isinstance(metrics, dict) for key, value in metrics.items()]
    final = results.get("finetune") or results.get("main") or {}
    scores = {k[5:]: final[k] for k in ("eval_top1", "eval_top5", "eval_real_top1") if k in final}
    if which == "best":
        scores = {"top1": results["best"]["top1"]}
    elif which == "ema":
        scores = {k[9:]: final[k] for k in ("eval_ema_top1", "eval_ema_top5", "eval_ema_real_top1") if k in final}
    dataset = config["data"]["eval"] or f"{config['data']['labeled']} (held-out {config['data']['holdout_fraction']})"
    eval_results = [EvalResult(task_type="image-classification", dataset_type="imagefolder", dataset_name=dataset,
                               metric_type="accuracy", metric_name=f"{k} accuracy", metric_value=round(v, 6))
                    for k, v in scores.items() if k in ("top1", "top5", "real_top1")]
    data = ModelCardData(library_name="timm", pipeline_tag="image-classification", model_name=config["name"],
                         tags=["image-classification", "timm", "meta-pseudo-labels"],
                         eval_results=eval_results or None)
    headline = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    body = "\n".join([
        f"# {config['name']}",
        "",
        f"`{architecture}` with {hub_config['num_classes']} classes, trained by mpl-large (Meta Pseudo Labels, "
        f"[arXiv:2003.10580](https://arxiv.org/abs/2003.10580)) with method `{config['method']}` "
        f"({config['steps']} steps" + (f", then {config['finetune']['steps']} finetune steps" if
                                       config["finetune"]["steps"] else "") + ")"
        + {"best": f"; the best evaluated model, from step {results.get('best', {}).get('step')}",
           "ema": f"; the moving average of its weights (decay {config.get('ema_decay')})"}.get(which, "") + "."
        + (f" Held-out evaluation: {headline}." if headline else ""),
        "",
        f"Input: RGB, short side resized (bilinear) to {round(pre['input_size'][1] / pre['crop_pct'])}, "
        f"center-cropped to {pre['input_size'][1]}x{pre['input_size'][2]}, normalised with mean "
        f"{list(pre['mean'])} and std {list(pre['std'])}."
        + (f" Classes: {', '.join(hub_config['label_names'])}." if hub_config.get("label_names") else ""),
        "",
        "## Use",
        "",
        "```python",
        load_snippet(architecture, load_name),
        "```",
        "",
        "## Results",
        "",
        "Last logged step of each phase (`eval_*`: held-out evaluation at its end).",
        "",
        "| phase | metric | value |",
        "|---|---|---|",
        *rows,
        "",
        "## Training configuration",
        "",
        "```json",
        json.dumps(config, indent=2),
        "```",
        "",
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def export(run_dir: str | Path, out: str | Path, hub_repo: str | None = None, which: str = "final") -> Path:
    """Write `out` (weights, timm config, model card) from a run directory's final (or best) model; returns
    `out`."""
    config, results, weights = read_run(run_dir, which)
    model_cfg = exported_model_config(config)
    name, num_classes = model_cfg["name"], model_cfg["num_classes"]
    try:
        with torch.device("meta"):  # the architecture's shapes and config, no memory for the weights
            model = timm.create_model(name, num_classes=num_classes)
    except RuntimeError as e:
        raise ExportError(f"{Path(run_dir) / 'config.json'}: cannot build {name!r} ({e})") from None
    _check_weights(weights, model, name)

    state = _load_finite(weights)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, out / "model.safetensors")
    hub_config = write_timm_config(model, config, out / "config.json")
    load_name = f"hf-hub:{hub_repo}" if hub_repo else f"local-dir:{out.resolve()}"
    model_card(config, results, hub_config, load_name, which).save(out / "README.md")
    _test_load(out, name, num_classes, state)
    return out


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload `folder` to the Hub model repo `repo_id` (created if missing); returns the commit URL.

    The token comes from the environment (`HF_TOKEN`, or a saved `hf auth login`) and is never printed:
    it is removed from any error message before that is raised.
    """
    from huggingface_hub import HfApi, get_token  # only an upload needs the Hub client
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.errors import HTTPError  # the HTTP client's base: status and transport errors

    kept = f"the export is kept in {folder}"
    if is_offline_mode():
        raise PushError(f"HF_HUB_OFFLINE is set: not uploading to {repo_id}; {kept}")
    token = get_token()
    if not token:
        raise PushError(f"no Hugging Face token: set HF_TOKEN (or run `hf auth login`) to upload to {repo_id}; "
                        f"{kept}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                   commit_message="Upload mpl-large export")
    except (HTTPError, OSError, ValueError) as e:  # HTTP status, no connection, bad repo id
        message = f"{type(e).__name__}: {e}".replace(token, "***")
        raise PushError(f"upload to {repo_id} failed ({message}); {kept}") from None
    return commit.commit_url


def main(argv: list[str] | None = None) -> Path:
    from mpl_large.cli import export_parser  # one flag vocabulary for every command (`mpl-export`)

    parser = export_parser()
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.out, args.push_to_hub, args.weights)
    except ExportError as e:
        parser.error(str(e))
    print(f"exported {args.run_dir} -> {out}", file=sys.stderr)
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, args.private)
        except PushError as e:
            parser.exit(1, f"{parser.prog}: error: {e}\n")
        print(f"uploaded to {url}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
