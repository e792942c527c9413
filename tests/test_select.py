"""Unlabeled-data selection (§3.3, Appendix E): the top k per class is exactly right, resumably.

- `TopKPerClass` and `score_and_select` keep, per argmax class, exactly the k examples a brute-force sort by
  (confidence desc, index asc) keeps — with many exact ties, indices that are not in arrival order, and
  any merge buffer size; classes with fewer than k candidates keep all of them and are reported.
- The state's size does not depend on how many examples were seen; the pending buffer stays bounded.
- Probability shards hold every scored example exactly once, with the softmax's values.
- A run killed mid-stream and resumed (from the start of the iterable, or from the checkpoint's batch)
  writes byte-identical output to an uninterrupted run; a checkpoint from other settings is refused.
- The CLI runs a tiny timm model over a generated image folder (one file unreadable: skipped), and a killed
  CLI run resumed gives the same files; bad paths and weights give clear errors.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mpl_large.select import TopKPerClass, main, score_and_select
from mpl_large.selection_store import load_selection, read_progress

NUM_CLASSES = 7


class FakeTeacher(nn.Module):
    """Returns precomputed logits for each dataset index (the 'images' are the indices, as floats)."""

    def __init__(self, logits: dict[int, torch.Tensor]):
        super().__init__()
        self.logits = logits
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x):
        return torch.stack([self.logits[int(i)] for i in x])


def make_data(n=300, seed=0):
    """Dataset indices in shuffled order (so index order != arrival order), logits drawn from a few
    distinct rows so that many confidences tie exactly."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(-3, 4, (15, NUM_CLASSES), generator=g).float()
    patterns[0] = 10.0  # uniform probabilities: argmax is class 0, confidence 1/C
    indices = 1000 + torch.randperm(n, generator=g)
    pick = torch.randint(0, len(patterns), (n,), generator=g)
    logits = {int(i): patterns[p] for i, p in zip(indices, pick)}
    return indices, logits


def batches_of(indices, sizes, fail_after=None):
    """Deterministic batches of varying size; raises after `fail_after` batches (a killed run)."""
    pos, b = 0, 0
    while pos < len(indices):
        if fail_after is not None and b == fail_after:
            raise KeyboardInterrupt("killed")
        size = sizes[b % len(sizes)]
        chunk = indices[pos:pos + size]
        yield chunk, chunk.float()
        pos += size
        b += 1


def brute_force(indices, logits, k, classes=NUM_CLASSES):
    probs = torch.stack([logits[int(i)] for i in indices]).softmax(-1)
    conf, label = probs.max(-1)
    per_class = {c: [] for c in range(classes)}
    for i, c, p in zip(indices.tolist(), label.tolist(), conf.tolist()):
        per_class[c].append((-p, i))
    kept = {c: [i for _, i in sorted(v)[:k]] for c, v in per_class.items()}
    return kept, {c: len(v) for c, v in per_class.items()}


def selected_per_class(index, label):
    out = {c: [] for c in range(NUM_CLASSES)}
    for i, c in zip(index.tolist(), label.tolist()):
        out[c].append(i)
    return out


@pytest.mark.parametrize("buffer_size", [1, 7, None])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_topk_matches_brute_force(k, buffer_size):
    indices, logits = make_data()
    topk = TopKPerClass(NUM_CLASSES, k, buffer_size=buffer_size)
    for idx, x in batches_of(indices, [13, 1, 50, 29]):
        probs = torch.stack([logits[int(i)] for i in idx]).softmax(-1)
        conf, label = probs.max(-1)
        topk.update(idx, label, conf)
    expected, candidates = brute_force(indices, logits, k)
    index, label, conf = topk.selected()
    assert selected_per_class(index, label) == expected  # same members, same order (incl. ties)
    assert topk.candidates.tolist() == [candidates[c] for c in range(NUM_CLASSES)]
    # Sorted by class, then confidence descending.
    assert torch.all(label[1:] >= label[:-1])
    same = label[1:] == label[:-1]
    assert torch.all(conf[1:][same] <= conf[:-1][same])
    assert len(set(conf.tolist())) < len(conf), "the data should contain ties"


def test_state_size_is_independent_of_dataset_size():
    sizes = []
    for n in (50, 2000):
        indices, logits = make_data(n)
        topk = TopKPerClass(NUM_CLASSES, 10, buffer_size=64)
        for idx, _ in batches_of(indices, [37]):
            conf, label = torch.stack([logits[int(i)] for i in idx]).softmax(-1).max(-1)
            topk.update(idx, label, conf)
            assert topk.pending_size < 64 + 37
        sizes.append({k: (v.shape, v.dtype) for k, v in topk.state_dict().items()})
    assert sizes[0] == sizes[1]


