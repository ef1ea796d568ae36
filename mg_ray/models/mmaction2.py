"""mmaction2 checkpoints onto MicroGestureNet: the key mapping and its checks.

Two kinds of mmaction2 1.x checkpoint are understood (their key names and shapes, generated from
mmaction2's own source, are what the tests check against; docs/mmaction2.md):

- RGBPoseConv3D (backbone `rgb_path` / `pose_path` + RGBPoseHead `fc_rgb` / `fc_pose`) onto the
  two-stream model;
- PoseConv3D (a ResNet3dSlowOnly keypoint backbone + I3DHead `fc_cls`) onto the pose stream.

The mapping, mmaction2 -> mg-ray (`<p>` is `rgb` or `pose`, `<s>` the stream's pathway):

    backbone.<p>_path.conv1.conv / .bn                 backbone.<s>.stem.0 / .stem.1
    backbone.<p>_path.layerN.B.convJ.conv / .bn        backbone.<s>.stages.{N-1}.B.convJ / .bnJ
    backbone.<p>_path.layerN.B.downsample.conv / .bn   backbone.<s>.stages.{N-1}.B.downsample.0 / .1
    backbone.rgb_path.layer{2,3}_lateral.conv          backbone.pose_to_rgb.{0,1}
    backbone.pose_path.layer{1,2}_lateral.conv / .bn   backbone.rgb_to_pose.{0,1}.conv / .bn
    cls_head.fc_rgb / cls_head.fc_pose                 heads.rgb.fc / heads.pose.fc
    (PoseConv3D) backbone.conv1, backbone.layerN       as pose_path's
    (PoseConv3D) cls_head.fc_cls                       heads.pose.fc

What mmaction2 does not have stays at mg-ray's init: the cross-modal fusion (its gates start at
zero, so the imported backbone computes mmaction2's) and each head's embedding for the
prototype loss. Every tensor of the checkpoint is used exactly once; anything missing, left over
or of another shape is an error that names it.
"""

from __future__ import annotations

import re

import torch

from mg_ray.models.net import few

RGBPOSE, POSEC3D = "RGBPoseConv3D", "PoseConv3D"

_LAYER = r"layer(\d+)\.(\d+)\."


def _backbone_rule(prefix: str, stream: str) -> list[tuple[re.Pattern[str], object]]:
    """Rules for one ResNet3d pathway whose mmaction2 keys start with `prefix`."""
    p = re.escape(prefix)

    def stage(m: re.Match[str]) -> str:
        return f"backbone.{stream}.stages.{int(m[1]) - 1}.{m[2]}."

    return [
        (re.compile(rf"{p}conv1\.conv\.(\w+)$"), lambda m: f"backbone.{stream}.stem.0.{m[1]}"),
        (re.compile(rf"{p}conv1\.bn\.(\w+)$"), lambda m: f"backbone.{stream}.stem.1.{m[1]}"),
        (
            re.compile(rf"{p}{_LAYER}conv(\d)\.conv\.(\w+)$"),
            lambda m: f"{stage(m)}conv{m[3]}.{m[4]}",
        ),
        (re.compile(rf"{p}{_LAYER}conv(\d)\.bn\.(\w+)$"), lambda m: f"{stage(m)}bn{m[3]}.{m[4]}"),
        (
            re.compile(rf"{p}{_LAYER}downsample\.conv\.(\w+)$"),
            lambda m: f"{stage(m)}downsample.0.{m[3]}",
        ),
        (
            re.compile(rf"{p}{_LAYER}downsample\.bn\.(\w+)$"),
            lambda m: f"{stage(m)}downsample.1.{m[3]}",
        ),
    ]


_RULES = {
    RGBPOSE: [
        *_backbone_rule("backbone.rgb_path.", "rgb"),
        *_backbone_rule("backbone.pose_path.", "pose"),
        # the lateral on rgb_path reads pose features (into RGB layer N+1); pose_path's read RGB
        (
            re.compile(r"backbone\.rgb_path\.layer([23])_lateral\.conv\.(\w+)$"),
            lambda m: f"backbone.pose_to_rgb.{int(m[1]) - 2}.{m[2]}",
        ),
        (
            re.compile(r"backbone\.pose_path\.layer([12])_lateral\.(conv|bn)\.(\w+)$"),
            lambda m: f"backbone.rgb_to_pose.{int(m[1]) - 1}.{m[2]}.{m[3]}",
        ),
        (
            re.compile(r"cls_head\.fc_(rgb|pose)\.(weight|bias)$"),
            lambda m: f"heads.{m[1]}.fc.{m[2]}",
        ),
    ],
    POSEC3D: [
        *_backbone_rule("backbone.", "pose"),
        (re.compile(r"cls_head\.fc_cls\.(weight|bias)$"), lambda m: f"heads.pose.fc.{m[1]}"),
    ],
}

# mg-ray keys mmaction2 has no counterpart for: they keep the target model's init
_OWN = ("backbone.fusion.", "heads.rgb.embed.", "heads.pose.embed.")


