r"""Reduced Meta Pseudo Labels (Appendix E): the large teacher runs once; a small teacher adapts.

Full MPL keeps a large teacher and a large student in memory and trains both. Reduced MPL splits that:

1. `precompute`: a large teacher T, trained to convergence on the labeled set, scores the unlabeled set
   once and keeps the K most confident images per class, writing its class distribution of every scored
   image. This is the selection command (`mpl_large.select`: sharded, resumable, deterministic order,
   memory bounded by the top-K table and one shard); `python -m mpl_large.reduced precompute` runs it.
2. Training reads those distributions (`StoredDistributions`, memory-mapped) and never loads T. The
   reduced teacher T' (`ReducedTeacher`, a 5-layer ReLU perceptron) maps T's distribution p of an image
   to a calibrated one; the student learns from pseudo labels y_hat ~ T'(p) on the image's strong view,
   and T' learns from the student's feedback h exactly as the full teacher does (eq. 12, C.3):

       student:  theta_S' = theta_S - eta_S * grad CE(y_hat, S(x_u_aug; theta_S))
       teacher:  minimise (h - b) * CE(y_hat, T'(p; theta_T'))

   T' sees no image, so it has no supervised or UDA term: the feedback is its only signal.
3. The baseline of Table 11, NoisyStudent, is the same recipe with a teacher that does not adapt: the
   student learns from y_hat ~ T'(p) with T' frozen at its initialisation, i.e. from T itself.

Initialisation. Appendix E motivates T' by "many actions of the reduced teacher T' would be close to an
identity map" and gives no initialisation. We make the identity exact at the start: T' outputs
log p + MLP(log p) with the MLP's last layer zero, so T'(p) = p before the first update (up to the floor
`min_prob` on probabilities stored as 0), and the fixed-teacher baseline is T. No pre-training is needed.

CLI:

    python -m mpl_large.reduced precompute --model efficientnet_l2 --weights teacher.safetensors \
        --num-classes 1000 --data /data/yfcc --image-size 512 --top-k 12800 --out /data/yfcc-l2
"""

from __future__ import annotations

import argparse
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from mpl_large import select
from mpl_large.build import build_model
from mpl_large.config import ConfigError, MPLConfig, OptimConfig, TrainConfig
from mpl_large.data.pipeline import Batches, Streams, TrainBatch
from mpl_large.feedback import MovingAverageBaseline, make_feedback
from mpl_large.learner import LearnerInterface
from mpl_large.losses import accuracy, cross_entropy, sample_pseudo_labels
from mpl_large.steps import PseudoLabelStep, student_step_and_feedback


# --------------------------------------------------------------------------------------------------
# The stored distributions


_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": np.int16}  # bf16: raw bits, viewed by torch


def _memmap(path: Path, name: str) -> tuple[np.memmap, str]:
    """One tensor of a safetensors file as a read-only memory map, and its safetensors dtype.

    The format (huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
    header giving each tensor's dtype, shape and [begin, end) byte offsets after the header, then the data.
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    entry = header.get(name)
    if entry is None or entry["dtype"] not in _NUMPY_DTYPES:
        raise ValueError(f"{path}: no {name!r} tensor of a float dtype (found {sorted(header)})")
    begin, _ = entry["data_offsets"]
    return np.memmap(path, dtype=_NUMPY_DTYPES[entry["dtype"]], mode="r", offset=8 + n + begin,
                     shape=tuple(entry["shape"])), entry["dtype"]


class StoredDistributions:
    """The large teacher's class distributions of the selected examples: the Reduced MPL training set.

    Example i is the i-th of `mpl_large.select`'s selection (by class, confidence, index); `index[i]` is
    its row in the unlabeled dataset the precompute read, and `self[positions]` its distribution. The
    probability shards are memory-mapped: a lookup reads only the rows asked for, so the distributions of
    12.8 M ImageNet/YFCC examples (25.6 GB in fp16) are never in memory at once.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        info_path = self.directory / "selection.json"
        progress = select.read_progress(self.directory)
        if progress is not None and not progress["complete"]:
            raise ValueError(f"{self.directory}: the precompute did not finish; continue it with --resume")
        if progress is None or not info_path.is_file():
            raise FileNotFoundError(f"{info_path}: no such file; run `python -m mpl_large.reduced precompute "
                                    f"--out {self.directory} ...` first")
        info = json.loads(info_path.read_text())
        selection = load_file(str(self.directory / "selected.safetensors"))
        self.index: torch.Tensor = selection["index"]
        """Dataset row of each example in the unlabeled set the precompute scored."""
        self.label: torch.Tensor = selection["label"]
        """The large teacher's argmax class of each example."""
        self.num_classes: int = info["num_classes"]
        self.source: str | None = info.get("source")
        """`path [split]` of the scored unlabeled data, as the precompute recorded it."""
        self._shard, self._row = selection["shard"], selection["row"]
        self._files = [self.directory / name for name in info["prob_shards"]]
        self._maps: dict[int, tuple[np.memmap, str]] = {}

    def __len__(self) -> int:
        return self.index.numel()

    def __getitem__(self, positions: torch.Tensor) -> torch.Tensor:
        """float32 distributions (len(positions) x num_classes) of the examples at `positions`."""
        positions = torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
        if positions.numel() and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"{self.directory}: positions must be in [0, {len(self)}), got "
                             f"[{int(positions.min())}, {int(positions.max())}]")
        shard, row = self._shard[positions], self._row[positions]
        out = torch.empty(positions.numel(), self.num_classes, dtype=torch.float32)
        for s in shard.unique().tolist():
            at = (shard == s).nonzero().squeeze(1)
            probs, dtype = self._probs(s)
            rows = torch.from_numpy(np.ascontiguousarray(probs[row[at].numpy()]))
            out[at] = (rows.view(torch.bfloat16) if dtype == "BF16" else rows).float()
        return out

    def _probs(self, shard: int) -> tuple[np.memmap, str]:
        if shard not in self._maps:
            self._maps[shard] = _memmap(self._files[shard], "probs")
        return self._maps[shard]

    def images(self, unlabeled: datasets.Dataset | datasets.IterableDataset) -> datasets.Dataset:
        """The selected images of `unlabeled` (the dataset the precompute scored), in selection order: row i
        of the result is example i here, so a stream's batch indices look up their distributions."""
        if not isinstance(unlabeled, datasets.Dataset):
            raise ConfigError("data.streaming_unlabeled: Reduced MPL picks the selected rows of the unlabeled "
                              "set, which needs a map-style dataset; set it to false")
        if len(self) and int(self.index.max()) >= len(unlabeled):
            raise ValueError(f"{self.directory}: the selection names row {int(self.index.max())}, but the unlabeled "
                             f"set has {len(unlabeled)} rows: it is not the data the precompute scored "
                             f"({self.source})")
        return unlabeled.select(self.index.tolist())


