"""Joint and limb Gaussian heatmaps (docs/data.md), vectorised.

Definition (the peer's GeneratePoseTarget, reproduced exactly):

- Joint: for a point (mx, my) with score s >= 1e-4, pixels x in [max(trunc(mx - 3 sigma), 0),
  min(trunc(mx + 3 sigma) + 1, W)) and likewise y get s * exp(-d^2 / (2 sigma^2)), d the
  distance from the pixel (x, y) to the point; every other pixel gets nothing. `trunc` rounds
  toward zero (the peer's `int()`), which is why a point just left of / above the image still
  touches column / row 0.
- Limb (a, b): value min(s_a, s_b) (skipped below 1e-4); the window is the endpoints' bounding
  box grown by 3 sigma with the same rule; d is the distance to the segment [a, b]. A limb
  shorter than 1 pixel (|ab|^2 < 1) is drawn as a joint at a with value s_a, as mmaction2's
  `generate_a_limb_heatmap` does (the skip test still uses min(s_a, s_b)): models trained with
  mmaction2 or pyskl saw exactly that.
- Persons merge by element-wise maximum; windows of one person never overlap within one
  channel and frame.

Pixel (x, y) is at integer coordinates: keypoints are expected in heatmap pixel units.

Vectorisation: every (frame, channel) window of a person is enumerated at once, so the work
is proportional to the window areas, exactly what the definition touches, instead of the full
H x W grid per limb. Limb windows are a ragged list of pixels ordered column by column (see
`_draw_segments`); joints, whose windows are small and whose Gaussian is separable, are one
[P, P, N] outer product. Values are written into the output with flat indices, one vectorised
write per person (persons may overlap, nothing else does).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np

EPS = 1e-4  # scores below this are skipped (the peer's eps)


def _window(lo: np.ndarray, hi: np.ndarray, sigma: float, size) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) pixel range covering [lo - 3 sigma, hi + 3 sigma], clipped to [0, size)
    (size: an int, or one per coordinate: [W, H] for (x, y) pairs)."""
    start = np.maximum(np.trunc(lo - np.float32(3 * sigma)), 0).astype(np.intp)
    stop = np.minimum(np.trunc(hi + np.float32(3 * sigma)).astype(np.intp) + 1, size)
    return start, stop


def _write_persons(out: np.ndarray, person: np.ndarray, pixels) -> None:
    """Write drawn pixels into the flat `out`, persons merged by element-wise maximum.

    person intp [N], non-decreasing: the owner of each item; pixels(lo, hi) -> (flat indices,
    values) of items lo..hi-1. Within one person no two pixels share a flat index (except a
    dummy slot), so each person is one vectorised write; the loop is over persons (1-3), never
    frames or joints.
    """
    bounds = np.searchsorted(person, np.arange(person[-1] + 2))
    for lo, hi in pairwise(bounds):
        if lo == hi:
            continue
        idx, val = pixels(lo, hi)
        out[idx] = val if lo == 0 else np.maximum(out[idx], val)