def test_state_dict_round_trip_continues_exactly():
    indices, logits = make_data()
    items = list(batches_of(indices, [23]))

    def feed(topk, part):
        for idx, _ in part:
            conf, label = torch.stack([logits[int(i)] for i in idx]).softmax(-1).max(-1)
            topk.update(idx, label, conf)

    whole = TopKPerClass(NUM_CLASSES, 6, buffer_size=10)
    feed(whole, items)
    first = TopKPerClass(NUM_CLASSES, 6, buffer_size=10)
    feed(first, items[:5])
    second = TopKPerClass(NUM_CLASSES, 6, buffer_size=10)
    second.load_state_dict(first.state_dict())
    feed(second, items[5:])
    for a, b in zip(whole.selected(), second.selected()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="expected"):
        TopKPerClass(NUM_CLASSES, 5).load_state_dict(first.state_dict())


def test_topk_rejects_bad_input():
    topk = TopKPerClass(3, 2)
    with pytest.raises(ValueError, match="labels"):
        topk.update(torch.tensor([0]), torch.tensor([3]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="non-finite"):
        topk.update(torch.tensor([0]), torch.tensor([1]), torch.tensor([float("nan")]))


def read_outputs(out_dir: Path) -> dict[str, bytes]:
    names = ["selected.safetensors", "selection.json", "progress.json"] + \
            [p.name for p in sorted(out_dir.glob("probs-*.safetensors"))]
    return {n: (out_dir / n).read_bytes() for n in names}


@pytest.mark.parametrize("probs_dtype", ["float32", "float16"])
def test_score_and_select(tmp_path, probs_dtype):
    indices, logits = make_data()
    k = 25  # class 0 (uniform logits) and others are short of 25 candidates
    sel = score_and_select(FakeTeacher(logits), batches_of(indices, [32, 17]), NUM_CLASSES, k, tmp_path,
                           shard_size=40, probs_dtype=probs_dtype, source="generated", teacher="fake")
    expected, candidates = brute_force(indices, logits, k)
    assert selected_per_class(sel.index, sel.label) == expected
    short = {c: n for c, n in candidates.items() if n < k}
    assert short, "the data should have classes with fewer than k candidates"
    assert sel.short_classes == short
    info = json.loads((tmp_path / "selection.json").read_text())
    assert info["classes_short_of_k"] == {str(c): n for c, n in short.items()}
    assert info["kept_per_class"] == [len(expected[c]) for c in range(NUM_CLASSES)]
    assert info["candidates_per_class"] == [candidates[c] for c in range(NUM_CLASSES)]
    assert info["examples_scored"] == len(indices) and info["k"] == k and info["source"] == "generated"
    assert info["prob_shards"] == [f"probs-{s:05d}.safetensors" for s in range(8)]  # ceil(300 / 40)

    # Every example exactly once, in stream order, with the softmax's values.
    shards = [load_file(str(tmp_path / n)) for n in info["prob_shards"]]
    assert [len(s["index"]) for s in shards] == [40] * 7 + [20]
    assert torch.equal(torch.cat([s["index"] for s in shards]), indices)
    probs = torch.cat([s["probs"] for s in shards])
    assert probs.dtype == getattr(torch, probs_dtype)
    reference = torch.stack([logits[int(i)] for i in indices]).softmax(-1)
    assert torch.equal(probs, reference.to(probs.dtype))

    # The saved selection: the same, and its shard/row point at each example's probabilities.
    saved = load_selection(tmp_path, with_probs=True)
    for name in ("index", "label", "confidence", "shard", "row"):
        assert torch.equal(saved[name], getattr(sel, name))
    assert torch.equal(saved["probs"], torch.stack([logits[int(i)] for i in saved["index"]]).softmax(-1)
                       .to(probs.dtype))
    assert torch.equal(saved["confidence"], torch.stack([logits[int(i)] for i in saved["index"]]).softmax(-1)
                       .max(-1).values)


@pytest.mark.parametrize("fail_after", [0, 2, 5, 9])
@pytest.mark.parametrize("from_checkpoint_batch", [False, True])
def test_resume_is_identical(tmp_path, fail_after, from_checkpoint_batch):
    indices, logits = make_data()
    sizes = [32, 17]  # batches straddle the shard boundaries (shard_size=40)
    kwargs = dict(num_classes=NUM_CLASSES, k=12, shard_size=40, buffer_size=8)
    score_and_select(FakeTeacher(logits), batches_of(indices, sizes), out_dir=tmp_path / "whole", **kwargs)

    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        score_and_select(FakeTeacher(logits), batches_of(indices, sizes, fail_after), out_dir=killed, **kwargs)
    progress = read_progress(killed)
    consumed = progress["consumed"] if progress else 0
    assert consumed % 40 == 0 and not (progress or {}).get("complete")

    # The batch holding the first unscored example, and where it starts.
    all_batches = list(batches_of(indices, sizes))
    starts = torch.tensor([0] + [len(i) for i, _ in all_batches]).cumsum(0)[:-1].tolist()
    first = max(s for s in starts if s <= consumed)

    teacher = FakeTeacher(logits)
    seen = []
    forward = teacher.forward
    teacher.forward = lambda x: (seen.append(len(x)), forward(x))[1]
    if from_checkpoint_batch:  # what the CLI does: an iterable that starts at that batch
        batches = [b for s, b in zip(starts, all_batches) if s >= first]
        score_and_select(teacher, batches, out_dir=killed, first_example=first, **kwargs)
    else:
        score_and_select(teacher, batches_of(indices, sizes), out_dir=killed, **kwargs)
    assert sum(seen) == len(indices) - first, "batches before the checkpoint must not be re-scored"
    assert read_outputs(killed) == read_outputs(tmp_path / "whole")

    # Resuming a finished run rewrites the same output without scoring anything.
    seen.clear()
    score_and_select(teacher, batches_of(indices, sizes), out_dir=killed, **kwargs)
    assert seen == [] and read_outputs(killed) == read_outputs(tmp_path / "whole")


def test_resume_refuses_other_settings_and_fresh_start_cleans(tmp_path):
    indices, logits = make_data(100)
    score_and_select(FakeTeacher(logits), batches_of(indices, [10]), NUM_CLASSES, 5, tmp_path, shard_size=30)
    with pytest.raises(ValueError, match="other settings"):
        score_and_select(FakeTeacher(logits), batches_of(indices, [10]), NUM_CLASSES, 6, tmp_path, shard_size=30)
    score_and_select(FakeTeacher(logits), batches_of(indices[:50], [10]), NUM_CLASSES, 6, tmp_path,
                     shard_size=30, resume=False)
    assert sorted(p.name for p in tmp_path.glob("probs-*")) == [f"probs-0000{s}.safetensors" for s in (0, 1)]
    with pytest.raises(ValueError, match="start at example 20"):
        score_and_select(FakeTeacher(logits), batches_of(indices[20:], [10]), NUM_CLASSES, 6, tmp_path / "new",
                         shard_size=30, first_example=20)


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(10):
        folder = tmp_path / "images" / ("ab"[i % 2])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (tmp_path / "images" / "a" / "5x.png").write_bytes(b"not an image")  # logged and skipped
    return tmp_path / "images"


def cli_args(tmp_path, image_folder, out):
    import timm

    weights = tmp_path / "teacher.safetensors"
    if not weights.exists():
        model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
        save_file(model.state_dict(), str(weights))
    return ["--model", "test_resnet", "--weights", str(weights), "--num-classes", "3", "--data",
            str(image_folder), "--image-size", "16", "--batch-size", "4", "--top-k", "2", "--out", str(out),
            "--shard-size", "3", "--workers", "0", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]


def test_cli(tmp_path, image_folder, monkeypatch):
    import mpl_large.select as select

    args = cli_args(tmp_path, image_folder, tmp_path / "out")
    sel = main(args)
    out = tmp_path / "out"
    info = json.loads((out / "selection.json").read_text())
    assert info["examples_scored"] == 10 and len(info["prob_shards"]) == 4  # 11 rows, one unreadable
    assert sum(info["candidates_per_class"]) == 10
    assert info["kept_per_class"] == [min(2, n) for n in info["candidates_per_class"]]
    assert "test_resnet" in info["teacher"]
    shards = [load_file(str(out / n)) for n in info["prob_shards"]]
    rows = torch.cat([s["index"] for s in shards]).tolist()
    assert len(rows) == 10 and rows == sorted(rows) and set(rows) <= set(range(11))
    assert torch.allclose(torch.cat([s["probs"] for s in shards]).float().sum(-1), torch.ones(10), atol=1e-2)
    assert sel.index.numel() == sum(info["kept_per_class"])

    with pytest.raises(SystemExit):  # a previous run is there and --resume was not given
        main(args)

    # Killed after two batches (8 rows, one unreadable: 7 scored, checkpoint at 6), then resumed.
    readable = select._readable

    def killed_after_two(loader, unreadable):
        for b, batch in enumerate(readable(loader, unreadable)):
            if b == 2:
                raise KeyboardInterrupt("killed")
            yield batch

    killed = cli_args(tmp_path, image_folder, tmp_path / "killed")
    monkeypatch.setattr(select, "_readable", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        main(killed)
    assert read_progress(tmp_path / "killed")["consumed"] == 6
    monkeypatch.setattr(select, "_readable", readable)
    main(killed + ["--resume"])
    assert read_outputs(tmp_path / "killed") == read_outputs(out)


def test_cli_errors(tmp_path, image_folder, capsys):
    base = ["--model", "test_resnet", "--num-classes", "3", "--image-size", "16", "--top-k", "2",
            "--workers", "0", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit):
        main(base + ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")])
    assert f"does not exist: {tmp_path / 'missing'}" in capsys.readouterr().err

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit):
        main(base + ["--data", str(image_folder), "--out", str(tmp_path / "o2"), "--weights", str(bad)])
    assert "bad.safetensors: not a readable safetensors file" in capsys.readouterr().err

    wrong = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(SystemExit):
        main(base + ["--data", str(image_folder), "--out", str(tmp_path / "o3"), "--weights", str(wrong)])
    assert "wrong.safetensors do not fit test_resnet with 3 classes" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(base + ["--data", str(image_folder), "--out", str(tmp_path / "o4"),
                     "--weights", str(tmp_path / "nope.safetensors")])
    assert "nope.safetensors: no such file" in capsys.readouterr().err