# --------------------------------------------------------------------------------------------------
# The reduced teacher and its step


class ReducedTeacher(nn.Module):
    """T': the large teacher's distribution p -> logits of a calibrated distribution.

    A perceptron of `layers` linear layers with ReLU between them reads log p and adds its output to
    log p: log-probabilities make temperature and per-class bias changes, the usual calibrations, affine in
    the input. The last layer starts at zero, so T'(p) = p until the feedback moves it.
    """

    def __init__(self, num_classes: int, hidden: int = 128, layers: int = 5, min_prob: float = 1e-8) -> None:
        super().__init__()
        widths = [num_classes] + [hidden] * (layers - 1) + [num_classes]
        mlp: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            mlp += [nn.ReLU()] if i else []
            mlp.append(nn.Linear(n_in, n_out))
        self.mlp = nn.Sequential(*mlp)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.min_prob = min_prob
        """Floor on p before the log: fp16 storage flushes probabilities below ~6e-8 to 0."""

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        log_p = probs.to(self.mlp[0].weight.dtype).clamp_min(self.min_prob).log()
        return log_p + self.mlp(log_p)


@dataclass
class ReducedMPLStepResult:
    teacher_loss: float
    """(h - b) * CE(y_hat, T'(p)), the reduced teacher's whole loss; zero when h was not finite."""
    student_loss: float
    """CE(y_hat, S(x_u_aug; theta_S)), the loss of the student's update."""
    h: float
    """The feedback coefficient before the baseline is subtracted."""
    baseline: float
    """The baseline b subtracted from h at this step."""
    h_skipped: bool
    """h was not finite: the teacher was not moved and b was not updated."""
    teacher_shift: float
    """KL(p || T'(p)), batch mean: how far the reduced teacher has moved from the large one (0 at init)."""
    student_accuracy: float
    """Student top-1 on the labeled batch, after its update."""


class ReducedMPLStep:
    """Reduced MPL: the student learns from y_hat ~ T'(p); T' learns only from the student's feedback h.

    The same student update, feedback h and moving-average baseline as `MPLStep`; the teacher reads the
    stored distributions p instead of images. Learners are used only through `LearnerInterface`, so
    a distributed student (and teacher) run this step unchanged.
    """

    def __init__(self, teacher: LearnerInterface, student: LearnerInterface, config: MPLConfig) -> None:
        if config.uda_factor > 0:
            raise ConfigError("mpl.uda_factor: the reduced teacher sees no images, so it has no UDA loss; set 0")
        self.teacher = teacher
        self.student = student
        self.config = config
        self.feedback = make_feedback(config.feedback)
        self.baseline = MovingAverageBaseline(config.baseline_decay)

    def __call__(
        self, x_l: torch.Tensor, y_l: torch.Tensor, p_u: torch.Tensor, x_u_aug: torch.Tensor, step: int
    ) -> ReducedMPLStepResult:
        cfg = self.config
        t_logits = self.teacher(p_u)

        # y_hat ~ T'(p), then the student's step on it: theta_S' = theta_S - eta_S * grad CE(y_hat, S(x_u_aug)).
        y_hat = sample_pseudo_labels(t_logits, cfg.pseudo_labels)
        s = student_step_and_feedback(self.student, self.feedback, self.baseline, cfg, x_l, y_l, x_u_aug, y_hat)

        # The teacher's only loss: (h - b) * CE(y_hat, T'(p)).
        t_loss = s.advantage * cross_entropy(t_logits, y_hat)
        self.teacher.update(t_loss)

        with torch.no_grad():
            p = p_u.to(t_logits.dtype)
            shift = (torch.xlogy(p, p) - p * t_logits.log_softmax(-1)).sum(-1).mean()
        h = s.h
        stats = torch.stack([
            t_loss.detach(), s.student_loss.detach(), h, torch.as_tensor(s.baseline, dtype=h.dtype, device=h.device),
            ~s.finite, shift.to(h.dtype), accuracy(s.student_logits_l, y_l),
        ]).tolist()  # the step's one host sync
        return ReducedMPLStepResult(
            teacher_loss=stats[0], student_loss=stats[1], h=stats[2], baseline=stats[3], h_skipped=bool(stats[4]),
            teacher_shift=stats[5], student_accuracy=stats[6],
        )


