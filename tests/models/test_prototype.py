"""PrototypeRefinementLoss and TwoStreamCriterion against a slow loop-by-loop reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from mg_ray.models import PrototypeRefinementLoss, TwoStreamCriterion

torch.set_num_threads(1)
K, D, N = 5, 8, 12


def reference(f, logits, labels, prototypes, *, tau, rho, a):
    """L_PR and the updated prototypes, one sample and one class at a time (float64)."""
    f = [v / v.norm() for v in f.double()]
    logits, prototypes = logits.double(), prototypes.double()
    n_samples, n_classes = logits.shape
    p = logits.softmax(1)
    pred = [int(row.argmax()) for row in logits]
    y = [int(v) for v in labels]
    cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))
    mean = lambda idx: sum(f[m] for m in idx) / len(idx)

    updated = prototypes.clone()
    for k in range(n_classes):
        tps = [n for n in range(n_samples) if y[n] == k and pred[n] == k]
        if tps:
            updated[k] = rho * prototypes[k] + (1 - rho) * mean(tps)

    def ce(scores, target):
        z = [s / tau for s in scores]
        return -z[target] + math.log(sum(math.exp(v) for v in z))

    total = 0.0
    for n in range(n_samples):
        k = y[n]
        fns = [m for m in range(n_samples) if y[m] == k and pred[m] != k]
        fps = [m for m in range(n_samples) if pred[m] == k and y[m] != k]
        s = [cos(f[n], updated[l]) for l in range(n_classes)]
        gate = a * (1 - float(p[n, k]))
        s_fn, s_fp = list(s), list(s)
        if fns:
            s_fn[k] += gate * (cos(f[n], mean(fns)) - 1)
        if fps:
            s_fp[k] += gate * (-cos(f[n], mean(fps)) - 1)
        total += ce(s_fn, k) + ce(s_fp, k)
    return total / n_samples, updated


def batch(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (N,), generator=g)
    f = F.normalize(torch.randn(N, D, generator=g), dim=1)
    if kind == "mixed":      # random predictions: TPs, FNs and FPs
        logits = torch.randn(N, K, generator=g) * 2
        logits[: N // 2] += 6 * F.one_hot(labels[: N // 2], K)  # make sure some TPs exist
    elif kind == "all_correct":  # no FN, no FP
        logits = torch.randn(N, K, generator=g) + 8 * F.one_hot(labels, K)
    else:  # all wrong: no TP, every sample an FN (and an FP of another class)
        logits = torch.randn(N, K, generator=g) + 8 * F.one_hot((labels + 1) % K, K)
    return f, logits, labels


@pytest.mark.parametrize("kind", ["mixed", "all_correct", "all_wrong"])
def test_loss_and_update_match_slow_reference(kind):
    f, logits, labels = batch(kind)
    pred = logits.argmax(1)
    if kind == "mixed":
        wrong = pred != labels
        assert (~wrong).any() and wrong.any()
        # some sample's own class has an FN elsewhere, and some has an FP: both terms are live
        assert any(bool((wrong & (labels == c)).any()) for c in labels.tolist())
        assert any(bool((wrong & (pred == c)).any()) for c in labels.tolist())
    loss_fn = PrototypeRefinementLoss(K, D, tau=0.125, rho=0.9, a=0.125, seed=3)
    before = loss_fn.prototypes.clone()
    expected_loss, expected_protos = reference(f, logits, labels, before, tau=0.125, rho=0.9, a=0.125)
    loss = loss_fn(f, logits, labels)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    torch.testing.assert_close(loss_fn.prototypes.double(), expected_protos, rtol=1e-6, atol=1e-6)


def test_prototypes_move_only_for_true_positive_classes_by_the_ema_rule():
    f, logits, labels = batch("mixed", seed=1)
    loss_fn = PrototypeRefinementLoss(K, D, rho=0.7)
    before = loss_fn.prototypes.clone()
    loss_fn(f, logits, labels)
    tp = logits.argmax(1) == labels
    for k in range(K):
        members = tp & (labels == k)
        if members.any():
            torch.testing.assert_close(loss_fn.prototypes[k], 0.7 * before[k] + 0.3 * f[members].mean(0))
        else:
            assert torch.equal(loss_fn.prototypes[k], before[k])
    assert not torch.equal(loss_fn.prototypes, before)


def test_no_update_in_eval_mode_and_state_dict_holds_seeded_prototypes():
    f, logits, labels = batch("all_correct")
    loss_fn = PrototypeRefinementLoss(K, D, seed=7).eval()
    before = loss_fn.prototypes.clone()
    loss_fn(f, logits, labels)
    assert torch.equal(loss_fn.prototypes, before)
    assert torch.equal(PrototypeRefinementLoss(K, D, seed=7).state_dict()["prototypes"], before)
    torch.testing.assert_close(before.norm(dim=1), torch.ones(K))


def test_loss_gradient_reaches_embeddings_and_logits():
    f, logits, labels = batch("mixed")
    f, logits = f.clone().requires_grad_(), logits.clone().requires_grad_()
    PrototypeRefinementLoss(K, D)(f, logits, labels).backward()
    assert f.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0


def test_criterion_total_is_weighted_ce_plus_alpha_pr():
    f, logits, labels = batch("mixed")
    outputs = {"rgb_logits": logits, "rgb_embedding": f, "pose_logits": logits.flip(0), "pose_embedding": f.flip(0)}
    crit = TwoStreamCriterion(K, D, alpha=0.3, stream_weights=(1.0, 2.0))
    refs = {s: PrototypeRefinementLoss(K, D, seed=i) for i, s in enumerate(("rgb", "pose"))}
    out = crit(outputs, labels)
    expected = 0.0
    for s, w in (("rgb", 1.0), ("pose", 2.0)):
        ce = F.cross_entropy(outputs[f"{s}_logits"], labels)
        pr = refs[s](outputs[f"{s}_embedding"], outputs[f"{s}_logits"], labels)
        assert out[f"ce_{s}"].item() == pytest.approx(ce.item())
        assert out[f"pr_{s}"].item() == pytest.approx(pr.item())
        expected += w * (ce + 0.3 * pr)
    assert out["loss"].item() == pytest.approx(expected.item())
    assert set(crit.state_dict()) == {"refine.rgb.prototypes", "refine.pose.prototypes"}


def test_criterion_without_refinement_is_the_plain_ce_sum():
    f, logits, labels = batch("mixed")
    outputs = {"rgb_logits": logits, "rgb_embedding": f, "pose_logits": logits.flip(0), "pose_embedding": f}
    crit = TwoStreamCriterion(K, D, refinement=False)
    out = crit(outputs, labels)
    expected = F.cross_entropy(logits, labels) + F.cross_entropy(logits.flip(0), labels)
    assert out["loss"].item() == pytest.approx(expected.item())
    assert set(out) == {"loss", "ce_rgb", "ce_pose"} and not crit.state_dict()
    single = TwoStreamCriterion(K, D, streams=("pose",))(outputs, labels)
    assert set(single) == {"loss", "ce_pose", "pr_pose"}
