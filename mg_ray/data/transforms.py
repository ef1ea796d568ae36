"""Spatial transforms applied identically to RGB frames and keypoints (math on arrays only).

Coordinates: keypoints are (x, y) pixel coordinates with pixel i centred at i. Boxes are in edge
coordinates, where pixel i covers [i, i + 1); a keypoint x lies at edge coordinate x + 0.5.
Every transform is an affine map of edge coordinates, which is what bilinear resizing with
`align_corners=False` does to the frames, so frames and keypoints stay aligned exactly:

    crop box [x0, x1) resized to S pixels:   u' = (u - x0) * S / (x1 - x0)
    horizontal flip of an S-wide image:       u' = S - u      (and left/right joints swap)
    heatmap at scale s = heatmap / S:        u' = u * s

The whole chain for one clip is: compact box around the person (padded 25 %, forced square) ->
in train mode a random resized crop inside it -> one crop + resize of the sampled frames ->
optional flip -> ImageNet normalisation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) edge coordinates


def compact_box(
    keypoint: np.ndarray,
    score: np.ndarray,
    img_hw: tuple[int, int],
    padding: float = 0.25,
    min_size: float = 10.0,
) -> Box | None:
    """Square box around every keypoint with score > 0 over the whole clip.

    keypoint [M, T, V, 2], score [M, T, V] (pixels of an image of size img_hw = (h, w)).
    The tight box is grown by `padding` (0.25: 25 % more width and height) and made square
    around its centre. If the square fits in the image it is shifted inside it (no padding
    needed); otherwise it stays centred and the frames get zero padding.
    Returns None when there is no person (no keypoint with score > 0, or a box smaller than
    `min_size` pixels, which is a detection glitch rather than a person).
    """
    h, w = img_hw
    visible = score > 0
    if not visible.any():
        return None
    pts = keypoint[visible] + 0.5  # [K, 2] edge coordinates
    lo, hi = pts.min(0), pts.max(0)
    if (hi - lo).max() < min_size:
        return None
    centre = (lo + hi) / 2
    side = float((hi - lo).max() * (1 + padding))
    cx, cy = float(centre[0]), float(centre[1])
    x0, y0 = cx - side / 2, cy - side / 2
    if side <= w:
        x0 = min(max(x0, 0.0), w - side)
    if side <= h:
        y0 = min(max(y0, 0.0), h - side)
    return (x0, y0, x0 + side, y0 + side)


def whole_frame_box(img_hw: tuple[int, int]) -> Box:
    h, w = img_hw
    return (0.0, 0.0, float(w), float(h))


def random_resized_box(
    box: Box,
    rng: np.random.Generator,
    area_range: tuple[float, float] = (0.56, 1.0),
    ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Box:
    """A random sub-box of `box` (torchvision RandomResizedCrop rule): area fraction uniform in
    `area_range`, aspect ratio (w / h) log-uniform in `ratio_range`; falls back to `box`."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
    for _ in range(attempts):
        area = bw * bh * rng.uniform(*area_range)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if cw <= bw and ch <= bh:
            cx0 = x0 + rng.uniform(0, bw - cw)
            cy0 = y0 + rng.uniform(0, bh - ch)
            return (cx0, cy0, cx0 + cw, cy0 + ch)
    return box


def integer_box(box: Box) -> tuple[int, int, int, int]:
    """Round a box to whole pixels (at least 1 x 1), so frames crop without resampling."""
    x0, y0 = math.floor(box[0] + 0.5), math.floor(box[1] + 0.5)
    x1 = max(math.floor(box[2] + 0.5), x0 + 1)
    y1 = max(math.floor(box[3] + 0.5), y0 + 1)
    return (x0, y0, x1, y1)


def crop_keypoints(keypoint: np.ndarray, box: Box, size: tuple[int, int]) -> np.ndarray:
    """Map keypoints [..., 2] into the crop `box` resized to size (H, W)."""
    x0, y0, x1, y1 = box
    scale = np.array([size[1] / (x1 - x0), size[0] / (y1 - y0)], np.float32)
    origin = np.array([x0, y0], np.float32)
    return ((keypoint + 0.5 - origin) * scale - 0.5).astype(np.float32)