def noisy_student_step(
    teacher: ReducedTeacher, student: LearnerInterface, config: MPLConfig
) -> PseudoLabelStep:
    """Table 11's NoisyStudent: Reduced MPL's student, pseudo labels and losses with a teacher that never
    adapts (frozen in place). Call it as `step(p_u, x_u_aug, step)`."""
    return PseudoLabelStep(teacher, student, config.pseudo_labels, config.label_smoothing)


# --------------------------------------------------------------------------------------------------
# The trainer's main phase for `reduced_mpl` and `noisy_student`


class ReducedPhase(NamedTuple):
    step: Callable[[TrainBatch, int], object]
    batches: Batches
    student: LearnerInterface
    """The learner whose model is evaluated, finetuned and saved."""
    saved: dict[str, LearnerInterface]
    """The learners a checkpoint saves."""
    state: dict
    """The step's own checkpointed state (the h baseline)."""


def reduced_phase(
    cfg: TrainConfig, streams: Streams,
    make_learner: Callable[[nn.Module, OptimConfig, int], LearnerInterface],
) -> ReducedPhase:
    """The main phase of `reduced_mpl` / `noisy_student`.

    The unlabeled stream becomes the selected images, in selection order, so each batch's dataset
    indices are positions in `StoredDistributions`. `make_learner(model, optim, micro_batch)` is the
    trainer's learner factory (single process or a DeepSpeed engine).
    """
    d = cfg.data
    if not cfg.reduced.distributions:
        raise ConfigError("reduced.distributions: Reduced MPL needs the large teacher's stored distributions "
                          "(--distributions DIR, from `python -m mpl_large.reduced precompute --out DIR`)")
    if not d.unlabeled:
        raise ConfigError("data.unlabeled: Reduced MPL reads the images the distributions were computed over; "
                          "set it to the precompute's --data")
    stored = StoredDistributions(cfg.reduced.distributions)
    expected = f"{Path(d.unlabeled).resolve()} [train]"
    if stored.source is not None and stored.source != expected:
        raise ConfigError(f"data.unlabeled: {expected} is not the data in {stored.directory} ({stored.source})")
    if stored.num_classes != cfg.student.num_classes:
        raise ConfigError(f"student.num_classes: {cfg.student.num_classes}, but the distributions in "
                          f"{stored.directory} have {stored.num_classes} classes")
    streams.unlabeled = stored.images(streams.unlabeled)

    def lookup(b: TrainBatch) -> torch.Tensor:
        return stored[b.u_index].to(b.x_u_aug.device)

    batch = streams.unlabeled_batch_size
    student = make_learner(build_model(cfg.student), cfg.student_optim, batch)
    teacher = ReducedTeacher(stored.num_classes, cfg.reduced.hidden, cfg.reduced.layers)
    if cfg.method == "reduced_mpl":
        small = make_learner(teacher, cfg.teacher_optim, batch)
        step = ReducedMPLStep(small, student, cfg.mpl)
        return ReducedPhase(lambda b, t: step(b.x_l, b.y_l, lookup(b), b.x_u_aug, t), streams.mixed(), student,
                            {"teacher": small, "student": student}, {"baseline": step.baseline})
    fixed = noisy_student_step(teacher, student, cfg.mpl)  # the frozen teacher is T itself: nothing to save
    return ReducedPhase(lambda b, t: fixed(lookup(b), b.x_u_aug, t), streams.mixed(), student,
                        {"student": student}, {})


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="python -m mpl_large.reduced",
        description="Reduced Meta Pseudo Labels (Appendix E). `precompute` scores the unlabeled set with the "
                    "large teacher once and stores its distributions; it takes the flags of "
                    "`python -m mpl_large.select` (see `precompute --help`).")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("precompute", add_help=False, help="run the large teacher once over the unlabeled set")
    _, select_args = parser.parse_known_args(argv)
    return select.main(select_args)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    main()
