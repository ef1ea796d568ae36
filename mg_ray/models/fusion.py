"""Cross-modal fusion at a lateral point (paper section 2.2; docs/model.md).

Both features are projected to a shared width C' (RGB by a 1x1x1 conv, pose by a conv whose
temporal kernel and stride equal the speed ratio, so both give T_rgb steps), max-pooled over
space to T_rgb tokens, and cross-attended: the RGB tokens query the pose tokens and vice versa.
The attended tokens are projected back to each pathway's width and time (1x1x1 conv for RGB,
transposed conv with stride = speed ratio for pose) and applied as a per-channel, per-time gate
X'' = A * X + X, broadcast over H and W.

The gate is a residual branch, and the backbone starts it at zero (`zero_init_gates`, with
`zero_init_residual`): the two-stream model then starts as the plain baseline, and a model merged
from single-stream checkpoints starts as exactly those two models. On the synthetic dataset,
zero-initialised gates trained better than random ones from scratch (same recipe and seed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def project_max(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """conv(x).amax over H, W, computed cheaply: x [N, C, T*r, H, W] -> tokens [N, T, K] for a
    conv with kernel = stride = (r, 1, 1) (r = 1: a 1x1x1 conv).

    Same values and gradients as `conv(x).amax(dim=(3, 4))` (up to ties), at a fraction of
    the cost: the full-map projection runs once without autograd just to find each output
    channel's spatial argmax, and only the selected positions are projected again with
    autograd. The naive form back-propagates a dense [N, K, T, H, W] gradient that is zero
    everywhere but at the maxima, which made the fusion's backward dearer than the backbone's on CPU
    (`benchmarks/bench_model.py` measures the step with fusion on and off).
    """
    n, c, frames, h, w = x.shape
    k, r = conv.out_channels, conv.kernel_size[0]
    t = frames // r
    with torch.no_grad():
        where = (
            F.conv3d(x, conv.weight, conv.bias, stride=conv.stride).flatten(3).argmax(dim=3)
        )  # [N, K, T]
    # [N, C, T, r, HW] -> [N, T, HW, C, r]; pick, for every (n, k, t), the column at `where`
    columns = x.reshape(n, c, t, r, h * w).permute(0, 2, 4, 1, 3)
    picked = columns[
        torch.arange(n, device=x.device)[:, None, None],
        torch.arange(t, device=x.device)[None, None, :],
        where,
    ]  # [N, K, T, C, r]
    weight = conv.weight.reshape(k, c, r)
    tokens = torch.einsum("nktcj,kcj->ntk", picked, weight.to(picked.dtype))
    return tokens + conv.bias.to(tokens.dtype) if conv.bias is not None else tokens


class CrossModalFusion(nn.Module):
    """Input rgb [N, C_rgb, T, H, W], pose [N, C_pose, T * speed_ratio, H, W];
    output the same shapes (the fused X'' of eq. 3)."""

    def __init__(
        self,
        rgb_channels: int,
        pose_channels: int,
        hidden_channels: int,
        *,
        speed_ratio: int,
        num_heads: int = 8,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if hidden_channels % num_heads:
            raise ValueError(
                f"fusion width {hidden_channels} is not divisible by {num_heads} heads"
            )
        r = speed_ratio
        self.rgb_proj = nn.Conv3d(rgb_channels, hidden_channels, 1)
        self.pose_proj = nn.Conv3d(pose_channels, hidden_channels, (r, 1, 1), stride=(r, 1, 1))
        self.rgb_attn = nn.MultiheadAttention(
            hidden_channels, num_heads, dropout=dropout, batch_first=True
        )
        self.pose_attn = nn.MultiheadAttention(
            hidden_channels, num_heads, dropout=dropout, batch_first=True
        )
        self.rgb_back = nn.Conv3d(hidden_channels, rgb_channels, 1)
        # kernel == stride: every RGB time step expands to exactly r pose steps, no overlap, so
        # T_pose = r * T_rgb is recovered for any r without output_padding.
        self.pose_back = nn.ConvTranspose3d(
            hidden_channels, pose_channels, (r, 1, 1), stride=(r, 1, 1)
        )

    def zero_init_gates(self) -> None:
        """A = 0 at the start (X'' = X): the back projections' weights and biases to zero."""
        for layer in (self.rgb_back, self.pose_back):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, rgb: torch.Tensor, pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [N, C', T, H, W] -> max over space -> tokens [N, T, C']
        rgb_tokens = project_max(rgb, self.rgb_proj)
        pose_tokens = project_max(pose, self.pose_proj)
        rgb_att, _ = self.rgb_attn(rgb_tokens, pose_tokens, pose_tokens, need_weights=False)
        pose_att, _ = self.pose_attn(pose_tokens, rgb_tokens, rgb_tokens, need_weights=False)
        # tokens [N, T, C'] -> [N, C', T, 1, 1] -> per-channel, per-time gates
        rgb_gate = self.rgb_back(rgb_att.transpose(1, 2)[..., None, None])  # [N, C_rgb, T, 1, 1]
        pose_gate = self.pose_back(
            pose_att.transpose(1, 2)[..., None, None]
        )  # [N, C_pose, rT, 1, 1]
        # A * X + X in one fused op (addcmul) instead of a product and a sum over the full map
        return torch.addcmul(rgb, rgb, rgb_gate), torch.addcmul(pose, pose, pose_gate)
