"""ResNet3d SlowOnly pathway: bottleneck block, stage builder, stem + stages.

Both pathways of the two-stream backbone are instances of `ResNet3dPathway`, differing only
in widths, depths, strides and temporal kernels (docs/model.md):

- RGB:  stem (1,7,7) stride 2 + max-pool (1,3,3) stride 2, stages (3,4,6,3), base 64, spatial
  strides (1,2,2,2), temporal kernel 3 in the first conv of every block of stages 3-4.
- pose: stem (1,7,7) stride 1 + max-pool (1,3,3) stride 1 (mmaction2's RGBPoseConv3D applies
  `pose_path.maxpool` in its forward), stages (4,6,3), base 32, spatial strides (2,2,2),
  temporal kernel 3 in stages 2-3.

No stage ever strides in time, so a pathway keeps its input frame count T throughout; the
lateral connections (rgbpose.py) are the only place where the two frame counts meet.
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck3d(nn.Module):
    """1x1x1 (or tk x 1 x 1) -> 1x3x3 (spatial stride) -> 1x1x1, with a residual.

    Input [N, in_channels, T, H, W] -> [N, planes * 4, T, ceil(H / s), ceil(W / s)].
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        spatial_stride: int = 1,
        temporal_kernel: int = 1,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv3d(
            in_channels,
            planes,
            (temporal_kernel, 1, 1),
            padding=(temporal_kernel // 2, 0, 0),
            bias=False,
        )
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(
            planes,
            planes,
            (1, 3, 3),
            stride=(1, spatial_stride, spatial_stride),
            padding=(0, 1, 1),
            bias=False,
        )
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if in_channels != out_channels or spatial_stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv3d(
                    in_channels,
                    out_channels,
                    1,
                    stride=(1, spatial_stride, spatial_stride),
                    bias=False,
                ),
                nn.BatchNorm3d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def make_stage(
    in_channels: int, planes: int, blocks: int, *, spatial_stride: int, temporal_kernel: int
) -> nn.Sequential:
    """`blocks` bottlenecks; only the first one changes width and spatial size."""
    layers = [
        Bottleneck3d(
            in_channels, planes, spatial_stride=spatial_stride, temporal_kernel=temporal_kernel
        )
    ]
    for _ in range(1, blocks):
        layers.append(
            Bottleneck3d(planes * Bottleneck3d.expansion, planes, temporal_kernel=temporal_kernel)
        )
    return nn.Sequential(*layers)


class ResNet3dPathway(nn.Module):
    """Stem + ResNet3d stages, stage i with planes base_channels * 2**i.

    `lateral_channels[i]` extra input channels are expected by stage i: the two-stream backbone
    concatenates the other pathway's lateral output to this pathway's features before that
    stage (0 everywhere for a single-stream model). The pathway only owns its stem and stages;
    the order in which they run (and what is concatenated in between) is the backbone's job.

    Input [N, in_channels, T, H, W]; `out_channels[i]` = base_channels * 2**i * 4.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        base_channels: int,
        blocks: tuple[int, ...],
        spatial_strides: tuple[int, ...],
        temporal_kernels: tuple[int, ...],
        stem_stride: int,
        stem_pool_stride: int | None,
        lateral_channels: tuple[int, ...] | None = None,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if not len(blocks) == len(spatial_strides) == len(temporal_kernels):
            raise ValueError(
                "blocks, spatial_strides and temporal_kernels need one entry per stage"
            )
        lateral_channels = lateral_channels or (0,) * len(blocks)
        stem: list[nn.Module] = [
            nn.Conv3d(
                in_channels,
                base_channels,
                (1, 7, 7),
                stride=(1, stem_stride, stem_stride),
                padding=(0, 3, 3),
                bias=False,
            ),
            nn.BatchNorm3d(base_channels),
            nn.ReLU(inplace=True),
        ]
        if stem_pool_stride is not None:  # (1,3,3) max-pool, padding 1: stride 1 keeps the size
            stem.append(
                nn.MaxPool3d(
                    (1, 3, 3), stride=(1, stem_pool_stride, stem_pool_stride), padding=(0, 1, 1)
                )
            )
        self.stem = nn.Sequential(*stem)
        self.stages = nn.ModuleList()
        self.out_channels: list[int] = []
        channels = base_channels
        for i, (num_blocks, stride, kernel) in enumerate(
            zip(blocks, spatial_strides, temporal_kernels)
        ):
            planes = base_channels * 2**i
            self.stages.append(
                make_stage(
                    channels + lateral_channels[i],
                    planes,
                    num_blocks,
                    spatial_stride=stride,
                    temporal_kernel=kernel,
                )
            )
            channels = planes * Bottleneck3d.expansion
            self.out_channels.append(channels)
        init_weights(self, zero_init_residual=zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Single-stream use: [N, C_in, T, H, W] -> [N, out_channels[-1], T, h, w]."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x


def init_weights(module: nn.Module, *, zero_init_residual: bool) -> None:
    """Kaiming for convs, unit BN; optionally zero the last BN of each residual branch so that
    every block starts as the identity (mmaction2's ResNet3d default, helps training from
    scratch)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in module.modules():
            if isinstance(m, Bottleneck3d):
                nn.init.zeros_(m.bn3.weight)
