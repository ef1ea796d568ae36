"""`DataConfig`: where the dataset lives and how a clip becomes the two network inputs.

Defaults are the paper's values (8 x 224^2 RGB frames, 32 x 56^2 pose heatmaps, sigma 0.7,
10 test clips). Unpack it where it enters (`build_dataset`); everything further in takes plain
values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mg_ray import paths
from mg_ray.config import ConfigError, check
from mg_ray.data.layouts import LAYOUTS, KeypointLayout


@dataclass
class DataConfig:
    # Dataset folder (annotations.pkl, videos/, classes.txt, optional dataset.json).
    root: Path = field(default_factory=paths.synthetic_dataset)
    annotation_file: str = "annotations.pkl"
    video_dir: str = "videos"
    video_ext: str = ".mp4"
    # Split names inside annotations.pkl (real iMiGUE conversions use e.g. "xsub_train").
    train_split: str = "train"
    val_split: str = "val"
    test_split: str | None = "test"  # None: no final multi-clip test
    # Keypoint layout; None: the one named in dataset.json, else coco17.
    layout: str | None = None

    # Sampling (docs/data.md): RGB and pose indices drawn independently.
    rgb_frames: int = 8
    pose_frames: int = 32
    test_clips: int = 10

    # Spatial sizes: heatmaps at 1/4 of the RGB crop, which the model's lateral connections need.
    rgb_size: int = 224
    heatmap_size: int = 56
    allow_any_heatmap_size: bool = False

    # Heatmaps (docs/data.md).
    heatmap: Literal["joints", "limbs"] = "joints"
    sigma: float = 0.7

    # Augmentation (train mode only).
    crop_padding: float = 0.25  # compact crop: box around the person padded by 25 %
    flip_prob: float = 0.5
    rrc_area: tuple[float, float] = (0.56, 1.0)  # random resized crop: area fraction range
    rrc_ratio: tuple[float, float] = (0.75, 1.3333333333333333)  # aspect ratio range

    # Loader.
    num_workers: int = 2
    skip_bad: bool = True  # train mode: replace unreadable clips by another one and count them

    def validate(self) -> None:
        check(self.rgb_frames >= 1, "rgb_frames", "an integer >= 1", self.rgb_frames)
        check(self.pose_frames >= 1, "pose_frames", "an integer >= 1", self.pose_frames)
        check(self.test_clips >= 1, "test_clips", "an integer >= 1", self.test_clips)
        check(self.rgb_size >= 8, "rgb_size", "an integer >= 8", self.rgb_size)
        check(self.heatmap_size >= 4, "heatmap_size", "an integer >= 4", self.heatmap_size)
        if not self.allow_any_heatmap_size and self.heatmap_size * 4 != self.rgb_size:
            raise ConfigError(
                f"heatmap_size: expected rgb_size / 4 = {self.rgb_size / 4:g} (the model's lateral "
                f"connections need a 4:1 spatial ratio; set allow_any_heatmap_size: true to "
                f"override), got {self.heatmap_size}"
            )
        check(self.sigma > 0, "sigma", "a number > 0", self.sigma)
        check(
            self.layout is None or self.layout in LAYOUTS,
            "layout",
            f"null or one of {', '.join(LAYOUTS)}",
            self.layout,
        )
        check(0 <= self.crop_padding <= 2, "crop_padding", "a number in [0, 2]", self.crop_padding)
        check(0 <= self.flip_prob <= 1, "flip_prob", "a number in [0, 1]", self.flip_prob)
        lo, hi = self.rrc_area
        check(0 < lo <= hi <= 1, "rrc_area", "two numbers 0 < low <= high <= 1", self.rrc_area)
        lo, hi = self.rrc_ratio
        check(0 < lo <= hi, "rrc_ratio", "two numbers 0 < low <= high", self.rrc_ratio)
        check(self.num_workers >= 0, "num_workers", "an integer >= 0", self.num_workers)
        check(bool(self.train_split), "train_split", "a split name", self.train_split)
        check(bool(self.val_split), "val_split", "a split name", self.val_split)
        check(
            self.video_ext.startswith("."),
            "video_ext",
            "an extension starting with '.'",
            self.video_ext,
        )

    def index_source(self) -> tuple[str, str | None, str, str, str]:
        """The settings a dataset index is loaded from (`annotations.index_for`): configs with the
        same source share one index, however their sampling or augmentation differs."""
        return (str(self.root), self.layout, self.annotation_file, self.video_dir, self.video_ext)

    def pose_channels(self, layout: KeypointLayout) -> int:
        """Channels of the pose input: one per joint, or one per limb."""
        return pose_channels(layout, self.heatmap)


def pose_channels(layout: KeypointLayout, heatmap: str) -> int:
    """Channels of the pose input for `layout` and heatmap kind "joints" or "limbs"."""
    if heatmap == "joints":
        return layout.num_joints
    if heatmap == "limbs":
        return layout.num_limbs
    raise ValueError(f"heatmap: expected 'joints' or 'limbs', got {heatmap!r}")
