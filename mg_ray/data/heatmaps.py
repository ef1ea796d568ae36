"""Joint and limb Gaussian heatmaps (REFERENCE.md section 3), vectorised.

Definition (the peer's GeneratePoseTarget, reproduced exactly):

- Joint: for a point (mx, my) with score s >= 1e-4, pixels x in [max(trunc(mx - 3 sigma), 0),
  min(trunc(mx + 3 sigma) + 1, W)) and likewise y get s * exp(-d^2 / (2 sigma^2)), d the
  distance from the pixel (x, y) to the point; every other pixel gets nothing. `trunc` rounds
  toward zero (the peer's `int()`), which is why a point just left of / above the image still
  touches column / row 0.
- Limb (a, b): value min(s_a, s_b) (skipped below 1e-4); the window is the endpoints' bounding
  box grown by 3 sigma with the same rule; d is the distance to the segment [a, b]. A limb
  shorter than 1 pixel (|ab|^2 < 1) is drawn as a joint at a (with value min(s_a, s_b); the peer
  uses s_a there, which we consider a slip).
- Persons merge by element-wise maximum; windows of one person never overlap within one
  channel and frame.

Pixel (x, y) is at integer coordinates: keypoints are expected in heatmap pixel units.

Vectorisation: every (person, frame, channel) window is enumerated at once as a ragged list of
pixels (np.repeat over window sizes), so the work is proportional to the window areas, exactly
what the definition touches, instead of the full H x W grid per limb; joints, whose windows
are small and whose Gaussian is separable, are one [P, P, N] outer product. Values are written
into the output with flat indices, one vectorised write per person (persons may overlap,
nothing else does).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Sequence

import numpy as np

EPS = 1e-4  # scores below this are skipped (the peer's eps)

# 0, 1, 2, ... as int64 and float32, grown on demand: `np.arange` is a scalar loop (~0.5 ns an
# element), and the limb path needs one of each as long as its pixel list on every call.
_COUNT = {np.intp: np.arange(0, dtype=np.intp), np.float32: np.arange(0, dtype=np.float32)}


def _count(n: int, dtype) -> np.ndarray:
    """A read-only view of 0..n-1 (exact in float32 up to 2^24)."""
    if _COUNT[dtype].size < n:
        grown = np.arange(max(n, 2 * _COUNT[dtype].size), dtype=dtype)
        grown.flags.writeable = False
        _COUNT[dtype] = grown  # replaced, never resized: views handed out stay valid
    return _COUNT[dtype][:n]


def _window(lo: np.ndarray, hi: np.ndarray, sigma: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) pixel range covering [lo - 3 sigma, hi + 3 sigma], clipped to [0, size)."""
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
    a: np.ndarray,
    b: np.ndarray,
    value: np.ndarray,
    window_lo: np.ndarray,
    window_hi: np.ndarray,
    base: np.ndarray,
    person: np.ndarray,
    sigma: float,
) -> None:
    """Draw N Gaussian segments (a point when a == b) into `out` in place.

    out float32 [C, T, H, W]; a, b float32 [N, 2] (x, y); value float32 [N];
    window_lo / window_hi float32 [N, 2]: the box the window is grown from; base intp [N]: the
    flat offset of each item's (channel, frame) plane in `out`; person intp [N], non-decreasing.

    Pixels are enumerated as a ragged list: items -> rows of their window -> pixels of a row.
    Per-item and per-row constants reach the pixels with np.repeat (items are contiguous), which
    streams, instead of gathers by index, which do not.
    """
    h, w = out.shape[-2:]
    x0, x1 = _window(window_lo[:, 0], window_hi[:, 0], sigma, w)
    y0, y1 = _window(window_lo[:, 1], window_hi[:, 1], sigma, h)
    keep = (value >= EPS) & (x1 > x0) & (y1 > y0)
    if not keep.all():  # usually every item is drawn: skip the compaction then
        keep = np.flatnonzero(keep)
        if keep.size == 0:
            return
        a, b, value, base, person = a[keep], b[keep], value[keep], base[keep], person[keep]
        x0, x1, y0, y1 = x0[keep], x1[keep], y0[keep], y1[keep]
    ab = b - a
    d2_ab = (ab * ab).sum(-1)
    # Projection parameter t = (p - a).(b - a) / |ab|^2, clamped to [0, 1]: before a / after b
    # the nearest point of the segment is the endpoint. A segment shorter than 1 pixel is a
    # point at a (t = 0), as the definition says.
    inv = np.where(d2_ab >= 1, 1 / np.maximum(d2_ab, 1), 0).astype(np.float32)
    ab = ab * (d2_ab >= 1)[:, None]

    # items -> rows
    rows_per_item = y1 - y0
    n_rows = int(rows_per_item.sum())
    row_item_first = np.cumsum(rows_per_item) - rows_per_item
    row_y = np.repeat(y0 - row_item_first, rows_per_item) + np.arange(n_rows)
    dya = row_y.astype(np.float32) - np.repeat(a[:, 1], rows_per_item)
    aby_r = np.repeat(ab[:, 1], rows_per_item)
    abx_r = np.repeat(ab[:, 0], rows_per_item)
    tx_r = np.repeat(ab[:, 0] * inv, rows_per_item)
    ty_r = dya * aby_r * np.repeat(inv, rows_per_item)
    dxa0_r = np.repeat(x0.astype(np.float32) - a[:, 0], rows_per_item)
    value_r = np.repeat(value, rows_per_item)
    base_r = np.repeat(base + x0, rows_per_item) + row_y * w

    # rows -> pixels. A pixel's x offset inside its window is its index minus its row's first
    # index: built in float32 for the distances (exact: integers below 2^24) and folded into
    # the row's flat offset for the indices, so no int64 offset array is made.
    px_per_row = np.repeat(x1 - x0, rows_per_item)
    n_px = int(px_per_row.sum())
    row_first = np.cumsum(px_per_row) - px_per_row
    offset = _count(n_px, np.float32) - np.repeat(row_first.astype(np.float32), px_per_row)
    dxa = np.repeat(dxa0_r, px_per_row) + offset
    dy = np.repeat(dya, px_per_row)
    abx, aby = np.repeat(abx_r, px_per_row), np.repeat(aby_r, px_per_row)
    t = dxa * np.repeat(tx_r, px_per_row)
    t += np.repeat(ty_r, px_per_row)
    np.clip(t, 0, 1, out=t)
    ex = dxa - t * abx
    ey = dy - t * aby
    d2 = ex * ex
    d2 += ey * ey
    d2 *= np.float32(-0.5 / (sigma * sigma))
    values = np.exp(d2)
    values *= np.repeat(value_r, px_per_row)
    flat = np.repeat(base_r - row_first, px_per_row) + _count(n_px, np.intp)

    # A person's pixels start where its first item's first row does (items are grouped by person).
    px_first = np.append(row_first[row_item_first], n_px)  # [N + 1]
    _write_persons(out.reshape(-1), person,
                   lambda lo, hi: (flat[px_first[lo]:px_first[hi]], values[px_first[lo]:px_first[hi]]))


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
        mx, my, s, x0, x1, y0, y1 = mx[items], my[items], s[items], x0[items], x1[items], y0[items], y1[items]
    if items.size:
        width, height = x1 - x0, y1 - y0
        p = int(max(width.max(), height.max()))
        # Window pixels are laid out [P, P, N], items last: numpy's inner loops then run over
        # the N items instead of P = 5 pixels, which made [N, P, P] broadcasts 3-4x slower.
        steps = np.arange(p)[:, None]                # [P, 1]
        # The exponent in float64, then exp in float32: the same rounding as the peer's code, so
        # the heatmaps (and the trainings on them) stay bit for bit what they were.
        k = np.float32(-0.5 / (sigma * sigma))
        dx = (x0 + steps) - mx                       # [P, N] pixel - joint, float64
        dy = (y0 + steps) - my
        gx = np.exp(dx * dx * k, dtype=np.float32)
        gy = np.exp(dy * dy * k, dtype=np.float32) * s
        values = gy[:, None, :] * gx[None, :, :]     # [P (y), P (x), N]
        # Flat indices, separable too: (plane + row offset) + column. A row or column past the
        # window gets a sentinel >= the dummy slot, so one clip sends every pixel outside the
        # window there.
        person, frame, joint = np.unravel_index(items, (m, t, v))
        base = (joint * t + frame) * (h * w)
        rows = np.where(steps < height, base + (y0 + steps) * w, dummy)  # [P, N]
        cols = np.where(steps < width, x0 + steps, dummy)
        flat = rows[:, None, :] + cols[None, :, :]   # [P, P, N]
        np.minimum(flat, dummy, out=flat)
        _write_persons(out, person, lambda lo, hi: (flat[..., lo:hi].ravel(), values[..., lo:hi].ravel()))
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
    a_idx = np.array([a for a, _ in limbs])
    b_idx = np.array([b for _, b in limbs])
    # Items ordered (person, frame, limb).
    a = kp[:, :, a_idx].reshape(-1, 2)
    b = kp[:, :, b_idx].reshape(-1, 2)
    value = np.minimum(sc[:, :, a_idx], sc[:, :, b_idx]).ravel()
    point = ((b - a) ** 2).sum(-1) < 1  # a limb shorter than 1 pixel: window around a only
    lo = np.where(point[:, None], a, np.minimum(a, b))
    hi = np.where(point[:, None], a, np.maximum(a, b))
    person, frame, limb = (g.ravel() for g in np.indices((m, t, n_limbs), dtype=np.intp))
    _draw_segments(out, a, b, value, lo, hi, (limb * t + frame) * (h * w), person, sigma)
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
