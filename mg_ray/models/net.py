"""MicroGestureNet: two-pathway backbone + one head per stream; probability fusion; builders;
the merge of single-stream checkpoints into a two-stream initialisation (paper section 3.2).

Parameter names are shared between variants: `backbone.rgb.*` / `heads.rgb.*` for the RGB
stream, `backbone.pose.*` / `heads.pose.*` for the pose stream, whatever the modality; the
two-stream-only parts are `backbone.pose_to_rgb.*`, `backbone.rgb_to_pose.*` (laterals) and
`backbone.fusion.*`.
"""

from __future__ import annotations

import torch
from torch import nn

from mg_ray.models.prototype import STREAMS
from mg_ray.models.rgbpose import RGBPoseBackbone, check_frame_counts, check_input_sizes


class StreamHead(nn.Module):
    """Feature [N, C, T, H, W] -> global average pool -> dropout -> linear: logits [N, K], as
    mmaction2's head; and global `embed_pool` pool -> linear: embedding [N, D] for the prototype
    loss ("avg", the default, shares the classifier's pooling; "max" is what the paper and PCAN
    pool before their embedding: `ModelConfig.embed_pool` says why the default differs). The embedding is taken before dropout, whose noise the loss's cosine scores should
    not see, and left unnormalised: the loss normalises it (`PrototypeRefinementLoss`)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        embed_dim: int,
        dropout: float,
        embed_pool: str = "avg",
    ) -> None:
        super().__init__()
        if embed_pool not in ("max", "avg"):
            raise ValueError(f"embed_pool: expected 'max' or 'avg', got {embed_pool!r}")
        self.embed_pool = embed_pool
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)
        self.embed = nn.Linear(in_channels, embed_dim)
        nn.init.normal_(self.fc.weight, std=0.01)  # mmaction2's classifier init
        nn.init.zeros_(self.fc.bias)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = feature.mean(dim=(2, 3, 4))
        embed_in = feature.amax(dim=(2, 3, 4)) if self.embed_pool == "max" else pooled
        return self.fc(self.dropout(pooled)), self.embed(embed_in)


class MicroGestureNet(nn.Module):
    """forward(rgb [N, 3, T_rgb, S, S], pose [N, C_pose, T_pose, S/4, S/4]) -> dict with
    "<s>_logits" [N, K] and "<s>_embedding" [N, embed_dim] (unnormalised) for each stream s the
    modality has.
    Single-stream variants ignore (and accept None for) the other input."""

    def __init__(
        self,
        num_classes: int,
        *,
        modality: str = "rgbpose",
        rgb_frames: int = 8,
        pose_frames: int = 32,
        pose_channels: int = 17,
        fusion: bool = True,
        embed_dim: int = 256,
        dropout: float = 0.5,
        embed_pool: str = "avg",
        stream_weights: tuple[float, float] = (1.0, 1.0),
        rgb_base_channels: int = 64,
        rgb_blocks: tuple[int, int, int, int] = (3, 4, 6, 3),
        pose_base_channels: int = 32,
        pose_blocks: tuple[int, int, int] = (4, 6, 3),
        rgb_lateral_reduction: int = 16,
        fusion_reduction: int = 4,
        fusion_heads: int = 8,
        fusion_dropout: float = 0.1,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.modality = modality
        self.stream_weights = tuple(stream_weights)
        self.backbone = RGBPoseBackbone(
            modality=modality,
            rgb_frames=rgb_frames,
            pose_frames=pose_frames,
            pose_channels=pose_channels,
            fusion=fusion,
            rgb_base_channels=rgb_base_channels,
            rgb_blocks=rgb_blocks,
            pose_base_channels=pose_base_channels,
            pose_blocks=pose_blocks,
            rgb_lateral_reduction=rgb_lateral_reduction,
            fusion_reduction=fusion_reduction,
            fusion_heads=fusion_heads,
            fusion_dropout=fusion_dropout,
            zero_init_residual=zero_init_residual,
        )
        self.streams = modality_streams(modality)
        widths = {"rgb": self.backbone.rgb_channels, "pose": self.backbone.pose_channels}
        self.heads = nn.ModuleDict(
            {
                s: StreamHead(widths[s], num_classes, embed_dim, dropout, embed_pool)
                for s in self.streams
            }
        )

    def forward_features(
        self, rgb: torch.Tensor | None, pose: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Backbone feature maps per stream: {"rgb": [N, C_rgb, T_rgb, h, w], "pose": ...}."""
        x_rgb, x_pose = self.backbone(rgb, pose)
        features = {"rgb": x_rgb, "pose": x_pose}
        return {s: features[s] for s in self.streams}

    def forward_head(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}
        for s in self.streams:
            outputs[f"{s}_logits"], outputs[f"{s}_embedding"] = self.heads[s](features[s])
        return outputs

    def forward(
        self, rgb: torch.Tensor | None, pose: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(rgb, pose))


