"""Uniform frame sampling as PoseConv3D's UniformSampleFrames (docs/data.md).

For a clip of n frames and clip length L:

- n < L: a run of L consecutive indices looped over the clip (index mod n) from a start
  (random in training; clip i of k starts at i, or at i * n // k when n >= k, in test);
- L <= n < 2L: 0..L-1 plus a +1 offset inserted at n - L random places, spreading them;
- n >= 2L: L equal bins (bin edges i * n // L), one random index per bin.

Test mode is deterministic: its "random" choices come from a generator with a fixed seed, so
the same clip always yields the same indices (and distinct test clips differ). RGB and pose
indices are drawn by separate calls, i.e. independently.
"""

from __future__ import annotations

import numpy as np

TEST_SEED = 255  # as the peer: test clips are drawn from a fixed-seed generator


def _one_clip(num_frames: int, clip_len: int, rng: np.random.Generator, start: int) -> np.ndarray:
    if num_frames < clip_len:
        return np.arange(start, start + clip_len) % num_frames
    if num_frames < 2 * clip_len:
        # n - L of the L + 1 gaps get an extra frame: indices stay sorted and distinct.
        bumps = np.zeros(clip_len + 1, dtype=np.int64)
        bumps[rng.choice(clip_len + 1, num_frames - clip_len, replace=False)] = 1
        return np.arange(clip_len) + np.cumsum(bumps)[:-1]
    edges = np.arange(clip_len + 1) * num_frames // clip_len
    return edges[:-1] + rng.integers(0, np.diff(edges))


def sample_frames(
    num_frames: int,
    clip_len: int,
    mode: str = "train",
    num_clips: int = 1,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Frame indices for `num_clips` clips of `clip_len` frames out of `num_frames`.

    mode "train": random, drawn from `rng` (required); mode "test": deterministic.
    Returns int64 [num_clips, clip_len], every index in [0, num_frames).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
    if clip_len < 1 or num_clips < 1:
        raise ValueError(f"clip_len and num_clips: expected >= 1, got {clip_len}, {num_clips}")
    if mode == "train":
        if rng is None:
            raise ValueError("train-mode sampling needs an explicit np.random.Generator")
        starts = [int(rng.integers(0, num_frames)) for _ in range(num_clips)]
    elif mode == "test":
        rng = np.random.default_rng(TEST_SEED)
        starts = [
            i if num_frames < num_clips else i * num_frames // num_clips for i in range(num_clips)
        ]
    else:
        raise ValueError(f"mode: expected 'train' or 'test', got {mode!r}")
    clips = [_one_clip(num_frames, clip_len, rng, start) for start in starts]
    return np.stack(clips).astype(np.int64)
