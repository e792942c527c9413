"""The on-disk format of a selection and its teacher's probabilities: the writer (`mpl_large.select`'s
command) and the readers (`load_selection`, and `StoredDistributions` for Reduced MPL) in one place.

Layout of `out_dir`:

- `probs-00000.safetensors`, ...: every scored example, in stream order, `shard_size` per file (the last
  one shorter): `index` (int64, the dataset index) and `probs` (N x C, `probs_dtype`).
- `selected.safetensors`: the selection, sorted by class, then confidence (descending), then index:
  `index`, `label` (int64), `confidence` (float32, from the fp32 softmax) and where each one's
  probabilities are, `shard` and `row` (int64).
- `selection.json`: k, num_classes, kept and candidate counts per class, the classes with fewer than k
  candidates, the shard files, source and teacher.
- `state.safetensors` + `progress.json`: the resumable checkpoint, rewritten at every shard boundary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mpl_large.config import ConfigError

log = logging.getLogger(__name__)

PROBS_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FORMAT_VERSION = 1


@dataclasses.dataclass
class Selection:
    """What `score_and_select` returns; the same content as `selected.safetensors` + `selection.json`."""

    index: torch.Tensor
    label: torch.Tensor
    confidence: torch.Tensor
    shard: torch.Tensor
    """Which `probs-NNNNN.safetensors` holds each selected example's probabilities..."""
    row: torch.Tensor
    """...and at which row."""
    kept_per_class: list[int]
    candidates_per_class: list[int]
    examples_scored: int
    short_classes: dict[int, int]
    """Classes with fewer than k candidates -> how many they kept (all of their candidates)."""


# --------------------------------------------------------------------------------------------------
# Files. Every write goes to a temporary name in the same directory, then os.replace: a run killed at any
# moment leaves each file either old or new, never half written.


def replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None):
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    replace_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_json(obj, path: Path) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def shard_name(shard: int) -> str:
    return f"probs-{shard:05d}.safetensors"


def read_progress(out_dir: str | os.PathLike) -> dict | None:
    """The last checkpoint's progress (examples `consumed`, `shards` written, `complete`...), or None.

    Read from `state.safetensors`' metadata, not `progress.json`: the state and its position must come from
    one file, which is replaced atomically; `progress.json` is the readable copy written right after it.
    """
    path = Path(out_dir) / "state.safetensors"
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["progress"])


def read_shard_index(out_dir: Path, shard: int) -> torch.Tensor:
    """The dataset rows a probability shard holds, in the order scored (increasing)."""
    with safe_open(str(out_dir / shard_name(shard)), framework="pt") as f:
        return f.get_tensor("index")


def load_selection(out_dir: str | os.PathLike, with_probs: bool = False) -> dict[str, torch.Tensor]:
    """`selected.safetensors` as a dict; `with_probs` also gathers the selected rows' probabilities from the
    shards (num_selected x num_classes: 12.8M x 1000 in fp16 is 25.6 GB for ImageNet: read shard by
    shard with `shard`/`row` instead when that is too much)."""
    out_dir = Path(out_dir)
    selection = load_file(str(out_dir / "selected.safetensors"))
    if with_probs:
        info = json.loads((out_dir / "selection.json").read_text())
        dtype = PROBS_DTYPES[info["probs_dtype"]]
        probs = torch.empty(selection["index"].numel(), info["num_classes"], dtype=dtype)
        for s, name in enumerate(info["prob_shards"]):
            at = (selection["shard"] == s).nonzero().squeeze(1)
            if at.numel():
                with safe_open(str(out_dir / name), framework="pt") as f:
                    probs[at] = f.get_tensor("probs")[selection["row"][at]]
        selection["probs"] = probs
    return selection


def locate(out_dir: Path, index: torch.Tensor, num_shards: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(shard, row) of each selected dataset index, found by reading only the shards' `index` tensors."""
    sorted_index, order = torch.sort(index)
    shard = torch.full_like(index, -1)
    row = torch.full_like(index, -1)
    if index.numel() == 0:
        return shard, row
    for s in range(num_shards):
        shard_index = read_shard_index(out_dir, s)
        pos = torch.searchsorted(sorted_index, shard_index).clamp(max=index.numel() - 1)
        hit = sorted_index[pos] == shard_index
        shard[order[pos[hit]]] = s
        row[order[pos[hit]]] = hit.nonzero().squeeze(1)
    if (shard < 0).any():
        raise RuntimeError(f"{out_dir}: {int((shard < 0).sum())} selected examples are in no probability "
                           f"shard; the shards do not belong to this run's state")
    return shard, row


def write_shard(out_dir: Path, shard: int, index: list[torch.Tensor], probs: list[torch.Tensor]) -> None:
    save_safetensors({"index": torch.cat(index), "probs": torch.cat(probs)}, out_dir / shard_name(shard))


def clean(out_dir: Path) -> None:
    """Delete this command's files (only those) from a previous run in `out_dir`."""
    names = ["state.safetensors", "progress.json", "selected.safetensors", "selection.json"]
    for path in [out_dir / n for n in names] + sorted(out_dir.glob("probs-*.safetensors")):
        path.unlink(missing_ok=True)


def finalize(out_dir: Path, topk, settings: dict, consumed: int, shards: int) -> Selection:
    index, label, confidence = topk.selected()
    shard, row = locate(out_dir, index, shards)
    kept = topk.kept_per_class().tolist()
    candidates = topk.candidates.tolist()
    short = {c: kept[c] for c in range(topk.num_classes) if kept[c] < topk.k}
    save_safetensors({"index": index, "label": label, "confidence": confidence, "shard": shard, "row": row},
                      out_dir / "selected.safetensors")
    info = {
        **settings,
        "examples_scored": consumed,
        "num_selected": int(index.numel()),
        "kept_per_class": kept,
        "candidates_per_class": candidates,
        "classes_short_of_k": {str(c): n for c, n in short.items()},
        "prob_shards": [shard_name(s) for s in range(shards)],
        "order": "class asc, confidence desc, index asc",
        "note": "classes_short_of_k kept all their candidates; a class-balanced student dataset pads them by "
                "duplication (Noisy Student up-sampling).",
    }
    save_json(info, out_dir / "selection.json")
    if short:
        log.warning("%d of %d classes have fewer than k=%d candidates (kept all): %s", len(short),
                    topk.num_classes, topk.k, dict(list(short.items())[:20]))
    return Selection(index=index, label=label, confidence=confidence, shard=shard, row=row, kept_per_class=kept,
                     candidates_per_class=candidates, examples_scored=consumed, short_classes=short)


# --------------------------------------------------------------------------------------------------
# The stored distributions: what Reduced MPL trains on


def probability_rows(path: Path, name: str = "probs"):
    """Tensor `name` of a safetensors file, memory-mapped by safetensors: indexing it with a list of row
    numbers (`rows[[4, 0, 6]]`) reads only those rows."""
    handle = safe_open(str(path), framework="pt")
    if name not in handle.keys() or handle.get_slice(name).get_dtype() not in ("F16", "BF16", "F32"):
        raise ValueError(f"{path}: no {name!r} tensor of a float dtype (found {sorted(handle.keys())})")
    return handle.get_slice(name)


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
        progress = read_progress(self.directory)
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
        self._maps: dict = {}

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
            out[at] = self._probs(s)[row[at].tolist()].float()
        return out

    def _probs(self, shard: int):
        if shard not in self._maps:
            self._maps[shard] = probability_rows(self._files[shard], "probs")
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