def modality_streams(modality: str) -> tuple[str, ...]:
    """The streams of a model of `modality`: ("rgb", "pose") for "rgbpose", else that one."""
    return tuple(s for s in STREAMS if modality in ("rgbpose", s))


def fuse_probabilities(
    outputs: dict[str, torch.Tensor], weights: tuple[float, float] = (1.0, 1.0)
) -> torch.Tensor:
    """sum_s w_s softmax(logits_s) / sum_s w_s over the streams present in `outputs` ([N, K]);
    weights are (rgb, pose). A single stream gives its own softmax."""
    present = [(s, float(w)) for s, w in zip(STREAMS, weights) if f"{s}_logits" in outputs]
    if not present:
        raise ValueError(f"no '<stream>_logits' in outputs (keys: {sorted(outputs)})")
    if len(present) == 1:
        return outputs[f"{present[0][0]}_logits"].softmax(dim=-1)
    total = sum(w for _, w in present)
    if total <= 0:
        raise ValueError(f"stream weights must not sum to 0, got {weights}")
    return sum(w * outputs[f"{s}_logits"].softmax(dim=-1) for s, w in present) / total


# ---------------------------------------------------------------------------------------------
# builders


def paper(
    num_classes: int,
    *,
    rgb_frames: int = 8,
    pose_frames: int = 32,
    pose_channels: int = 17,
    modality: str = "rgbpose",
    fusion: bool = True,
    embed_dim: int = 256,
    dropout: float = 0.5,
    stream_weights: tuple[float, float] = (1.0, 1.0),
    rgb_size: int = 224,
    **overrides,
) -> MicroGestureNet:
    """The paper's model: ResNet3d-50 SlowOnly RGB pathway (3,4,6,3) base 64 on 8 x 224^2,
    pose pathway (4,6,3) base 32 on 32 x 56^2 heatmaps; 35.99 M backbone parameters without
    fusion, ~2 M more with it. `overrides` go to MicroGestureNet (e.g. zero_init_residual)."""
    _check(modality, rgb_frames, pose_frames, rgb_size)
    return MicroGestureNet(
        num_classes,
        modality=modality,
        rgb_frames=rgb_frames,
        pose_frames=pose_frames,
        pose_channels=pose_channels,
        fusion=fusion,
        embed_dim=embed_dim,
        dropout=dropout,
        stream_weights=stream_weights,
        **overrides,
    )


def small(
    num_classes: int,
    *,
    rgb_frames: int = 8,
    pose_frames: int = 32,
    pose_channels: int = 17,
    rgb_size: int = 64,
    modality: str = "rgbpose",
    fusion: bool = True,
    embed_dim: int = 64,
    dropout: float = 0.3,
    stream_weights: tuple[float, float] = (1.0, 1.0),
    **overrides,
) -> MicroGestureNet:
    """Same topology at 1/8 of the widths and one block per stage, for 2-CPU-core runs on the
    synthetic dataset (RGB ~64^2, heatmaps 16^2). 4 fusion heads: the fusion widths are 16 and
    32 here. `overrides` go to MicroGestureNet."""
    _check(modality, rgb_frames, pose_frames, rgb_size)
    kwargs = {
        "rgb_base_channels": 8,
        "rgb_blocks": (1, 1, 1, 1),
        "pose_base_channels": 4,
        "pose_blocks": (1, 1, 1),
        "fusion_heads": 4,
    }
    kwargs.update(overrides)
    return MicroGestureNet(
        num_classes,
        modality=modality,
        rgb_frames=rgb_frames,
        pose_frames=pose_frames,
        pose_channels=pose_channels,
        fusion=fusion,
        embed_dim=embed_dim,
        dropout=dropout,
        stream_weights=stream_weights,
        **kwargs,
    )