def _draw_segments(
    out: np.ndarray,
    size: tuple[int, int],
    a: np.ndarray,
    b: np.ndarray,
    value: np.ndarray,
    plane: np.ndarray,
    sigma: float,
    merge: bool,
) -> None:
    """Draw one person's N Gaussian segments into the flat `out` in place.

    out float32 [C * T * H * W] with C * T * H * W < 2^31, size (H, W); a, b float32 [N, 2]
    (x, y); value float32 [N]; plane intp [N]: the flat offset of each segment's (channel,
    frame) plane. merge: keep the element-wise maximum with what `out` holds (an earlier
    person), else overwrite. One person's windows never overlap: each pixel is written once.

    Layout. Segments are sorted by window width, widest first, and their window rows are listed
    in that order, so the rows at least j + 1 pixels wide are a prefix of the row list. Pixels
    are ordered by column: column 0 of every row, then column 1 of the rows that wide, and so
    on. Every per-row constant reaches the pixels through one np.concatenate of those prefixes
    of a packed [K, rows] table (contiguous copies) instead of an np.repeat per constant.
    """
    h, w = size
    # A limb shorter than 1 pixel is a point at a: ab = 0, so its window is around a and t = 0.
    ab = b - a
    d2_ab = np.einsum("ij,ij->i", ab, ab)
    ab *= (d2_ab >= 1)[:, None]
    b = a + ab
    x0y0, x1y1 = _window(np.minimum(a, b), np.maximum(a, b), sigma, np.array([w, h]))
    wh = x1y1 - x0y0
    # Per-segment constants, float32 [8, N]: x0 - a_x, ab / |ab|^2 (x, y), ab (x, y), y0 - a_y,
    # value, and the flat index of the window's top-left pixel as int32 bits.
    per_segment = np.empty((8, len(a)), np.float32)
    per_segment[0] = x0y0[:, 0] - a[:, 0]
    per_segment[1:3] = ab.T / np.maximum(d2_ab, 1)
    per_segment[3:5] = ab.T
    per_segment[5] = x0y0[:, 1] - a[:, 1]
    per_segment[6] = value
    per_segment.view(np.int32)[7] = plane + x0y0[:, 0] + x0y0[:, 1] * w
    order = np.argsort(-wh[:, 0], kind="stable")
    order = order[(value[order] >= EPS) & (wh[order] > 0).all(-1)]
    if order.size == 0:
        return
    per_segment = per_segment[:, order]
    width, height = wh[order].T

    # segments -> rows. Row k of a window is k pixels below its top row: dy and the flat index
    # grow by k and k * W; t's y part is dy * ab_y / |ab|^2.
    rows_end = np.cumsum(height)
    table = np.repeat(per_segment, height, axis=1)
    k = np.arange(rows_end[-1]) - np.repeat(rows_end - height, height)
    ty, dy = table[2], table[5]  # views
    dy += k.astype(np.float32)
    ty *= dy
    table.view(np.int32)[7] += (k * w).astype(np.int32)

    # rows -> pixels, column by column
    segments_wider = np.searchsorted(-width, -np.arange(width[0]), side="left")  # than j pixels
    rows_wider = np.append(0, rows_end)[segments_wider]
    px = np.concatenate([table[:, :n] for n in rows_wider], axis=1)
    dxa0, tx, ty, abx, aby, dy, v, first = px
    dx = dxa0 + np.repeat(np.arange(width[0], dtype=np.float32), rows_wider)  # pixel x - a_x
    t = dx * tx
    t += ty
    np.clip(t, 0, 1, out=t)
    ex = dx - t * abx
    ey = dy - t * aby
    d2 = ex * ex
    d2 += ey * ey
    d2 *= np.float32(-0.5 / (sigma * sigma))
    values = np.exp(d2)
    values *= v
    flat = first.view(np.int32) + np.repeat(np.arange(width[0]), rows_wider)
    out[flat] = np.maximum(out[flat], values) if merge else values


