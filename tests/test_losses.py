import math

import pytest
import torch

from mpl_large.losses import sample_pseudo_labels, uda_loss


def test_uda_loss_against_a_per_example_loop():
    torch.manual_seed(0)
    weak, strong = torch.randn(12, 5) * 2, torch.randn(12, 5)
    tau, threshold = 0.6, 0.5
    loss, mask_rate = uda_loss(weak, strong, tau, threshold)
    total, kept = 0.0, 0
    for w, s in zip(weak.tolist(), strong.tolist()):
        p = [math.exp(v) / sum(math.exp(u) for u in w) for v in w]
        if max(p) < threshold:
            continue
        kept += 1
        target = [math.exp(v / tau) / sum(math.exp(u / tau) for u in w) for v in w]
        log_q = [v - math.log(sum(math.exp(u) for u in s)) for v in s]
        total -= sum(t * lq for t, lq in zip(target, log_q))
    assert 0 < kept < 12
    assert loss.item() == pytest.approx(total / 12, rel=1e-5)
    assert mask_rate.item() == pytest.approx(kept / 12)


def test_uda_target_is_not_differentiated():
    weak, strong = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    uda_loss(weak, strong, 0.5, 0.0)[0].backward()
    assert weak.grad is None and strong.grad.abs().sum() > 0


def test_sampled_pseudo_labels_follow_the_teacher_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().expand(20000, 3)
    counts = torch.bincount(sample_pseudo_labels(logits, "sample"), minlength=3) / 20000
    assert torch.allclose(counts, probs, atol=0.015)
    assert torch.equal(sample_pseudo_labels(logits[:5], "argmax"), torch.zeros(5, dtype=torch.long))