def _check(modality: str, rgb_frames: int, pose_frames: int, rgb_size: int) -> None:
    if modality == "rgbpose":
        check_frame_counts(rgb_frames, pose_frames)
        check_input_sizes(rgb_size, rgb_size // 4)


PRESETS = {"paper": paper, "small": small}


def build_model(preset: str, num_classes: int, **kwargs) -> MicroGestureNet:
    """Dispatch to the builder named `preset` ("paper" or "small")."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset](num_classes, **kwargs)


# ---------------------------------------------------------------------------------------------
# single-stream checkpoints -> two-stream initialisation


def merge_stream_checkpoints(
    rgb_state: dict[str, torch.Tensor],
    pose_state: dict[str, torch.Tensor],
    fused_model: MicroGestureNet,
) -> dict[str, torch.Tensor]:
    """A state_dict for `fused_model` whose RGB pathway + head come from `rgb_state` and pose
    pathway + head from `pose_state` (state_dicts of RGB-only / pose-only MicroGestureNets; a
    "module." DDP prefix is stripped; an empty dict leaves that stream at the fused model's
    init). Laterals and fusion keep the fused model's init.

    The first block after each lateral point takes extra (lateral) input channels in the
    two-stream model: its own-channel slice is copied from the source and the lateral slice is
    zeroed, so the merged model starts out computing exactly the two single-stream models (with
    fusion on too, as long as its gates start at zero: `zero_init_residual`, the default), and
    the laterals grow from zero.

    Raises ValueError listing every missing key, unexpected key and shape mismatch.
    """
    target = fused_model.state_dict()
    merged = {k: v.clone() for k, v in target.items()}
    problems: list[str] = []
    for stream, source in (("rgb", rgb_state), ("pose", pose_state)):
        if not source:
            continue
        source = {k.removeprefix("module."): v for k, v in source.items()}
        prefixes = (f"backbone.{stream}.", f"heads.{stream}.")
        wanted = [k for k in target if k.startswith(prefixes)]
        missing = [k for k in wanted if k not in source]
        unexpected = [k for k in source if not k.startswith(prefixes) or k not in target]
        if missing:
            problems.append(f"{stream}: missing keys {missing}")
        if unexpected:
            problems.append(f"{stream}: unexpected keys {unexpected}")
        for key in wanted:
            if key not in source:
                continue
            src, dst = source[key], merged[key]
            if src.shape == dst.shape:
                merged[key] = src.detach().clone().to(dst.dtype)
            elif (
                src.dim() == dst.dim() >= 2
                and src.shape[0] == dst.shape[0]
                and src.shape[2:] == dst.shape[2:]
                and src.shape[1] < dst.shape[1]
            ):
                # a conv that reads [own channels; lateral channels] in the two-stream model
                merged[key] = torch.zeros_like(dst)
                merged[key][:, : src.shape[1]] = src
            else:
                problems.append(
                    f"{stream}: {key} has shape {tuple(src.shape)} in the source, "
                    f"{tuple(dst.shape)} in the fused model"
                )
    if problems:
        raise ValueError("cannot merge single-stream checkpoints: " + "; ".join(problems))
    return merged


def load_two_stream_state(
    state: dict[str, torch.Tensor], fused_model: MicroGestureNet
) -> dict[str, torch.Tensor]:
    """A state_dict for `fused_model` from a whole two-stream model's `state` (an imported
    mmaction2 RGBPoseConv3D, say): every key taken as it is, laterals included. Only the fusion's
    keys may be absent (a source without fusion: the fused model's init, gates at zero) or left
    over (a source with fusion, a target without). Raises ValueError naming any other missing,
    unexpected or mis-shaped key."""
    target = fused_model.state_dict()
    source = {k.removeprefix("module."): v for k, v in state.items()}
    fusion = "backbone.fusion."
    missing = [k for k in target if k not in source and not k.startswith(fusion)]
    unexpected = [k for k in source if k not in target and not k.startswith(fusion)]
    shapes = [
        f"{k} has shape {tuple(v.shape)} in the source, {tuple(target[k].shape)} in the model"
        for k, v in source.items()
        if k in target and v.shape != target[k].shape
    ]
    problems = (
        ([f"missing keys {few(missing)}"] if missing else [])
        + ([f"unexpected keys {few(unexpected)}"] if unexpected else [])
        + shapes[:5]
    )
    if problems:
        raise ValueError(
            "cannot start the two-stream model from a two-stream model file: " + "; ".join(problems)
        )
    return {
        k: (source[k].detach().clone().to(v.dtype) if k in source else v.clone())
        for k, v in target.items()
    }


def few(items: list[str], shown: int = 5) -> str:
    """A list for an error message: the first `shown` items and how many more there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return f"{items[:shown]}{more}"