def joint_heatmaps(
    keypoint: np.ndarray, score: np.ndarray, size: tuple[int, int], sigma: float
) -> np.ndarray:
    """Joint heatmaps.

    keypoint float [M, T, V, 2] (x, y) in heatmap pixels; score float [M, T, V];
    size (H, W). Returns float32 [V, T, H, W].

    A joint's Gaussian is separable, exp(-(dx^2 + dy^2) / 2s^2) = gx * gy, and its window is
    at most P pixels wide (5 for sigma 0.7), so all N joints are drawn as one [P, P, N] outer
    product of two [P, N] profiles; pixels outside a joint's window go to a dummy slot.
    """
    kp = np.asarray(keypoint, dtype=np.float32)
    sc = np.asarray(score, dtype=np.float32)
    m, t, v, _ = kp.shape
    h, w = size
    out = np.zeros(v * t * h * w + 1, dtype=np.float32)  # + 1: the dummy slot
    dummy = out.size - 1
    # Items ordered (person, frame, joint).
    mx, my, s = kp[..., 0].ravel(), kp[..., 1].ravel(), sc.ravel()
    x0, x1 = _window(mx, mx, sigma, w)
    y0, y1 = _window(my, my, sigma, h)
    keep = (s >= EPS) & (x1 > x0) & (y1 > y0)
    items = np.arange(s.size)
    if not keep.all():  # usually every joint is drawn: skip the compaction then
        items = np.flatnonzero(keep)
        mx, my, s, x0, x1, y0, y1 = (
            mx[items],
            my[items],
            s[items],
            x0[items],
            x1[items],
            y0[items],
            y1[items],
        )
    if items.size:
        width, height = x1 - x0, y1 - y0
        p = int(max(width.max(), height.max()))
        # Window pixels are laid out [P, P, N], items last: numpy's inner loops then run over
        # the N items instead of P = 5 pixels, which made [N, P, P] broadcasts several times slower.
        steps = np.arange(p)[:, None]  # [P, 1]
        # The exponent in float64, then exp in float32: the same rounding as the peer's code, so
        # the heatmaps (and the trainings on them) stay bit for bit what they were.
        k = np.float32(-0.5 / (sigma * sigma))
        dx = (x0 + steps) - mx  # [P, N] pixel - joint, float64
        dy = (y0 + steps) - my
        gx = np.exp(dx * dx * k, dtype=np.float32)
        gy = np.exp(dy * dy * k, dtype=np.float32) * s
        values = gy[:, None, :] * gx[None, :, :]  # [P (y), P (x), N]
        # Flat indices, separable too: (plane + row offset) + column. A row or column past the
        # window gets a sentinel >= the dummy slot, so one clip sends every pixel outside the
        # window there.
        person, frame, joint = np.unravel_index(items, (m, t, v))
        base = (joint * t + frame) * (h * w)
        rows = np.where(steps < height, base + (y0 + steps) * w, dummy)  # [P, N]
        cols = np.where(steps < width, x0 + steps, dummy)
        flat = rows[:, None, :] + cols[None, :, :]  # [P, P, N]
        np.minimum(flat, dummy, out=flat)
        _write_persons(
            out, person, lambda lo, hi: (flat[..., lo:hi].ravel(), values[..., lo:hi].ravel())
        )
    return out[:-1].reshape(v, t, h, w)


def limb_heatmaps(
    keypoint: np.ndarray,
    score: np.ndarray,
    limbs: Sequence[tuple[int, int]],
    size: tuple[int, int],
    sigma: float,
) -> np.ndarray:
    """Limb heatmaps.

    keypoint float [M, T, V, 2] in heatmap pixels; score float [M, T, V]; limbs L pairs of
    joint indices; size (H, W). Returns float32 [L, T, H, W].
    """
    kp = np.asarray(keypoint, dtype=np.float32)
    sc = np.asarray(score, dtype=np.float32)
    m, t, _, _ = kp.shape
    n_limbs = len(limbs)
    h, w = size
    out = np.zeros((n_limbs, t, h, w), dtype=np.float32)
    if n_limbs == 0:
        return out
    if out.size >= 2**31:
        raise ValueError(f"limb heatmaps of shape {out.shape} are too large (at most 2^31 values)")
    ends = np.asarray(limbs, dtype=np.intp).reshape(n_limbs, 2)
    # Items ordered (frame, limb) within a person; persons merge by element-wise maximum.
    a, b = kp[:, :, ends[:, 0]], kp[:, :, ends[:, 1]]  # [M, T, L, 2]
    value = np.minimum(sc[:, :, ends[:, 0]], sc[:, :, ends[:, 1]])
    # a limb shorter than a pixel is a point at a with a's score, once min(s_a, s_b) passes EPS
    ab = b - a
    short = np.einsum("...i,...i->...", ab, ab) < 1
    value = np.where(short & (value >= EPS), sc[:, :, ends[:, 0]], value)
    plane = ((np.arange(n_limbs) * t + np.arange(t)[:, None]) * (h * w)).ravel()
    for person in range(m):
        _draw_segments(
            out.reshape(-1),
            size,
            a[person].reshape(-1, 2),
            b[person].reshape(-1, 2),
            value[person].ravel(),
            plane,
            sigma,
            merge=person > 0,
        )
    return out


def pose_heatmaps(
    keypoint: np.ndarray,
    score: np.ndarray,
    size: tuple[int, int],
    sigma: float,
    limbs: Sequence[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Joint heatmaps when `limbs` is None, else limb heatmaps: float32 [C, T, H, W]."""
    if limbs is None:
        return joint_heatmaps(keypoint, score, size, sigma)
    return limb_heatmaps(keypoint, score, limbs, size, sigma)
