"""Prototypical refinement loss (paper section 2.3; docs/model.md) and the two-stream
criterion CE + alpha * L_PR.

Per stream, with e the embedding [N, D], f = e / |e|, p = softmax(logits), y the labels:

- TP / FN / FP: sample n is a TP of class y_n if argmax p_n = y_n; an FN of y_n otherwise; and
  an FP of class argmax p_n when that differs from y_n.
- Prototypes P [K, D] (a buffer, random unit vectors from a seeded generator). For each class k
  with TPs in the batch: P_k <- rho * P_k + (1 - rho) * mean(x of the TPs of k); other classes
  keep P_k. x is f or e (`features`, below).
- FN centre c_FN_k = mean x of the FNs of class k; FP centre c_FP_k = mean x of the FPs of k.
- s_l = cos(f, P_l) for every class l; for the true class y only:
      s_FN_y = s_y + a (1 - p_y) [FN of y exists] (cos(f, c_FN_y) - 1)
      s_FP_y = s_y + a (1 - p_y) [FP of y exists] (-cos(f, c_FP_y) - 1)
- L_PR = mean_n CE(s_FN / tau, y) + mean_n CE(s_FP / tau, y).

Order within a step (as in FR-Head's public code, `local_avg_tp_fn_fp` then `get_score`):
the prototypes are first updated by the EMA rule with this batch's TP means, and the scores use
the *updated* prototypes, so the TP features of this batch receive gradient through their own
class mean. The stored buffer is the detached update. In eval mode nothing is updated and the
stored prototypes are used as they are.

Where the sources differ (docs/model.md), each choice is a setting (`LossConfig`):

    features     "unit": the class means average f, so prototypes are means of unit vectors
                 (the default, what the learnability test was tuned with); "raw": they average
                 e, as FR-Head does (its prototypes are not unit vectors). Scores are cosines
                 either way.
    probs_grad   "keep": p = softmax(logits) keeps its gradient, as PCAN (default); "detach":
                 FR-Head detaches the logits first.
    calibrate    "all": the calibration terms apply to every sample of class y, FR-Head's
                 default "V0" (default); "tp": only to true-positive anchors, as the paper's
                 eq. (7)-(8) read.
    a            the calibration weight, FR-Head's 0.125 by default, kept apart from tau as
                 FR-Head does; "tau" ties it to tau, as the paper's eq. (9) reads.

Under torch.distributed the per-class sums and counts (TP, FN, FP) are all-reduced in one
collective, so every rank uses the same centres and holds bit-identical prototypes after every
step, for any world size. The sums go through a differentiable all_reduce (`SumOverRanks`):
its backward all-reduces the gradients too, so each rank's features receive the gradient of
every rank's loss through the class means, and the DDP step equals the full-batch step (with a
plain all_reduce and the local gradient only, a rank would see 1/world of that term's
cross-rank part). This collective is the one place a model-side module knows about ranks: only
the loss can do it at the right moment in the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn

STREAMS = ("rgb", "pose")


class PrototypeRefinementLoss(nn.Module):
    """forward(embedding [N, D], logits [N, K], labels [N] int) -> scalar L_PR.

    `prototypes` [K, D] is a registered buffer, so it is saved in `state_dict()`; in training
    mode every call updates it (without gradient)."""

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        tau: float = 0.125,
        rho: float = 0.9,
        a: float | str = 0.125,
        features: str = "unit",
        probs_grad: str = "keep",
        calibrate: str = "all",
        seed: int = 0,
    ) -> None:
        super().__init__()
        a = tau if a == "tau" else a
        if tau <= 0 or not 0 <= rho <= 1 or a < 0:
            raise ValueError(
                f"need tau > 0, 0 <= rho <= 1, a >= 0; got tau={tau}, rho={rho}, a={a}"
            )
        for name, value, allowed in (
            ("features", features, ("unit", "raw")),
            ("probs_grad", probs_grad, ("keep", "detach")),
            ("calibrate", calibrate, ("all", "tp")),
        ):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        self.num_classes = num_classes
        self.tau, self.rho, self.a = tau, rho, float(a)
        self.features, self.probs_grad, self.calibrate = features, probs_grad, calibrate
        # a private generator: the prototypes do not depend on (or disturb) the global RNG, and
        # are identical on every rank without a broadcast
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "prototypes",
            F.normalize(torch.randn(num_classes, embed_dim, generator=generator), dim=1),
        )

    def forward(
        self, embedding: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        e = embedding.float()  # [N, D]
        f = F.normalize(e, dim=1)
        x = f if self.features == "unit" else e  # what the class means average
        logits = logits.float() if self.probs_grad == "keep" else logits.float().detach()
        probs = logits.softmax(dim=1)  # [N, K]
        k = self.num_classes
        truth = F.one_hot(labels, k).to(f.dtype)  # [N, K]
        predicted = F.one_hot(probs.argmax(dim=1), k).to(f.dtype)
        tp = truth * predicted  # [N, K]: n is a TP of class k
        fn = truth - tp  # n of class k, predicted other
        fp = predicted - tp  # n predicted k, of another class

        # per-class feature sums [3, K, D] and counts [3, K] for TP, FN, FP
        masks = torch.stack([tp, fn, fp])  # [3, N, K]
        sums = torch.einsum("snk,nd->skd", masks, x)
        counts = masks.sum(dim=1)
        sums, counts = _all_reduce_sums(sums, counts)
        means = sums / counts.clamp(min=1.0).unsqueeze(-1)  # empty classes: zero vectors
        has = counts > 0  # [3, K]

        prototypes = self.prototypes.clone()
        if self.training:
            ema = self.rho * prototypes + (1.0 - self.rho) * means[0]
            prototypes = torch.where(has[0].unsqueeze(1), ema, prototypes)
            with torch.no_grad():
                self.prototypes.copy_(prototypes.detach())

        scores = f @ F.normalize(prototypes, dim=1).t()  # [N, K] cos(f, P_l)
        centres = F.normalize(means[1:], dim=2)  # [2, K, D] FN, FP centres
        cos_fn = (f * centres[0][labels]).sum(dim=1)  # [N] cos(f, c_FN_y)
        cos_fp = (f * centres[1][labels]).sum(dim=1)  # [N] cos(f, c_FP_y)
        gate = self.a * (1.0 - probs.gather(1, labels[:, None]).squeeze(1))  # a (1 - p_y)
        if self.calibrate == "tp":  # only the anchors that are true positives are calibrated
            gate = gate * tp.sum(dim=1)
        shift_fn = gate * has[1][labels].to(f.dtype) * (cos_fn - 1.0)
        shift_fp = gate * has[2][labels].to(f.dtype) * (-cos_fp - 1.0)
        # only the true-class column moves
        scores_fn = scores + truth * shift_fn.unsqueeze(1)
        scores_fp = scores + truth * shift_fp.unsqueeze(1)
        return F.cross_entropy(scores_fn / self.tau, labels) + F.cross_entropy(
            scores_fp / self.tau, labels
        )


class SumOverRanks(torch.autograd.Function):
    """all_reduce(sum) whose backward is all_reduce(sum) of the gradient: the differentiable
    collective (torch.distributed.nn's own is deprecated in torch 2.13 in favour of a private
    module). Every rank gets the same bits forward and backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


