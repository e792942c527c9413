"""The shared trainer: one phase of a method (MPL, UDA, supervised), then the student's finetune phase.

A recipe builds a `TrainConfig` and calls `train`. The loop knows nothing of the method: a `Phase`
bundles the step object, the batches it consumes and the model that is evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from mpl_large.build import assemble, make_learner
from mpl_large.ema import ModelEMA
from mpl_large.config import REDUCED_METHODS, ConfigError, TrainConfig, save_config, validate
from mpl_large.metrics import evaluate, load_real_labels
from mpl_large.learner import LearnerInterface
from mpl_large.reduced import reduced_phase
from mpl_large.data.pipeline import Batches, Streams, TrainBatch
from mpl_large.device import choose_device, collective_device, keep_freed_host_memory, to_device
from mpl_large.steps import FinetuneStep, MPLStep, UDAStep
from mpl_large.progress import PhaseProgress, StepTimer
from mpl_large.tracking import RunLog, check_trackers, json_safe, truncate_metrics
from mpl_large.checkpoint import Stateful, load_checkpoint, save_checkpoint, sha256, writing
from mpl_large.guard import NonFiniteError, NonFiniteGuard, check_finite
from mpl_large.run_dir import Resume, open_run_dir, resolved
from mpl_large.parallel import ParallelDims
from mpl_large.zero import init_distributed


@dataclass
class Phase:
    """A step with the batches it consumes and the learner whose model is evaluated and saved."""

    name: str
    step: Callable[[TrainBatch, int], object]
    batches: Batches
    learner: LearnerInterface
    steps: int
    saved: dict[str, LearnerInterface] = field(default_factory=dict)
    """Every learner the phase trains, by name: what a checkpoint saves."""
    state: dict[str, Stateful] = field(default_factory=dict)
    """The step's own state (the h baseline), checkpointed with the data position."""
    ema: ModelEMA | None = None
    """The moving average of `learner`'s weights (`TrainConfig.ema_decay`), checkpointed beside the learners."""

    def checkpointed(self) -> dict:
        """What a checkpoint saves per learner: the trained learners and the EMA."""
        return {**self.saved, **({"ema": self.ema} if self.ema is not None else {})}


def build_main_phase(cfg: TrainConfig, streams: Streams, dims: ParallelDims | None = None) -> Phase:
    """The main phase of `cfg.method`; the step types live in `mpl_large.steps` and `mpl_large.reduced`, the
    learners come from `mpl_large.build`."""
    if cfg.method in REDUCED_METHODS:  # no image teacher is built: its distributions are on disk
        reduced = reduced_phase(cfg, streams, lambda model, optim, batch: make_learner(cfg, model, optim, batch))
        return Phase("train", reduced.step, reduced.batches, reduced.student, cfg.steps, reduced.saved,
                     reduced.state)
    labeled = streams.batch_size
    teacher = assemble(cfg, cfg.teacher, cfg.teacher_optim, labeled, dims=dims)
    if cfg.method == "mpl":
        student = assemble(cfg, cfg.student, cfg.student_optim, streams.unlabeled_batch_size, dims=dims)
        mpl = MPLStep(teacher, student, cfg.mpl, student_wait_steps=cfg.student_optim.wait_steps)
        return Phase("train", lambda b, t: mpl(b.x_l, b.y_l, b.x_u, b.x_u_aug, t), streams.mixed(), student,
                     cfg.steps, {"teacher": teacher, "student": student}, {"baseline": mpl.baseline})
    if cfg.method == "uda":
        uda = UDAStep(teacher, cfg.mpl)
        return Phase("train", lambda b, t: uda(b.x_l, b.y_l, b.x_u, b.x_u_aug, t), streams.mixed(), teacher,
                     cfg.steps, {"teacher": teacher})
    return finetune_phase("train", teacher, cfg, streams.labeled_only(), cfg.steps)


