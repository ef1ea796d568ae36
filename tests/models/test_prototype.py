"""PrototypeRefinementLoss and TwoStreamCriterion against a slow loop-by-loop reference."""

import pytest
import torch
import torch.nn.functional as F

from mg_ray.models import PrototypeRefinementLoss, TwoStreamCriterion

torch.set_num_threads(1)
K, D, N = 5, 8, 12


def reference(
    e,
    logits,
    labels,
    prototypes,
    *,
    tau,
    rho,
    a,
    features="unit",
    probs_grad="keep",
    calibrate="all",
):
    """L_PR and the updated prototypes, one sample and one class at a time, in float64 torch
    ops so that autograd gives the reference gradient too. Written from the formulas of
    REFERENCE.md section 6 (FR-Head's `get_score`), not from the module."""
    f = [v / v.norm() for v in e]
    x = f if features == "unit" else list(e)
    p = (logits.detach() if probs_grad == "detach" else logits).softmax(1)
    n_samples, n_classes = logits.shape
    pred = [int(row.argmax()) for row in logits]
    y = [int(v) for v in labels]
    cos = lambda u, v: u @ v / (u.norm() * v.norm())
    mean = lambda idx: sum(x[m] for m in idx) / len(idx)

    updated = [prototypes[k] for k in range(n_classes)]
    for k in range(n_classes):
        tps = [n for n in range(n_samples) if y[n] == k and pred[n] == k]
        if tps:
            updated[k] = rho * prototypes[k] + (1 - rho) * mean(tps)

    def ce(scores, target):
        z = torch.stack(scores) / tau
        return -z[target] + torch.logsumexp(z, 0)

    total = 0.0
    for n in range(n_samples):
        k = y[n]
        fns = [m for m in range(n_samples) if y[m] == k and pred[m] != k]
        fps = [m for m in range(n_samples) if pred[m] == k and y[m] != k]
        s = [cos(f[n], updated[l]) for l in range(n_classes)]
        gate = a * (1 - p[n, k])
        if calibrate == "tp" and pred[n] != k:
            gate = 0 * gate
        s_fn, s_fp = list(s), list(s)
        if fns:
            s_fn[k] = s_fn[k] + gate * (cos(f[n], mean(fns)) - 1)
        if fps:
            s_fp[k] = s_fp[k] + gate * (-cos(f[n], mean(fps)) - 1)
        total = total + ce(s_fn, k) + ce(s_fp, k)
    return total / n_samples, torch.stack(updated).detach()


def batch(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (N,), generator=g)
    f = 3 * torch.randn(N, D, generator=g)  # embeddings come unnormalised from the head
    if kind == "mixed":  # random predictions: TPs, FNs and FPs
        logits = torch.randn(N, K, generator=g) * 2
        logits[: N // 2] += 6 * F.one_hot(labels[: N // 2], K)  # make sure some TPs exist
    elif kind == "all_correct":  # no FN, no FP
        logits = torch.randn(N, K, generator=g) + 8 * F.one_hot(labels, K)
    else:  # all wrong: no TP, every sample an FN (and an FP of another class)
        logits = torch.randn(N, K, generator=g) + 8 * F.one_hot((labels + 1) % K, K)
    return f, logits, labels


VARIANTS = [
    {},  # the defaults: unit features, p keeps its gradient, every sample of y, a = 0.125
    {"features": "raw"},
    {"probs_grad": "detach"},
    {"calibrate": "tp"},
    {"a": "tau", "tau": 0.07},
    {"features": "raw", "probs_grad": "detach", "a": 0.3},  # FR-Head's choices, another a
]


@pytest.mark.parametrize(
    "variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "defaults"
)
@pytest.mark.parametrize("kind", ["mixed", "all_correct", "all_wrong"])
def test_loss_update_and_gradient_match_slow_reference(kind, variant):
    f, logits, labels = batch(kind)
    pred = logits.argmax(1)
    if kind == "mixed":
        wrong = pred != labels
        assert (~wrong).any() and wrong.any()
        # some sample's own class has an FN elsewhere, and some has an FP: both terms are live
        assert any(bool((wrong & (labels == c)).any()) for c in labels.tolist())
        assert any(bool((wrong & (pred == c)).any()) for c in labels.tolist())
    settings = {"tau": 0.125, "rho": 0.9, "a": 0.125, **variant}
    loss_fn = PrototypeRefinementLoss(K, D, seed=3, **settings)
    before = loss_fn.prototypes.clone()
    if settings["a"] == "tau":
        settings["a"] = settings["tau"]

    e64, logits64 = f.double().requires_grad_(), logits.double().requires_grad_()
    expected_loss, expected_protos = reference(e64, logits64, labels, before.double(), **settings)
    expected_loss.backward()
    e32, logits32 = f.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = loss_fn(e32, logits32, labels)
    loss.backward()

    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    torch.testing.assert_close(loss_fn.prototypes.double(), expected_protos, rtol=1e-6, atol=1e-6)
    grad = lambda t: (
        torch.zeros_like(t, dtype=torch.float64) if t.grad is None else t.grad.double()
    )  # None: no path
    torch.testing.assert_close(grad(e32), grad(e64), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad(logits32), grad(logits64), rtol=1e-4, atol=1e-6)
    if variant.get("probs_grad") == "detach":
        assert not grad(logits32).any()  # p detached: the loss does not reach the logits


def test_variants_change_the_loss_and_bad_values_are_named():
    f, logits, labels = batch("mixed")
    losses = {
        str(v): PrototypeRefinementLoss(K, D, **v)(f, logits, labels).item() for v in VARIANTS
    }
    # every setting changes the value, except probs_grad, which changes only the gradient
    assert len(set(losses.values())) == len(VARIANTS) - 1, losses
    assert losses[str({})] == losses[str({"probs_grad": "detach"})]
    for name, value in (("features", "l2"), ("probs_grad", "stop"), ("calibrate", "fp")):
        with pytest.raises(ValueError, match=f"{name}: expected one of"):
            PrototypeRefinementLoss(K, D, **{name: value})


def test_prototypes_move_only_for_true_positive_classes_by_the_ema_rule():
    f, logits, labels = batch("mixed", seed=1)
    loss_fn = PrototypeRefinementLoss(K, D, rho=0.7)
    before = loss_fn.prototypes.clone()
    loss_fn(f, logits, labels)
    tp = logits.argmax(1) == labels
    for k in range(K):
        members = tp & (labels == k)
        if members.any():
            unit = F.normalize(f[members], dim=1)  # the default "unit" features
            torch.testing.assert_close(loss_fn.prototypes[k], 0.7 * before[k] + 0.3 * unit.mean(0))
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
    outputs = {
        "rgb_logits": logits,
        "rgb_embedding": f,
        "pose_logits": logits.flip(0),
        "pose_embedding": f.flip(0),
    }
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
    outputs = {
        "rgb_logits": logits,
        "rgb_embedding": f,
        "pose_logits": logits.flip(0),
        "pose_embedding": f,
    }
    crit = TwoStreamCriterion(K, D, refinement=False)
    out = crit(outputs, labels)
    expected = F.cross_entropy(logits, labels) + F.cross_entropy(logits.flip(0), labels)
    assert out["loss"].item() == pytest.approx(expected.item())
    assert set(out) == {"loss", "ce_rgb", "ce_pose"} and not crit.state_dict()
    single = TwoStreamCriterion(K, D, streams=("pose",))(outputs, labels)
    assert set(single) == {"loss", "ce_pose", "pr_pose"}