class CheckpointImportError(ValueError):
    """An mmaction2 checkpoint that does not fit the model; the message names the keys."""


def checkpoint_state(content: object, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded mmaction2 checkpoint (its `state_dict`, or the dict itself)."""
    state = content.get("state_dict", content) if isinstance(content, dict) else None
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise CheckpointImportError(
            f"{source}: expected an mmaction2 checkpoint (a dict with a 'state_dict' of "
            f"tensors), got {type(content).__name__}"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def checkpoint_kind(state: dict[str, torch.Tensor], source: str) -> str:
    """RGBPOSE or POSEC3D, from the backbone's key names."""
    if any(k.startswith("backbone.rgb_path.") for k in state):
        return RGBPOSE
    if "backbone.conv1.conv.weight" in state:
        return POSEC3D
    raise CheckpointImportError(
        f"{source}: neither an RGBPoseConv3D checkpoint (keys backbone.rgb_path.*) nor a PoseConv3D one "
        f"(key backbone.conv1.conv.weight); first keys: {sorted(state)[:3]}"
    )


def head_shape(state: dict[str, torch.Tensor], kind: str) -> tuple[int, dict[str, int]]:
    """(number of classes, stream -> input channel count) read from the checkpoint's input and head
    layers: what the model to build must have."""
    heads = (
        {"rgb": "cls_head.fc_rgb.weight", "pose": "cls_head.fc_pose.weight"}
        if kind == RGBPOSE
        else {"pose": "cls_head.fc_cls.weight"}
    )
    missing = [key for key in heads.values() if key not in state]
    if missing:
        raise CheckpointImportError(f"{kind} checkpoint: missing head keys {missing}")
    classes = {key: state[key].shape[0] for key in heads.values()}
    if len(set(classes.values())) != 1:
        raise CheckpointImportError(
            f"{kind} checkpoint: the heads disagree on the class count: {classes}"
        )
    stem = (
        "backbone.pose_path.conv1.conv.weight" if kind == RGBPOSE else "backbone.conv1.conv.weight"
    )
    if stem not in state:
        raise CheckpointImportError(f"{kind} checkpoint: missing key {stem}")
    return next(iter(classes.values())), {"pose": int(state[stem].shape[1])}


def map_mmaction2_state(
    state: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    *,
    kind: str,
    reinit_head: bool = False,
) -> dict[str, torch.Tensor]:
    """A full state dict for the model whose `state_dict()` is `target`: every mmaction2 tensor put
    at its mg-ray key, the rest (fusion, embeddings; the classifiers when `reinit_head`) from
    `target`. Raises CheckpointImportError naming every unmapped, duplicated, missing or mis-shaped
    tensor, and a head whose class count differs from the target's unless `reinit_head`."""
    rules = _RULES[kind]
    mapped: dict[str, str] = {}  # mg-ray key -> mmaction2 key
    unmapped, twice = [], []
    for theirs in state:
        ours = next((rule(m) for pattern, rule in rules if (m := pattern.match(theirs))), None)
        if ours is None:
            unmapped.append(theirs)
        elif ours in mapped:
            twice.append(f"{theirs} and {mapped[ours]} -> {ours}")
        else:
            mapped[ours] = theirs
    problems = []
    if unmapped:
        problems.append(f"tensors with no place in the model: {few(unmapped)}")
    if twice:
        problems.append(f"tensors mapped twice: {few(twice)}")
    unknown = [f"{mapped[k]} -> {k}" for k in mapped if k not in target]
    if unknown:
        problems.append(f"tensors whose mg-ray key the model lacks: {few(unknown)}")
    streams = ("pose",) if kind == POSEC3D else ("rgb", "pose")
    wanted = [
        k
        for k in target
        if not k.startswith(_OWN) and k.split(".")[1] in (*streams, "pose_to_rgb", "rgb_to_pose")
    ]
    missing = [k for k in wanted if k not in mapped]
    if missing:
        problems.append(f"the checkpoint lacks tensors for {few(missing)}")
    merged = {k: v.clone() for k, v in target.items()}
    for ours, theirs in mapped.items():
        if ours not in target:
            continue
        value, expected = state[theirs], target[ours]
        is_classifier = ours.startswith("heads.") and ours.endswith((".fc.weight", ".fc.bias"))
        if is_classifier and reinit_head:
            continue  # used, deliberately: the classifier starts afresh
        if value.shape == expected.shape:
            merged[ours] = value.detach().clone().to(expected.dtype)
        elif is_classifier and value.shape[1:] == expected.shape[1:]:
            problems.append(
                f"{theirs} has {value.shape[0]} classes, the model {expected.shape[0]} "
                f"(re-initialise the classifier to import the rest: reinit_head / --reinit-head)"
            )
        else:
            problems.append(
                f"{theirs} has shape {list(value.shape)}, {ours} needs {list(expected.shape)}"
            )
    if problems:
        raise CheckpointImportError(
            f"{kind} checkpoint does not fit the model: " + "; ".join(problems[:8])
        )
    return merged