def finetune_phase(name: str, learner, cfg: TrainConfig, batches: Batches, steps: int) -> Phase:
    """One model alone on labeled batches (the supervised baseline and the student's finetuning)."""
    step = FinetuneStep(learner, cfg.mpl.label_smoothing)
    return Phase(name, lambda b, t: step(b.x_l, b.y_l, t), batches, learner, steps, {"model": learner})


def finetune_learner(cfg: TrainConfig, trained: LearnerInterface | None, micro_batch: int,
                     dims: ParallelDims | None = None) -> LearnerInterface:
    """The trained model with the finetune optimizer. A DeepSpeed engine owns its optimizer, so the weights
    move into a fresh engine: rank 0 loads them, `deepspeed.initialize` broadcasts them. `trained=None`
    (resuming the finetune phase): a fresh model, whose weights the checkpoint then restores."""
    if trained is not None and not cfg.parallel.deepspeed:
        return make_learner(cfg, trained.model, cfg.finetune.optim, micro_batch)
    model_cfg = cfg.student if cfg.method in ("mpl", *REDUCED_METHODS) else cfg.teacher
    return assemble(cfg, model_cfg, cfg.finetune.optim, micro_batch, cfg.finetune.deepspeed or cfg.parallel.deepspeed,
                    dims, trained)


