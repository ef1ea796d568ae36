"""Two-pathway RGB + pose-heatmap backbone (RGBPoseConv3D style, docs/model.md).

RGB pathway (4 stages) and pose pathway (3 stages) run side by side; at two lateral points,
after RGB stage 2 / pose stage 1 and after RGB stage 3 / pose stage 2, they exchange features:

    (optional) cross-modal fusion:  rgb, pose = fusion(rgb, pose)            (fusion.py)
    rgb  <- [rgb;  Conv3d(pose)]           kernel (k,1,1), stride (r,1,1): T_pose -> T_rgb
    pose <- [pose; ReLU(BN(ConvT3d(rgb)))] kernel (k,1,1), stride (r,1,1): T_rgb -> T_pose

with r = speed_ratio = pose_frames / rgb_frames and k = `lateral_kernel(r)`. RGB step t sits at
pose frame r*t and a centred kernel reads pose frames r*t - k//2 ... r*t + k//2, so every pose
frame is read (and, through the transposed conv, written) only if k//2 >= r - 1: mmaction2's 7
does that up to r = 4; beyond (8 RGB / 48 or 64 pose frames, say) the last r - 4 frames of every
clip and some frames between windows would never be seen, so the kernel grows to 2r - 1. That is
a deliberate difference from mmaction2, which keeps 7 for every ratio.

Nothing strides in time inside the pathways, so the laterals only work when pose_frames is an integer multiple of rgb_frames; spatially the
RGB map at RGB stage 2 (rgb_size / 8) must match the pose map at pose stage 1
(heatmap_size / 2). `check_frame_counts` and `check_input_sizes` state those rules up front so a
search can refuse a combination before building anything.

A single-stream backbone (modality "rgb" or "pose") is the same class with one pathway absent,
no laterals and no fusion: the parameter names of the pathway it keeps are the same as in the
two-stream model, which is what `merge_stream_checkpoints` (net.py) relies on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mg_ray.models.fusion import CrossModalFusion
from mg_ray.models.resnet3d import ResNet3dPathway, init_weights

MODALITIES = ("rgbpose", "rgb", "pose")
LATERAL_KERNEL = 7  # mmaction2's fusion_kernel


def lateral_kernel(speed_ratio: int) -> int:
    """The laterals' temporal kernel: mmaction2's 7, or 2r - 1 once r > 4, so that with stride r and
    padding k // 2 the windows reach every pose frame, the clip's last r - 1 included."""
    return max(LATERAL_KERNEL, 2 * speed_ratio - 1)


def check_frame_counts(rgb_frames: int, pose_frames: int) -> int:
    """Return the speed ratio pose_frames / rgb_frames, or raise ValueError saying which pairs
    the two-stream backbone accepts."""
    if (
        isinstance(rgb_frames, bool)
        or isinstance(pose_frames, bool)
        or not isinstance(rgb_frames, int)
        or not isinstance(pose_frames, int)
        or rgb_frames < 1
        or pose_frames < 1
        or pose_frames % rgb_frames
    ):
        raise ValueError(
            f"frame counts rgb_frames={rgb_frames!r}, pose_frames={pose_frames!r} do not fit the "
            "two-stream backbone: pose_frames must be a positive integer multiple of rgb_frames "
            "(pose_frames / rgb_frames is the lateral temporal stride), e.g. 8/32, 4/16, 8/16, "
            "16/32, 4/32 or 8/8 are allowed; 8/12, 32/8 and 0/32 are not"
        )
    return pose_frames // rgb_frames


def check_input_sizes(rgb_size: int, heatmap_size: int) -> None:
    """Raise ValueError unless the RGB map after RGB stage 2 (stride 8) and the pose map after
    pose stage 1 (stride 2) have the same size, as the lateral concatenation needs."""
    ok = (
        isinstance(rgb_size, int)
        and isinstance(heatmap_size, int)
        and rgb_size > 0
        and heatmap_size > 0
        and math.ceil(rgb_size / 8) == math.ceil(heatmap_size / 2)
        and math.ceil(rgb_size / 16) == math.ceil(heatmap_size / 4)
    )
    if not ok:
        raise ValueError(
            f"input sizes rgb_size={rgb_size!r}, heatmap_size={heatmap_size!r} do not fit the "
            "two-stream backbone: heatmaps must be 1/4 of the RGB crop (heatmap_size = "
            "rgb_size / 4, e.g. 224/56, 64/16, 128/32), so that the RGB map at stride 8 and "
            "the pose map at stride 2 have the same size at the lateral connections"
        )