def _all_reduce_sums(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sums` and `counts` summed over ranks: the sums through `SumOverRanks` (the exact gradient
    through the class means), the counts, which need none, through a plain all_reduce."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums, counts
    counts = counts.detach().clone()
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return SumOverRanks.apply(sums), counts


class TwoStreamCriterion(nn.Module):
    """forward(outputs, labels) -> {"loss": sum_s w_s (CE_s + alpha L_PR_s), "ce_<s>", "pr_<s>"}.

    `outputs` is MicroGestureNet's dict ("<s>_logits" [N, K], "<s>_embedding" [N, D]); the
    parts are detached, for logging. With refinement off the loss is the plain weighted CE sum
    and the criterion holds no prototypes. The stream weights are (rgb, pose) whatever
    `streams` holds. Stream s's prototypes are seeded with seed + its index in ("rgb", "pose"),
    so a single-stream criterion starts from the same prototypes as that stream of a two-stream
    one.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        alpha: float = 0.1,
        tau: float = 0.125,
        rho: float = 0.9,
        a: float | str = 0.125,
        features: str = "unit",
        probs_grad: str = "keep",
        calibrate: str = "all",
        refinement: bool = True,
        stream_weights: tuple[float, float] = (1.0, 1.0),
        streams: tuple[str, ...] = STREAMS,
        seed: int = 0,
    ) -> None:
        super().__init__()
        unknown = [s for s in streams if s not in STREAMS]
        if unknown or not streams:
            raise ValueError(f"streams must be a non-empty subset of {STREAMS}, got {streams!r}")
        self.streams = tuple(streams)
        self.alpha = alpha
        self.refinement = refinement
        self.weights = dict(zip(STREAMS, (float(w) for w in stream_weights)))
        self.refine = nn.ModuleDict()
        if refinement:
            for s in self.streams:
                self.refine[s] = PrototypeRefinementLoss(
                    num_classes,
                    embed_dim,
                    tau=tau,
                    rho=rho,
                    a=a,
                    features=features,
                    probs_grad=probs_grad,
                    calibrate=calibrate,
                    seed=seed + STREAMS.index(s),
                )

    def forward(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        total = None
        parts: dict[str, torch.Tensor] = {}
        for s in self.streams:
            logits = outputs[f"{s}_logits"].float()
            ce = F.cross_entropy(logits, labels)
            stream_loss = ce
            parts[f"ce_{s}"] = ce.detach()
            if self.refinement:
                pr = self.refine[s](outputs[f"{s}_embedding"], logits, labels)
                stream_loss = ce + self.alpha * pr
                parts[f"pr_{s}"] = pr.detach()
            weighted = self.weights[s] * stream_loss
            total = weighted if total is None else total + weighted
        return {"loss": total, **parts}
