"""The micro-gesture Dataset: one clip (video + skeleton) -> the two network inputs.

Per item: sample RGB and pose frame indices independently (sampling.py), decode only the sampled
RGB frames (video.py, a decord reader opened inside the call), compute the compact box around
the person, in train mode pick a random resized crop and a flip, crop+resize the frames and map
the keypoints through the same transform (transforms.py), then draw the pose heatmaps
(heatmaps.py). Item:

    "rgb"    float32 [3, T_rgb, S, S]      ImageNet-normalised
    "pose"   float32 [C, T_pose, s, s]     C = joints or limbs of the layout, s = heatmap size
    "label"  int64 scalar
    "index"  int                           position in the split (the sample actually returned)

In test mode with num_clips > 1, rgb and pose carry a leading clip axis: [num_clips, ...].
With `rgb=False` (a pose-only model) items have no "rgb" and no video is opened: the pose
stream trains without paying for decoding (about half of a small-preset item's time here,
and almost all of it on raw 1280x720 clips).

Bad input policy
----------------
- Annotation problems (missing keys, wrong shapes, NaN/inf keypoints, label out of range,
  unknown split members, a pickle naming code) are refused when the index loads
  (annotations.py), naming the file, the clip and the field: fix the data, nothing trains on it.
- Missing, corrupt or truncated video: `VideoError` naming the clip. In train mode with
  `skip_bad=True` (the default from DataConfig) the item is replaced by another random clip of
  the split, and `stats["bad_video"]` counts it (a run over thousands of clips should survive
  one broken file, and the count says it happened). Evaluation never skips: a test metric over
  a silently shrunken split would be wrong, so it raises.
  A pose-only dataset (`rgb=False`) never opens the videos, so it does not see them either.
- Video with fewer frames than requested: sampling loops over the clip (n < L).
- Video with fewer decodable frames than the annotation's total_frames: RGB indices are clamped
  to the last frame, `stats["clamped"]` counts it.
- No detected person (all scores 0): zero heatmaps and a whole-frame crop, `stats["no_person"]`
  counts it (this happens in real data and the RGB stream can still learn from it).

`stats` counters live in shared memory, so they add up over DataLoader workers.

Randomness: in train mode each DataLoader worker builds one `np.random.Generator` from torch's
per-worker seed (`get_worker_info().seed`, itself derived from torch's main seed), and keeps it
across epochs; in the main process the seed is `torch.initial_seed()`. Augmentation therefore
differs between workers and is reproducible under `torch.manual_seed`.

Skeleton files for `load_skeleton` (one clip, for `mg-ray predict`):
- `.npz` with `keypoint` float [M, T, V, 2] (or [T, V, 2] for one person), optional
  `keypoint_score` float [M, T, V] (default 1), optional `img_shape` (h, w);
- `.json` with the same keys as (nested) lists: {"keypoint": [...], "keypoint_score": [...],
  "img_shape": [h, w]}.
Keypoints are pixel (x, y) in the frame `img_shape` (default: the video's own size).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from mg_ray.data.annotations import Annotation, DatasetIndex, index_for
from mg_ray.data.config import DataConfig, pose_channels
from mg_ray.data.heatmaps import pose_heatmaps
from mg_ray.data.layouts import KeypointLayout
from mg_ray.data.sampling import sample_frames
from mg_ray.data.transforms import (
    compact_box,
    crop_keypoints,
    crop_resize_frames,
    flip_keypoints,
    integer_box,
    random_resized_box,
    scale_keypoints,
    whole_frame_box,
)
from mg_ray.data.video import VideoError, read_frames, video_size

STAT_KEYS = ("items", "bad_video", "clamped", "no_person")
MAX_SKIP_TRIES = 10


@dataclass
class ClipInputs:
    """The network inputs for one clip: rgb [clips, 3, T_rgb, S, S] (None when not asked for),
    pose [clips, C, T_pose, s, s] (clips = 1 in train mode), and what happened on the way."""

    rgb: torch.Tensor | None
    pose: torch.Tensor
    clamped: bool = False
    no_person: bool = False


@dataclass
class PipelineParams:
    """Plain values of the per-clip pipeline. `from_config` is the one place a `DataConfig` (or
    the data settings saved in a model file) becomes these: training, evaluation and prediction
    all build their pipeline through it."""

    rgb_frames: int = 8
    pose_frames: int = 32
    rgb_size: int = 224
    heatmap_size: int = 56
    sigma: float = 0.7
    limbs: Sequence[tuple[int, int]] | None = None  # None: joint heatmaps
    flip_permutation: Sequence[int] | None = None  # None: no flips
    crop_padding: float = 0.25
    flip_prob: float = 0.5
    rrc_area: tuple[float, float] = (0.56, 1.0)
    rrc_ratio: tuple[float, float] = (0.75, 4 / 3)

    @classmethod
    def from_config(cls, cfg: DataConfig, layout: KeypointLayout) -> PipelineParams:
        """The pipeline `cfg` describes for clips of keypoint layout `layout`."""
        return cls(
            rgb_frames=cfg.rgb_frames,
            pose_frames=cfg.pose_frames,
            rgb_size=cfg.rgb_size,
            heatmap_size=cfg.heatmap_size,
            sigma=cfg.sigma,
            limbs=list(layout.limbs) if cfg.heatmap == "limbs" else None,
            flip_permutation=layout.flip_permutation(),
            crop_padding=cfg.crop_padding,
            flip_prob=cfg.flip_prob,
            rrc_area=tuple(cfg.rrc_area),
            rrc_ratio=tuple(cfg.rrc_ratio),
        )

    @property
    def heatmap(self) -> str:
        return "joints" if self.limbs is None else "limbs"


def clip_inputs(
    video_path: str | Path,
    keypoint: np.ndarray,
    keypoint_score: np.ndarray,
    img_shape: tuple[int, int] | None,
    params: PipelineParams,
    mode: str = "test",
    num_clips: int = 1,
    rng: np.random.Generator | None = None,
    rgb: bool = True,
) -> ClipInputs:
    """Network inputs for one clip, usable without a dataset (e.g. by `mg-ray predict`).

    keypoint float [M, T, V, 2] pixels of `img_shape` (h, w) (None: the video's size);
    keypoint_score float [M, T, V]. mode "train": one random clip with augmentation (needs
    `rng`); mode "test": `num_clips` deterministic clips, no augmentation.
    Returns rgb uint8 [num_clips, 3, T_rgb, S, S] (0..255; `transforms.network_input` normalises
    it on the device the network runs on) and pose float32 [num_clips, C, T_pose, s, s].

    rgb=False (a pose-only model): no frame is decoded and rgb is None. The crop is then taken
    in the img_shape frame; with `img_shape` None, or equal to the video's size, the pose is
    exactly what rgb=True gives (the same random draws are made).
    """
    if mode == "train":
        num_clips = 1
        if rng is None:
            raise ValueError("train mode needs an explicit np.random.Generator")
    total = keypoint.shape[1]
    pose_idx = sample_frames(total, params.pose_frames, mode, num_clips, rng)  # [k, Tp]
    rgb_idx = sample_frames(total, params.rgb_frames, mode, num_clips, rng)  # [k, Tr]
    if rgb:
        decoded = read_frames(video_path, rgb_idx.reshape(-1), expected_frames=total)
        frames = decoded.frames.reshape(num_clips, params.rgb_frames, *decoded.frames.shape[1:])
        vh, vw = frames.shape[2:4]
        clamped = decoded.clamped
    else:
        vh, vw = img_shape if img_shape is not None else video_size(video_path)
        clamped = False

    # Keypoints are in the img_shape frame; the video may have been resized (prepared clips).
    kp = keypoint
    if img_shape is not None and tuple(img_shape) != (vh, vw):
        kp = scale_keypoints(kp, (vw / img_shape[1], vh / img_shape[0]))
    box = compact_box(kp, keypoint_score, (vh, vw), params.crop_padding)
    no_person = box is None
    if box is None:
        box = whole_frame_box((vh, vw))

    size, hm = params.rgb_size, params.heatmap_size
    rgb_out, pose_out = [], []
    for clip in range(num_clips):
        clip_box, flip = box, False
        if mode == "train":
            clip_box = random_resized_box(box, rng, params.rrc_area, params.rrc_ratio)
            flip = params.flip_permutation is not None and rng.uniform() < params.flip_prob
        ibox = integer_box(clip_box)

        if rgb:
            clip_rgb = crop_resize_frames(frames[clip], ibox, size, flip)  # uint8 [Tr, 3, S, S]
            rgb_out.append(clip_rgb.permute(1, 0, 2, 3))  # [3, Tr, S, S]

        sel = pose_idx[clip]
        ckp = crop_keypoints(kp[:, sel], ibox, (size, size))  # [M, Tp, V, 2] in the S x S crop
        csc = keypoint_score[:, sel]
        if flip:
            ckp, csc = flip_keypoints(ckp, csc, size, list(params.flip_permutation))
        hkp = scale_keypoints(ckp, (hm / size, hm / size))
        heat = pose_heatmaps(hkp, csc, (hm, hm), params.sigma, params.limbs)  # [C, Tp, s, s]
        pose_out.append(torch.from_numpy(heat))

    def stack(clips: list[torch.Tensor]) -> torch.Tensor:
        return clips[0][None] if num_clips == 1 else torch.stack(clips)  # no copy for one clip

    return ClipInputs(stack(rgb_out) if rgb else None, stack(pose_out), clamped, no_person)


class MicroGestureDataset(Dataset):
    """Clips of one split of a `DatasetIndex` as network inputs (see the module docstring)."""

    def __init__(
        self,
        index: DatasetIndex,
        split: str,
        mode: str = "train",
        *,
        params: PipelineParams,
        num_clips: int = 1,
        skip_bad: bool = False,
        rgb: bool = True,
    ) -> None:
        if mode not in ("train", "test"):
            raise ValueError(f"mode: expected 'train' or 'test', got {mode!r}")
        self.index = index
        self.split = split
        self.annotations: list[Annotation] = index.split(split)
        self.mode = mode
        self.num_clips = 1 if mode == "train" else num_clips
        self.layout = index.layout
        self.pose_channels = pose_channels(index.layout, params.heatmap)
        self.params = params
        self.skip_bad = skip_bad and mode == "train"
        self.rgb = rgb  # False: items carry no "rgb" and no video is read (a pose-only model)
        # Shared counters: DataLoader workers are child processes; these add up across them.
        self._stats = multiprocessing.Array("q", len(STAT_KEYS))
        self._rng: np.random.Generator | None = None
        self._rng_owner: tuple[int, int] | None = None

    # ---- metadata ----------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self.index.class_names)

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    @property
    def labels(self) -> np.ndarray:
        return np.array([a.label for a in self.annotations], dtype=np.int64)

    def clip_name(self, i: int) -> str:
        return self.annotations[i].frame_dir

    @property
    def stats(self) -> dict[str, int]:
        with self._stats.get_lock():
            return dict(zip(STAT_KEYS, self._stats[:]))

    def _count(self, key: str) -> None:
        with self._stats.get_lock():
            self._stats[STAT_KEYS.index(key)] += 1

    def __len__(self) -> int:
        return len(self.annotations)

    # ---- items -------------------------------------------------------------------------------
    def rng(self) -> np.random.Generator:
        """This process's generator, seeded from torch's per-worker seed on first use."""
        info = get_worker_info()
        owner = (os.getpid(), info.id if info is not None else -1)
        if self._rng is None or self._rng_owner != owner:
            seed = info.seed if info is not None else torch.initial_seed()
            self._rng = np.random.default_rng(seed % 2**63)
            self._rng_owner = owner
        return self._rng

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = self.rng() if self.mode == "train" else None
        tries = 0
        while True:
            ann = self.annotations[i]
            try:
                inputs = clip_inputs(
                    self.index.video_path(ann.frame_dir),
                    ann.keypoint,
                    ann.keypoint_score,
                    ann.img_shape,
                    self.params,
                    self.mode,
                    self.num_clips,
                    rng,
                    rgb=self.rgb,
                )
                break
            except VideoError as err:
                if not self.skip_bad or tries >= MAX_SKIP_TRIES:
                    raise VideoError(f"clip {ann.frame_dir!r} ({self.split}): {err}") from None
                self._count("bad_video")
                tries += 1
                i = int(rng.integers(len(self.annotations)))
        self._count("items")
        if inputs.clamped:
            self._count("clamped")
        if inputs.no_person:
            self._count("no_person")
        item = {"rgb": inputs.rgb, "pose": inputs.pose} if self.rgb else {"pose": inputs.pose}
        if self.num_clips == 1:
            item = {key: value[0] for key, value in item.items()}
        return {**item, "label": torch.tensor(ann.label, dtype=torch.int64), "index": i}


def build_dataset(
    cfg: DataConfig,
    split: str,
    mode: str,
    num_clips: int | None = None,
    rgb: bool = True,
    index: DatasetIndex | None = None,
) -> MicroGestureDataset:
    """The dataset of split `split` described by `cfg` (mode "train" or "test"; test clips
    default to cfg.test_clips; rgb=False: pose only, no video decoded). `index`: the dataset's
    index when the caller has it loaded already (`index_for(cfg)`; its arrays may be read-only,
    as when they come from Ray's object store); else it is loaded here."""
    index = index if index is not None else index_for(cfg)
    return MicroGestureDataset(
        index,
        split,
        mode,
        params=PipelineParams.from_config(cfg, index.layout),
        num_clips=num_clips if num_clips is not None else (cfg.test_clips if mode == "test" else 1),
        skip_bad=cfg.skip_bad,
        rgb=rgb,
    )


# ---------------------------------------------------------------------------------------------
# one clip's skeleton file (for predict)


class SkeletonError(ValueError):
    """A clip's skeleton file is unreadable or does not fit; the message names the file."""


def load_skeleton(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None]:
    """Read one clip's skeleton (`.npz` or `.json`, format in the module docstring).

    Returns keypoint float32 [M, T, V, 2], keypoint_score float32 [M, T, V], img_shape or None.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: skeleton file not found")
    if path.suffix not in (".npz", ".json"):
        raise SkeletonError(f"{path}: expected a .npz or .json skeleton file")
    return parse_skeleton(path.read_bytes(), str(path))


def parse_skeleton(
    content: bytes, where: str
) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None]:
    """`load_skeleton` of a skeleton file's bytes (`.npz` or `.json`, told apart by their first
    bytes: a zip archive or a JSON object). `where` names the clip in errors."""
    if content[:2] == b"PK":  # .npz: a zip archive
        try:
            with np.load(io.BytesIO(content), allow_pickle=False) as data:
                raw = {k: data[k] for k in data.files}
        except (OSError, ValueError) as err:  # truncated, or object arrays (refused)
            raise SkeletonError(
                f"{where}: not a readable .npz skeleton ({str(err).splitlines()[0]})"
            ) from None
    elif content.lstrip()[:1] == b"{":
        try:
            raw = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SkeletonError(f"{where}: not valid JSON: {err}") from None
    else:
        raise SkeletonError(
            f"{where}: not a skeleton file (expected a .npz archive or a JSON object"
            f"{', got 0 bytes' if not content else ''})"
        )
    return skeleton_arrays(raw, where)


def skeleton_arrays(raw: Any, where: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None]:
    """Check and convert a skeleton's fields (`keypoint`, optional `keypoint_score` and
    `img_shape`, as arrays or nested lists) to (keypoint, keypoint_score, img_shape)."""
    if not isinstance(raw, dict):
        raise SkeletonError(f"{where}: expected a skeleton object with a 'keypoint' key")
    if "keypoint" not in raw:
        raise SkeletonError(f"{where}: keypoint: missing key")
    try:
        kp = np.asarray(raw["keypoint"], dtype=np.float32)
    except (TypeError, ValueError):
        raise SkeletonError(f"{where}: keypoint: expected numbers of shape [M, T, V, 2]") from None
    if kp.ndim == 3:
        kp = kp[None]
    if kp.ndim != 4 or kp.shape[-1] != 2:
        raise SkeletonError(
            f"{where}: keypoint: expected shape [M, T, V, 2] or [T, V, 2], got {list(kp.shape)}"
        )
    if min(kp.shape[:3]) == 0:
        raise SkeletonError(
            f"{where}: keypoint: an empty clip (shape {list(kp.shape)}; expected at least one "
            "person, frame and joint)"
        )
    score = raw.get("keypoint_score")
    try:
        score = np.asarray(np.ones(kp.shape[:3]) if score is None else score, dtype=np.float32)
    except (TypeError, ValueError):
        raise SkeletonError(f"{where}: keypoint_score: expected numbers") from None
    if score.ndim == 2:
        score = score[None]
    if score.shape != kp.shape[:3]:
        raise SkeletonError(
            f"{where}: keypoint_score: expected shape {list(kp.shape[:3])}, got {list(score.shape)}"
        )
    if not (np.isfinite(kp).all() and np.isfinite(score).all()):
        raise SkeletonError(f"{where}: keypoint: contains NaN/inf")
    img_shape = raw.get("img_shape")
    if img_shape is not None:
        img_shape = tuple(int(v) for v in np.asarray(img_shape).tolist())
        if len(img_shape) != 2 or min(img_shape) <= 0:
            raise SkeletonError(f"{where}: img_shape: expected (height, width), got {img_shape}")
    return kp, score, img_shape