class RGBToPoseLateral(nn.Module):
    """ConvTranspose3d (k,1,1) stride (r,1,1) + BN + ReLU: [N, C, T, H, W] -> [N, C', r*T, H, W].

    A transposed conv with kernel k, stride r and padding p gives (T - 1) * r - 2p + k +
    output_padding steps; with k odd, p = k // 2 that is r*T - r + 1 + output_padding, so
    output_padding = r - 1 (always < r, as PyTorch requires) recovers exactly r*T.
    """

    def __init__(self, in_channels: int, out_channels: int, speed_ratio: int) -> None:
        super().__init__()
        r, k = speed_ratio, lateral_kernel(speed_ratio)
        self.conv = nn.ConvTranspose3d(
            in_channels,
            out_channels,
            (k, 1, 1),
            stride=(r, 1, 1),
            padding=(k // 2, 0, 0),
            output_padding=(r - 1, 0, 0),
            bias=False,
        )
        self.bn = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def pose_to_rgb_lateral(in_channels: int, out_channels: int, speed_ratio: int) -> nn.Conv3d:
    """Conv3d (k,1,1) stride (r,1,1) pad k // 2 (k odd): floor((r*T - 1) / r) + 1 = T steps."""
    k = lateral_kernel(speed_ratio)
    return nn.Conv3d(
        in_channels,
        out_channels,
        (k, 1, 1),
        stride=(speed_ratio, 1, 1),
        padding=(k // 2, 0, 0),
        bias=False,
    )


class RGBPoseBackbone(nn.Module):
    """Input rgb [N, 3, T_rgb, S, S] and pose [N, C_pose, T_pose, S/4, S/4] (either None when the
    modality lacks it); output (rgb feature [N, rgb_out, T_rgb, S/32, S/32] or None,
    pose feature [N, pose_out, T_pose, S/32, S/32] or None).

    Lateral widths follow RGBPoseConv3D: pose -> RGB keeps the pose width (channel ratio 4 at
    the paper's widths), RGB -> pose divides the RGB width by `rgb_lateral_reduction` (16).
    The fusion width C' at each point is the RGB width there / `fusion_reduction` (4): 128 and
    256 at the paper's widths, which gives the paper's ~2 M fusion parameters.
    """

    def __init__(
        self,
        *,
        modality: str = "rgbpose",
        rgb_frames: int = 8,
        pose_frames: int = 32,
        pose_channels: int = 17,
        fusion: bool = True,
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
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if len(rgb_blocks) != 4 or len(pose_blocks) != 3:
            raise ValueError(
                "the RGB pathway has 4 stages and the pose pathway 3 (lateral points fixed)"
            )
        self.modality = modality
        two_stream = modality == "rgbpose"
        self.speed_ratio = check_frame_counts(rgb_frames, pose_frames) if two_stream else None
        self.fusion_enabled = fusion and two_stream
        expansion = 4
        rgb_widths = [rgb_base_channels * 2**i * expansion for i in range(4)]
        pose_widths = [pose_base_channels * 2**i * expansion for i in range(3)]
        # lateral point j joins RGB stage j+1 (0-based) with pose stage j, for j = 0, 1
        points = (0, 1)
        to_rgb = [pose_widths[j] for j in points]
        to_pose = [rgb_widths[j + 1] // rgb_lateral_reduction for j in points]

        self.rgb: ResNet3dPathway | None = None
        self.pose: ResNet3dPathway | None = None
        if modality in ("rgbpose", "rgb"):
            self.rgb = ResNet3dPathway(
                in_channels=3,
                base_channels=rgb_base_channels,
                blocks=tuple(rgb_blocks),
                spatial_strides=(1, 2, 2, 2),
                temporal_kernels=(1, 1, 3, 3),
                stem_stride=2,
                stem_pool_stride=2,
                lateral_channels=(0, 0, to_rgb[0], to_rgb[1]) if two_stream else None,
                zero_init_residual=zero_init_residual,
            )
        if modality in ("rgbpose", "pose"):
            self.pose = ResNet3dPathway(
                in_channels=pose_channels,
                base_channels=pose_base_channels,
                blocks=tuple(pose_blocks),
                spatial_strides=(2, 2, 2),
                temporal_kernels=(1, 3, 3),
                stem_stride=1,
                stem_pool_stride=1,
                lateral_channels=(0, to_pose[0], to_pose[1]) if two_stream else None,
                zero_init_residual=zero_init_residual,
            )
        self.rgb_channels = rgb_widths[-1] if self.rgb is not None else 0
        self.pose_channels = pose_widths[-1] if self.pose is not None else 0

        self.pose_to_rgb = nn.ModuleList()
        self.rgb_to_pose = nn.ModuleList()
        self.fusion = nn.ModuleList()
        if two_stream:
            r = self.speed_ratio
            for j in points:
                self.pose_to_rgb.append(pose_to_rgb_lateral(pose_widths[j], to_rgb[j], r))
                self.rgb_to_pose.append(RGBToPoseLateral(rgb_widths[j + 1], to_pose[j], r))
                if self.fusion_enabled:
                    self.fusion.append(
                        CrossModalFusion(
                            rgb_widths[j + 1],
                            pose_widths[j],
                            rgb_widths[j + 1] // fusion_reduction,
                            speed_ratio=r,
                            num_heads=fusion_heads,
                            dropout=fusion_dropout,
                        )
                    )
            init_weights(self.pose_to_rgb, zero_init_residual=False)
            init_weights(self.rgb_to_pose, zero_init_residual=False)
            if zero_init_residual:
                # The fusion's gate is a residual branch (X'' = X + A * X): like the ResNet
                # blocks' last BN, it starts at zero, so the two-stream model starts as the plain
                # baseline and learns how much each modality should gate the other.
                for module in self.fusion:
                    module.zero_init_gates()

    def forward(
        self, rgb: torch.Tensor | None, pose: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.modality == "rgb":
            return self.rgb(rgb), None
        if self.modality == "pose":
            return None, self.pose(pose)
        if pose.shape[2] != self.speed_ratio * rgb.shape[2]:
            raise ValueError(
                f"got {rgb.shape[2]} RGB and {pose.shape[2]} pose frames; this model was built "
                f"for pose_frames = {self.speed_ratio} x rgb_frames"
            )
        x_rgb = self.rgb.stages[1](self.rgb.stages[0](self.rgb.stem(rgb)))
        x_pose = self.pose.stages[0](self.pose.stem(pose))
        for j in (0, 1):
            if x_rgb.shape[-2:] != x_pose.shape[-2:]:
                raise ValueError(
                    f"RGB map {tuple(x_rgb.shape[-2:])} and pose map {tuple(x_pose.shape[-2:])} "
                    f"differ at lateral point {j + 1}: heatmaps must be 1/4 of the RGB crop "
                    f"(got RGB {tuple(rgb.shape[-2:])}, heatmaps {tuple(pose.shape[-2:])})"
                )
            if self.fusion_enabled:
                x_rgb, x_pose = self.fusion[j](x_rgb, x_pose)
            # both laterals read the (fused) features from before either concatenation
            x_rgb, x_pose = (
                torch.cat([x_rgb, self.pose_to_rgb[j](x_pose)], dim=1),
                torch.cat([x_pose, self.rgb_to_pose[j](x_rgb)], dim=1),
            )
            x_rgb = self.rgb.stages[j + 2](x_rgb)
            x_pose = self.pose.stages[j + 1](x_pose)
        return x_rgb, x_pose
