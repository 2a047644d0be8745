"""Architecture configuration of a DeFlow model and the named presets."""

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class DeFlowConfig:
    """Everything needed to rebuild a DeFlow model; saved inside every checkpoint.

    Arguments:
        scale: conditional factor; the condition h is the flow image downsampled by it (4 or 8).
        n_levels: number of squeeze levels of the flow (each halves the resolution).
        n_coupling_steps: flow steps with conditional coupling per level (K in the paper).
        n_plain_steps: flow steps without coupling (actnorm and 1x1 conv) opening each level.
        split_levels: levels (1-based) that factor out half of their channels as a latent.
        coupling_hidden: width of the coupling and injector networks.
        coupling_eps: lower bound added to the sigmoid scale of coupling and injector.
        encoder_features: feature width of the RRDB condition encoder (nf).
        encoder_blocks: number of RRDB blocks (nb).
        encoder_growth: growth channels inside each dense block.
        stacked_blocks: RRDB blocks (0-based) whose outputs are stacked onto every feature map.
        cond_noise_std: std of the Gaussian noise added to h on [0, 1] images.
        dequant_bins: dequantization noise is uniform over 1/dequant_bins; 0 disables it.
        dequant_logdet_per_pixel: count the dequantization volume once per pixel instead of
            once per value, as the official implementation does (only for loaded checkpoints).
        shift_init_std: std of the random start of the degraded domain's shift; it must not be
            zero, or the shift matrix gets no gradient and never learns.
        color_normalization: the degraded domain is mapped to clean colour statistics before
            the flow sees it, and generated degraded images are mapped back.
    """

    scale: int = 4
    in_channels: int = 3
    n_levels: int = 3
    n_coupling_steps: int = 16
    n_plain_steps: int = 2
    split_levels: tuple[int, ...] = (1,)
    coupling_hidden: int = 64
    coupling_eps: float = 1e-3
    encoder_features: int = 64
    encoder_blocks: int = 23
    encoder_growth: int = 32
    stacked_blocks: tuple[int, ...] = (1, 8, 15, 22)
    cond_noise_std: float = 0.03
    dequant_bins: int = 256
    dequant_logdet_per_pixel: bool = False
    shift_init_std: float = 1e-2
    color_normalization: bool = False

    def __post_init__(self):
        if self.scale not in (2, 4, 8, 16):
            raise ValueError(f"scale: expected 2, 4, 8 or 16, got {self.scale}")
        if self.n_levels < 1:
            raise ValueError(f"n_levels: expected at least 1, got {self.n_levels}")
        if any(not 1 <= level < self.n_levels for level in self.split_levels):
            raise ValueError(
                f"split_levels: expected levels in 1..{self.n_levels - 1}, "
                f"got {self.split_levels}"
            )
        if any(not 0 <= b < self.encoder_blocks for b in self.stacked_blocks):
            raise ValueError(
                f"stacked_blocks: expected indices below encoder_blocks={self.encoder_blocks}, "
                f"got {self.stacked_blocks}"
            )
        if min(self.feature_factors) < 0.5:
            raise ValueError(
                f"scale {self.scale} with {self.n_levels} levels needs features below half the "
                "condition's resolution; use fewer levels or a larger scale"
            )

    @property
    def cond_channels(self) -> int:
        """Channels of every conditional feature map: the feature plus the stacked blocks."""
        return self.encoder_features * (len(self.stacked_blocks) + 1)

    @property
    def feature_factors(self) -> tuple[float, ...]:
        """Resolution of each level's condition feature relative to h (level 1 first)."""
        return tuple(self.scale / 2**level for level in range(1, self.n_levels + 1))

    @property
    def size_multiple(self) -> int:
        """Flow image sides must be multiples of this."""
        return max(2**self.n_levels, self.scale)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DeFlowConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown DeFlowConfig fields: {sorted(unknown)}")
        tuples = {k: tuple(v) for k, v in values.items() if isinstance(v, list)}
        return cls(**{**values, **tuples})


PRESETS: dict[str, DeFlowConfig] = {
    # The released DeFlow-AIM-RWSR architecture (x8 conditioning, 62.9 M parameters).
    "aim-x8": DeFlowConfig(scale=8, coupling_hidden=128),
    # The released DeFlow-NTIRE-RWSR / DPED-RWSR architecture (x4 conditioning, 39.7 M).
    "ntire-x4": DeFlowConfig(scale=4, coupling_hidden=64),
    # Sized to learn a degradation on 2 CPU cores within about an hour.
    "small": DeFlowConfig(
        scale=4,
        n_coupling_steps=4,
        coupling_hidden=32,
        encoder_features=16,
        encoder_blocks=4,
        stacked_blocks=(0, 1, 2, 3),
    ),
}


def preset(name: str, **overrides: Any) -> DeFlowConfig:
    """The named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
