"""Prototypical refinement loss (paper section 2.3, REFERENCE.md section 6) and the two-stream
criterion CE + alpha * L_PR.

Per stream, with f the L2-normalised embedding [N, D], p = softmax(logits), y the labels:

- TP / FN / FP: sample n is a TP of class y_n if argmax p_n = y_n; an FN of y_n otherwise; and
  an FP of class argmax p_n when that differs from y_n.
- Prototypes P [K, D] (a buffer, random unit vectors from a seeded generator). For each class k
  with TPs in the batch: P_k <- rho * P_k + (1 - rho) * mean(f of the TPs of k); other classes
  keep P_k.
- FN centre c_FN_k = mean f of the FNs of class k; FP centre c_FP_k = mean f of the FPs of k.
- s_l = cos(f, P_l) for every class l; for the true class y only:
      s_FN_y = s_y + a (1 - p_y) [FN of y exists] (cos(f, c_FN_y) - 1)
      s_FP_y = s_y + a (1 - p_y) [FP of y exists] (-cos(f, c_FP_y) - 1)
- L_PR = mean_n CE(s_FN / tau, y) + mean_n CE(s_FP / tau, y).

Order within a step (as in FR-Head's public code, `local_avg_tp_fn_fp` then `get_score`):
the prototypes are first updated by the EMA rule with this batch's TP means, and the scores use
the *updated* prototypes, so the TP features of this batch receive gradient through their own
class mean. The stored buffer is the detached update. In eval mode nothing is updated and the
stored prototypes are used as they are. The calibration terms apply to every sample of class y
(FR-Head's default "V0"), not only to TP anchors as eq. (7)-(8) of the paper read.

Under torch.distributed the per-class sums and counts (TP, FN, FP) are all-reduced in one
collective, so every rank uses the same centres and holds identical prototypes after every
step. This collective is the one place a model-side module knows about ranks: the issue asks
for it, and only the loss can do it at the right moment in the step.
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
        a: float = 0.125,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if tau <= 0 or not 0 <= rho <= 1 or a < 0:
            raise ValueError(f"need tau > 0, 0 <= rho <= 1, a >= 0; got tau={tau}, rho={rho}, a={a}")
        self.num_classes = num_classes
        self.tau, self.rho, self.a = tau, rho, a
        # a private generator: the prototypes do not depend on (or disturb) the global RNG, and
        # are identical on every rank without a broadcast
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "prototypes", F.normalize(torch.randn(num_classes, embed_dim, generator=generator), dim=1)
        )

    def forward(self, embedding: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        f = F.normalize(embedding.float(), dim=1)                 # [N, D]
        probs = logits.float().softmax(dim=1)                     # [N, K]
        k = self.num_classes
        truth = F.one_hot(labels, k).to(f.dtype)                  # [N, K]
        predicted = F.one_hot(probs.argmax(dim=1), k).to(f.dtype)
        tp = truth * predicted                                    # [N, K]: n is a TP of class k
        fn = truth - tp                                           # n of class k, predicted other
        fp = predicted - tp                                       # n predicted k, of another class

        # per-class feature sums [3, K, D] and counts [3, K] for TP, FN, FP
        masks = torch.stack([tp, fn, fp])                         # [3, N, K]
        sums = torch.einsum("snk,nd->skd", masks, f)
        counts = masks.sum(dim=1)
        sums, counts = _all_reduce_keeping_local_grad(sums, counts)
        means = sums / counts.clamp(min=1.0).unsqueeze(-1)        # empty classes: zero vectors
        has = counts > 0                                          # [3, K]

        prototypes = self.prototypes.clone()
        if self.training:
            ema = self.rho * prototypes + (1.0 - self.rho) * means[0]
            prototypes = torch.where(has[0].unsqueeze(1), ema, prototypes)
            with torch.no_grad():
                self.prototypes.copy_(prototypes.detach())

        scores = f @ F.normalize(prototypes, dim=1).t()           # [N, K] cos(f, P_l)
        centres = F.normalize(means[1:], dim=2)                   # [2, K, D] FN, FP centres
        cos_fn = (f * centres[0][labels]).sum(dim=1)              # [N] cos(f, c_FN_y)
        cos_fp = (f * centres[1][labels]).sum(dim=1)              # [N] cos(f, c_FP_y)
        gate = self.a * (1.0 - probs.gather(1, labels[:, None]).squeeze(1))  # a (1 - p_y)
        shift_fn = gate * has[1][labels].to(f.dtype) * (cos_fn - 1.0)
        shift_fp = gate * has[2][labels].to(f.dtype) * (-cos_fp - 1.0)
        # only the true-class column moves
        scores_fn = scores + truth * shift_fn.unsqueeze(1)
        scores_fp = scores + truth * shift_fp.unsqueeze(1)
        return F.cross_entropy(scores_fn / self.tau, labels) + F.cross_entropy(scores_fp / self.tau, labels)


def _all_reduce_keeping_local_grad(
    sums: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum `sums` and `counts` over ranks (one all_reduce). The collective is not
    differentiable, so the global sum is rebuilt as local + (global - local).detach(): the value
    is the global sum, the gradient flows to this rank's own features (DDP then averages the
    parameter gradients over ranks, as for any other term of the loss)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums, counts
    flat = torch.cat([sums.detach().flatten(), counts.detach().flatten()])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    global_sums = flat[: sums.numel()].view_as(sums)
    global_counts = flat[sums.numel():].view_as(counts)
    return sums + (global_sums - sums.detach()), global_counts


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
        a: float = 0.125,
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
                    num_classes, embed_dim, tau=tau, rho=rho, a=a, seed=seed + STREAMS.index(s)
                )

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
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
