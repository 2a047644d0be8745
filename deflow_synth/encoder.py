"""The RRDB condition encoder: features of the domain-invariant view h for every flow level."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._basicsr import rrdb_block
from .config import DeFlowConfig

LEAKY_SLOPE = 0.2


class ConditionEncoder(nn.Module):
    """RRDB features of h at the resolution of each flow level, with stacked block outputs.

    The trunk is basicsr's RRDB blocks between a first and a last convolution, with a global
    residual. Nearest-upsampling convolutions give features at 2x, 4x, ... the resolution of h,
    a 2x2 mean gives the half-resolution one. Every feature map is concatenated with the outputs
    of ``config.stacked_blocks``, resized to it, so each has ``config.cond_channels`` channels.

    Arguments:
        config: the model configuration (encoder_features, encoder_blocks, stacked_blocks,
            scale, n_levels).
    """

    def __init__(self, config: DeFlowConfig):
        super().__init__()

        nf = config.encoder_features
        self.factors = config.feature_factors
        self.stacked_blocks = tuple(config.stacked_blocks)

        self.conv_first = nn.Conv2d(config.in_channels, nf, 3, padding=1)
        self.body = nn.ModuleList(
            rrdb_block(nf, config.encoder_growth) for _ in range(config.encoder_blocks)
        )
        self.conv_body = nn.Conv2d(nf, nf, 3, padding=1)

        n_up = max(0, int(math.log2(max(self.factors))))
        self.conv_up = nn.ModuleList(nn.Conv2d(nf, nf, 3, padding=1) for _ in range(n_up))

    def trunk(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """The trunk's output feature and the stacked outputs of the chosen blocks."""
        feature, kept = self.conv_first(h), {}
        for index, block in enumerate(self.body):
            feature = block(feature)
            if index in self.stacked_blocks:
                kept[index] = feature

        stack = torch.cat([kept[index] for index in self.stacked_blocks], dim=1)

        # The residual skips only the last convolution, not the whole trunk.
        return feature + self.conv_body(feature), stack

    def forward(self, h: Tensor) -> list[Tensor]:
        """Condition features for each level, level 1 (finest) first."""
        feature, stack = self.trunk(h)

        by_factor = {1.0: feature}
        if 0.5 in self.factors:
            by_factor[0.5] = F.avg_pool2d(feature, 2)
        up = feature
        for index, conv in enumerate(self.conv_up):
            up = F.leaky_relu(conv(F.interpolate(up, scale_factor=2, mode="nearest")), LEAKY_SLOPE)
            by_factor[float(2 ** (index + 1))] = up

        features = []
        for factor in self.factors:
            level_feature = by_factor[float(factor)]
            resized_stack = F.interpolate(stack, size=level_feature.shape[2:], mode="nearest")
            features.append(torch.cat([level_feature, resized_stack], dim=1))

        return features