def train(cfg: TrainConfig, streams=None) -> dict:
    """Run the main phase, then the finetune phase; evaluate; save results and the final weights."""
    validate(cfg)  # every section again: fields may have been set after construction
    check_trackers(cfg.trackers)
    out = Path(cfg.out_dir)
    # The device first, before any process group or engine: NCCL and DeepSpeed bind the current GPU.
    if choose_device(cfg.device).type == "cpu":
        keep_freed_host_memory()
    dims = None
    if cfg.parallel.deepspeed:
        init_distributed()
        dims = ParallelDims(sp=cfg.parallel.spatial, sync_bn=cfg.parallel.sync_bn).build()
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.parallel.spatial > 1:
        raise ConfigError("parallel.deepspeed: a multi-process launch (and spatial partitioning) needs a DeepSpeed "
                          "config (ddp for plain data parallel, zero3 to partition the models)")
    if cfg.parallel.spatial > 1 and cfg.method in REDUCED_METHODS:
        raise ConfigError("parallel.spatial: Reduced MPL exists to avoid model parallelism; use spatial=1")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    replica, replicas = (dims.dp_rank, dims.dp) if dims is not None else (rank, world)
    main_process = rank == 0
    run = RunState(cfg, out / "checkpoints", resolved(cfg), main_process)
    resume = open_run_dir(cfg, run.config)  # refuses another run's directory or a changed config
    resumed_phase = resume.manifest["phase"] if resume else None
    if main_process:
        with writing(out / "config.json", "the run's config"):
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.json")
        if resume:
            print(f"resuming from {resume.path}" + (f", changing {resume.changes}" if resume.changes else ""))
            truncate_metrics(out, resume.step)
    torch.manual_seed(cfg.seed)
    streams = streams or Streams.from_config(cfg, shard=(replica, replicas))
    real = load_real_labels(cfg.data.real_labels, streams.eval_size()) if cfg.data.real_labels else None
    log = RunLog(out, enabled=main_process, trackers=cfg.trackers, name=cfg.name, config=run.config)
    run.results = {"name": cfg.name, "method": cfg.method}

    main = None
    if resumed_phase != "finetune":
        main = build_main_phase(cfg, streams, dims)
        main.ema = ModelEMA(main.learner.model, cfg.ema_decay) if cfg.ema_decay else None
        if replicas > 1:
            # Models are built (and broadcast) alike on every rank; sampling and dropout must differ between
            # replicas, and agree within one (its spatial ranks hold the same images).
            torch.manual_seed(cfg.seed + 1_000_003 * replica)
        start = run.resume(main, resume) if resume else 0
        run.results["main"] = _run_phase(main, cfg, streams, real, log, run, offset=0, start=start,
                                          replicas=replicas)
    final = main
    if cfg.finetune.steps > 0:
        learner = finetune_learner(cfg, main.learner if main else None, cfg.finetune.batch_size // replicas, dims)
        main = None  # frees the MPL teacher before the finetune phase
        final = finetune_phase("finetune", learner, cfg, streams.labeled_only(cfg.finetune.batch_size),
                               cfg.finetune.steps)
        final.ema = ModelEMA(learner.model, cfg.ema_decay) if cfg.ema_decay else None
        start = run.resume(final, resume) - cfg.steps if resumed_phase == "finetune" else 0
        run.results["finetune"] = _run_phase(final, cfg, streams, real, log, run, offset=cfg.steps, start=start,
                                              replicas=replicas)
    log.close()
    skipped_images = _skipped_images(streams, world // replicas)
    state = final.learner.full_state_dict()
    if final.ema is not None:
        with final.ema.applied():  # collective under ZeRO-3, like the line above
            ema_state = final.learner.full_state_dict()  # may alias the live weights: written before they return
            if main_process:
                run.results["ema_sha256"] = _save_weights(ema_state, out / "ema.safetensors", "the EMA weights")
    if main_process:
        run.results["model_sha256"] = _save_weights(state, out / "model.safetensors", "the final weights")
        run.results["skipped_images"] = skipped_images
        with writing(out / "results.json", "the results"):
            (out / "results.json").write_text(json.dumps(json_safe(run.results), indent=2, allow_nan=False) + "\n")
    return run.results


class RunState:
    """Checkpoints of a run: where they go, what they must match, and the results so far."""

    def __init__(self, cfg: TrainConfig, root: Path, config: dict, main_process: bool = True) -> None:
        self.cfg, self.root, self.config, self.main_process = cfg, root, config, main_process
        self.results: dict = {}

    def keep_if_best(self, learner: LearnerInterface, step: int, scores: dict) -> None:
        """With `save_best` and periodic evaluation: OUT/best.safetensors holds the evaluated model with the
        highest held-out top-1 so far (`results["best"]`: its step, top-1 and SHA-256). Every rank decides
        alike (the scores are summed over ranks): a ZeRO-3 model's full state is gathered collectively."""
        best = self.results.get("best")
        if not (self.cfg.save_best and self.cfg.eval_every) or (best and scores["top1"] <= best["top1"]):
            return
        if not math.isfinite(scores["loss"]):
            return  # non-finite weights (the loss is summed over ranks: every rank skips alike)
        state = learner.full_state_dict()  # rank 0's; None elsewhere
        path = Path(self.cfg.out_dir) / "best.safetensors"
        digest = _save_weights(state, path, "the best model") if self.main_process else None
        self.results["best"] = {"step": step, "top1": scores["top1"], "sha256": digest}

    def save(self, phase: Phase, step: int) -> None:
        check_finite(phase.saved, f"the checkpoint of step {step}")
        save_checkpoint(self.root, step, phase.name, phase.checkpointed(), {"batches": phase.batches, **phase.state},
                        self.config, self.results)

    def resume(self, phase: Phase, resume: Resume) -> int:
        """Restore `phase` from `resume`'s checkpoint, recording what this run changed; returns the global step
        it was taken after."""
        resumed = load_checkpoint(resume.path, resume.manifest, phase.checkpointed(),
                                  {"batches": phase.batches, **phase.state})
        record = {"step": resumed.step, "checkpoint": resume.path.name, "changed": resume.changes}
        self.results = {**resumed.results, **self.results,
                        "resumes": [*resumed.results.get("resumes", []), record]}
        return resumed.step


def _run_phase(phase: Phase, cfg: TrainConfig, streams, real, log: RunLog, run: RunState, offset: int,
               start: int = 0, replicas: int = 1) -> dict:
    """Steps `start`..`phase.steps` of `phase`. The batches' worker processes stop when it returns or raises
    (Ctrl-C included)."""
    last: dict = {}
    guard = NonFiniteGuard(phase.saved, cfg.max_nonfinite_steps)
    timer = StepTimer(phase.batches.images_per_batch * replicas)
    with PhaseProgress(phase.name, phase.steps, start, enabled=log.enabled, bar=cfg.progress) as progress, \
            closing(phase.batches):
        for t in range(start, phase.steps):
            lrs = _learning_rates(phase)  # before the step: the rates this step's updates use
            timer.start()
            batch = next(phase.batches)
            timer.got_batch()
            result = dataclasses.asdict(phase.step(to_device(batch, phase.learner.device), t))
            timer.step_done()
            skipped = guard.check()
            if phase.ema is not None:
                phase.ema.update()
            if skipped:
                if log.enabled:
                    warnings.warn(f"step {offset + t + 1}: non-finite loss or gradient, {', '.join(skipped)} "
                                  f"skipped its update ({guard.consecutive} in a row)", stacklevel=1)
                log.log(offset + t + 1, "nonfinite", {"skipped": ",".join(skipped), **result})
                guard.stop_if_diverged(offset + t + 1, skipped)
            logged = None
            if (t + 1) % cfg.log_every == 0 or t + 1 == phase.steps:
                logged = {**result, **lrs, **timer.window()}
                log.log(offset + t + 1, phase.name, logged)
            if cfg.eval_every and (t + 1) % cfg.eval_every == 0 and t + 1 < phase.steps and streams.has_eval:
                scores = evaluate(phase.learner.model, streams.eval_batches(), real, phase.learner.prepare)
                log.log(offset + t + 1, "eval", scores)
                run.keep_if_best(phase.learner, offset + t + 1, scores)
                if phase.ema is not None:
                    log.log(offset + t + 1, "eval_ema", _evaluate_ema(phase, streams, real))
            if cfg.checkpoint_every and (t + 1) % cfg.checkpoint_every == 0 and t + 1 < phase.steps:
                run.save(phase, offset + t + 1)
            progress.update(t + 1, logged)
            last = {**result, "nonfinite_steps": guard.total}
    if streams.has_eval:
        scores = evaluate(phase.learner.model, streams.eval_batches(), real, phase.learner.prepare)
        run.keep_if_best(phase.learner, offset + phase.steps, scores)
        log.log(offset + phase.steps, "eval", scores)
        last = {**last, **{f"eval_{k}": v for k, v in scores.items()}}
        if phase.ema is not None:
            ema_scores = _evaluate_ema(phase, streams, real)
            log.log(offset + phase.steps, "eval_ema", ema_scores)
            last = {**last, **{f"eval_ema_{k}": v for k, v in ema_scores.items()}}
    return last


def _evaluate_ema(phase: Phase, streams, real) -> dict:
    with phase.ema.applied():
        return evaluate(phase.learner.model, streams.eval_batches(), real, phase.learner.prepare)


def _save_weights(state: dict, path: Path, what: str) -> str:
    """Write finite weights to `path`; returns their SHA-256."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteError(f"not writing {path}: {len(bad)} tensors hold NaN or inf ({', '.join(bad[:5])})")
    with writing(path, what):
        save_file(state, str(path))
    return sha256(path)


def _skipped_images(streams, ranks_per_replica: int) -> int:
    """Undecodable images every rank skipped (training and evaluation), counted once per replica."""
    count = torch.tensor([streams.corrupt_log.count], device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(count)
    return int(count) // ranks_per_replica


def _learning_rates(phase: Phase) -> dict[str, float]:
    """`lr`, or `teacher_lr` and `student_lr` when the phase trains two models."""
    learners = phase.saved or {"model": phase.learner}
    if len(learners) == 1:
        return {"lr": next(iter(learners.values())).lr}
    return {f"{name}_lr": learner.lr for name, learner in learners.items()}