def flip_keypoints(
    keypoint: np.ndarray, score: np.ndarray, width: int, permutation: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip of keypoints [M, T, V, 2] in a `width`-pixel image; left and right joints
    swap (permutation[j] = the joint that lands on j), so a left wrist stays a left wrist."""
    flipped = keypoint[:, :, permutation].copy()
    flipped[..., 0] = width - 1 - flipped[..., 0]
    return flipped, score[:, :, permutation]


def scale_keypoints(keypoint: np.ndarray, factor_xy: tuple[float, float]) -> np.ndarray:
    """Rescale keypoints [..., 2] between pixel frames (pixel-centre convention)."""
    f = np.array(factor_xy, np.float32)
    return ((keypoint + 0.5) * f - 0.5).astype(np.float32)


def crop_resize_frames(
    frames: np.ndarray, box: tuple[int, int, int, int], size: int, flip: bool = False
) -> torch.Tensor:
    """Crop integer `box` out of uint8 frames [T, H, W, 3] (zero padding outside the image),
    optionally flip it horizontally, and resize to size x size (bilinear, align_corners=False).
    Returns uint8 [T, 3, S, S] (normalised on the training device: `normalize`).

    The crop is resized while still uint8 (torch's uint8 bilinear kernel, in the frames' own
    channels-last order: several times cheaper than in float32, rounded to whole grey levels),
    and the item stays uint8: a quarter of float32's bytes between loader processes and to the
    GPU. The flip happens on the small uint8 crop (bilinear resizing commutes with a mirror).
    """
    t, h, w, _ = frames.shape
    x0, y0, x1, y1 = box
    inside = (max(x0, 0), max(y0, 0), min(x1, w), min(y1, h))
    if inside == (x0, y0, x1, y1):
        crop = torch.from_numpy(np.ascontiguousarray(frames[:, y0:y1, x0:x1]))
    else:
        crop = torch.zeros((t, y1 - y0, x1 - x0, 3), dtype=torch.uint8)
        ix0, iy0, ix1, iy1 = inside
        if ix1 > ix0 and iy1 > iy0:
            crop[:, iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = torch.from_numpy(
                frames[:, iy0:iy1, ix0:ix1]
            )
    if flip:
        crop = crop.flip(2)
    crop = crop.permute(0, 3, 1, 2)  # [T, 3, h, w], channels-last in memory
    if crop.shape[-2:] != (size, size):
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
    return crop.contiguous()


def normalize(rgb: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std over the channel axis (axis 1: [T, 3, H, W] or [N, 3, T, H, W]) of
    RGB in 0..255 (uint8 or float), as float32 on `rgb`'s device, in one pass:
    (x / 255 - mean) / std = x * (1 / (255 std)) - mean / std."""
    shape = (1, 3) + (1,) * (rgb.dim() - 2)
    std = torch.tensor(IMAGENET_STD, device=rgb.device).view(shape)
    scale = 1 / (255 * std)
    shift = -torch.tensor(IMAGENET_MEAN, device=rgb.device).view(shape) / std
    return torch.addcmul(shift, rgb.float(), scale)


def network_input(
    x: torch.Tensor | None,
    device: torch.device | str = "cpu",
    layout: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor | None:
    """A loader's tensor as the network takes it, on `device` in `layout`: uint8 RGB (the
    loader's items) is moved as uint8 and normalised there; float tensors (heatmaps, RGB that
    is normalised already) are moved as they are. None (a stream the model lacks) stays None.
    The training loop, its evaluation and the pyfunc all go through here."""
    if x is None:
        return None
    x = x.to(device, non_blocking=True)
    x = normalize(x) if x.dtype == torch.uint8 else x.float()
    return x.contiguous(memory_format=layout)
