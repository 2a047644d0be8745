"""The DeFlow model: a conditional flow with a learned shift between a clean and a degraded domain.

References:
    Wolf, Lugmayr, Danelljan, Van Gool, Timofte. "DeFlow: Learning Complex Image Degradations
    from Unpaired Data with Conditional Flows". CVPR 2021. https://arxiv.org/abs/2101.05796
"""

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ._basicsr import imresize
from .config import DeFlowConfig
from .encoder import ConditionEncoder
from .flow import FlowStep, Split, squeeze, unsqueeze
from .shift import CLEAN, DEGRADED, DomainShift, domain_mask

__all__ = ["CLEAN", "DEGRADED", "DeFlow", "FlowLevel"]

# Paired likelihood (Eq. 5) floors the covariance of u, which M M^T alone leaves singular.
PAIRED_COVARIANCE_FLOOR = 1e-4


class FlowLevel(nn.Module):
    """Squeeze, plain flow steps, conditional flow steps and an optional split.

    Arguments:
        in_channels: channels entering the level (before the squeeze).
        cond_channels: channels of the level's condition feature map.
        config: the model configuration.
        split: whether the level factors out half of its channels as a latent.
    """

    def __init__(self, in_channels: int, cond_channels: int, config: DeFlowConfig, split: bool):
        super().__init__()

        channels = 4 * in_channels
        kinds = [False] * config.n_plain_steps + [True] * config.n_coupling_steps
        self.steps = nn.ModuleList(
            FlowStep(channels, cond_channels, config.coupling_hidden, config.coupling_eps, kind)
            for kind in kinds
        )
        self.split = Split(channels) if split else None
        self.out_channels = channels // 2 if split else channels
        self.latent_channels = channels - channels // 2 if split else 0

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """(output, split latent or None, logdet)."""
        x = squeeze(x)
        logdet = x.new_zeros(x.shape[0])

        for step in self.steps:
            x, step_logdet = step(x, cond)
            logdet = logdet + step_logdet

        if self.split is None:
            return x, None, logdet
        x, latent, split_logdet = self.split(x)

        return x, latent, logdet + split_logdet

    def inverse(self, z: Tensor, latent: Tensor | None, cond: Tensor) -> tuple[Tensor, Tensor]:
        logdet = z.new_zeros(z.shape[0])
        if self.split is not None:
            z, logdet = self.split.inverse(z, latent)

        for step in reversed(self.steps):
            z, step_logdet = step.inverse(z, cond)
            logdet = logdet + step_logdet

        return unsqueeze(z), logdet


class DeFlow(nn.Module):
    """Conditional flow f(x; h) whose latents are N(0, I) for clean and N(mu, I + M M^T) for
    degraded images, conditioned on RRDB features of h = downsampled x plus noise.

    Images are (B, 3, H, W) floats in [0, 1] with H and W multiples of ``config.size_multiple``;
    the condition image h is (B, 3, H / scale, W / scale). Latents are a list, one per split
    level (finest first) and the top latent last; each has its own :class:`DomainShift`.

    Arguments:
        config: the architecture, see :class:`DeFlowConfig`.

    Example:
        >>> from deflow_synth.config import preset
        >>> model = DeFlow(preset("small"))
        >>> x = torch.rand(1, 3, 32, 32)
        >>> cond = model.condition(model.condition_image(x))
        >>> latents, nll = model.encode(x, cond, CLEAN)
        >>> y = model.translate(x, cond, source=CLEAN)
    """

    def __init__(self, config: DeFlowConfig):
        super().__init__()

        self.config = config
        self.encoder = ConditionEncoder(config)

        levels, channels = [], config.in_channels
        latent_channels, latent_factors = [], []
        for level in range(1, config.n_levels + 1):
            split = level in config.split_levels
            flow_level = FlowLevel(channels, config.cond_channels, config, split)
            levels.append(flow_level)
            channels = flow_level.out_channels
            if split:
                latent_channels.append(flow_level.latent_channels)
                latent_factors.append(2**level)
        latent_channels.append(channels)
        latent_factors.append(2**config.n_levels)

        self.levels = nn.ModuleList(levels)
        self.latent_channels = tuple(latent_channels)
        self.latent_factors = tuple(latent_factors)
        self.shifts = nn.ModuleList(
            DomainShift(c, config.shift_init_std) for c in self.latent_channels
        )

        # Per-domain colour statistics (row CLEAN, row DEGRADED) on [0, 1] images.
        self.register_buffer("color_mean", torch.full((2, 3), 0.5))
        self.register_buffer("color_std", torch.full((2, 3), 0.25))

    # Parameters

    def shift_parameters(self) -> Iterator[nn.Parameter]:
        return self.shifts.parameters()

    def flow_parameters(self) -> Iterator[nn.Parameter]:
        shift_ids = {id(p) for p in self.shift_parameters()}

        return (p for p in self.parameters() if id(p) not in shift_ids)

    # Condition

    def condition_image(self, x: Tensor) -> Tensor:
        """h before noise: x downsampled by ``config.scale`` with MATLAB-style bicubic."""
        scale = 1 / self.config.scale
        images = [imresize(image.detach().cpu().float(), scale) for image in x]

        return torch.stack(images).to(device=x.device, dtype=x.dtype)

    def condition(self, h: Tensor, noise: Tensor | None = None) -> list[Tensor]:
        """Features for every level from h plus ``cond_noise_std`` times standard-normal noise."""
        if self.config.cond_noise_std > 0:
            noise = torch.randn_like(h) if noise is None else noise
            h = h + self.config.cond_noise_std * noise

        return self.encoder(h)

    # Flow

    def flow_forward(self, x: Tensor, cond: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Latents of x and log|det dz/dx| (B,), without any density term."""
        self.check_sizes(x, cond)
        latents, logdet = [], x.new_zeros(x.shape[0])

        for level, level_cond in zip(self.levels, cond):
            x, latent, level_logdet = level(x, level_cond)
            logdet = logdet + level_logdet
            if latent is not None:
                latents.append(latent)
        latents.append(x)

        return latents, logdet

    def flow_inverse(self, latents: list[Tensor], cond: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Image of the latents and log|det dx/dz| (B,)."""
        split_latents = iter(reversed(latents[:-1]))
        z = latents[-1]
        logdet = z.new_zeros(z.shape[0])

        for level, level_cond in zip(reversed(self.levels), reversed(cond)):
            latent = next(split_latents) if level.split is not None else None
            z, level_logdet = level.inverse(z, latent, level_cond)
            logdet = logdet + level_logdet

        return z, logdet

    def latent_log_prob(self, latents: list[Tensor], domain: int | Tensor) -> Tensor:
        """Sum over latents of their log-density under the domain's distribution; (B,)."""
        return sum(shift.log_prob(z, domain) for shift, z in zip(self.shifts, latents))

    def check_sizes(self, x: Tensor, cond: list[Tensor]) -> None:
        multiple = self.config.size_multiple
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(
                f"image sides must be multiples of {multiple}, got {tuple(x.shape[2:])}"
            )
        expected = (x.shape[2] // 2, x.shape[3] // 2)
        if tuple(cond[0].shape[2:]) != expected:
            raise ValueError(
                f"condition of the first level must be {expected}, got {tuple(cond[0].shape[2:])}"
                f"; was h made from an image of size {tuple(x.shape[2:])}?"
            )

    # Likelihood

    def dequantize(self, x: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """x plus uniform noise over one quantisation bin, and the log-volume term (B,)."""
        bins = self.config.dequant_bins
        if bins <= 0:
            return x, x.new_zeros(x.shape[0])

        noise = torch.rand_like(x) if noise is None else noise
        values = x.shape[2] * x.shape[3]
        if not self.config.dequant_logdet_per_pixel:
            values *= x.shape[1]

        return x + (noise - 0.5) / bins, x.new_full((x.shape[0],), -math.log(bins) * values)

    def bits_per_dim(self, log_p: Tensor, x: Tensor) -> Tensor:
        return -log_p / (math.log(2) * x[0].numel())

    def encode(
        self,
        x: Tensor,
        cond: list[Tensor],
        domain: int | Tensor,
        dequant_noise: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        """Latents of x in its domain and the negative log-likelihood in bits per dimension.

        Arguments:
            x: images (B, 3, H, W) in [0, 1].
            cond: features from :meth:`condition`.
            domain: CLEAN, DEGRADED or a (B,) label tensor.
            dequant_noise: U[0, 1) draws shaped like x; None draws them.
        """
        x, dequant_logdet = self.dequantize(x, dequant_noise)
        latents, logdet = self.flow_forward(x, cond)

        log_p = self.latent_log_prob(latents, domain) + logdet + dequant_logdet

        return latents, self.bits_per_dim(log_p, x)

    def decode(self, latents: list[Tensor], cond: list[Tensor]) -> Tensor:
        """Image of the latents; the domain only changes densities, never the image."""
        return self.flow_inverse(latents, cond)[0]

    def paired_nll(
        self, x: Tensor, y: Tensor, cond: list[Tensor], dequant_noise: Tensor | None = None
    ) -> Tensor:
        """-log p(y | x) in bits per dimension for aligned clean x and degraded y (Eq. 5).

        log p(y | x) = log|det Df(y)| + log N(f(y); f(x) + mean, M M^T), both flows taking the
        same condition. The covariance is floored by ``PAIRED_COVARIANCE_FLOOR`` times I.
        """
        x, _ = self.dequantize(x, dequant_noise)
        y, dequant_logdet = self.dequantize(y, dequant_noise)
        clean_latents, _ = self.flow_forward(x, cond)
        degraded_latents, logdet = self.flow_forward(y, cond)

        log_p = logdet + dequant_logdet
        for shift, zx, zy in zip(self.shifts, clean_latents, degraded_latents):
            log_p = log_p + shift.difference_log_prob(zy - zx, PAIRED_COVARIANCE_FLOOR)

        return self.bits_per_dim(log_p, y)

    # Sampling and translation

    def latent_shapes(self, cond: list[Tensor]) -> list[tuple[int, ...]]:
        """Shapes (B, C, h, w) of the latents of images with this condition."""
        batch = cond[0].shape[0]
        sizes = [c.shape[2:] for c, level in zip(cond, self.levels) if level.split is not None]
        sizes.append(cond[-1].shape[2:])

        return [(batch, c, *size) for c, size in zip(self.latent_channels, sizes)]

    def draw(self, shapes: list[tuple[int, ...]], like: Tensor) -> list[Tensor]:
        return [torch.randn(shape, device=like.device, dtype=like.dtype) for shape in shapes]

    def sample(
        self,
        cond: list[Tensor],
        domain: int | Tensor,
        temperature: float = 1.0,
        eps: list[Tensor] | None = None,
        shift_noise: list[Tensor] | None = None,
    ) -> Tensor:
        """Images drawn from p(x | h, domain); eps and shift noise are standard-normal lists."""
        shapes = self.latent_shapes(cond)
        eps = self.draw(shapes, cond[0]) if eps is None else eps
        noise = self.draw(shapes, cond[0]) if shift_noise is None else shift_noise
        degraded = domain_mask(domain, shapes[0][0], cond[0].device)[:, None, None, None]

        latents = []
        for shift, e, n in zip(self.shifts, eps, noise):
            z = temperature * e
            latents.append(torch.where(degraded, z + shift.shift(temperature * n), z))

        return self.denormalize_colors(self.decode(latents, cond), domain)

    def shift_latents(
        self,
        latents: list[Tensor],
        source: int | Tensor,
        temperature: float = 1.0,
        shift_noise: list[Tensor] | None = None,
    ) -> list[Tensor]:
        """Latents moved to the other domain: z + u for clean sources (Eq. 8), a posterior draw
        of the clean latent for degraded ones. ``temperature`` scales the random part."""
        if shift_noise is None:
            shift_noise = self.draw([z.shape for z in latents], latents[0])
        degraded = domain_mask(source, latents[0].shape[0], latents[0].device)
        degraded = degraded[:, None, None, None]

        moved = []
        for shift, z, n in zip(self.shifts, latents, shift_noise):
            n = temperature * n
            moved.append(torch.where(degraded, shift.to_clean(z, n), z + shift.shift(n)))

        return moved

    def translate(
        self,
        x: Tensor,
        cond: list[Tensor],
        source: int | Tensor = CLEAN,
        temperature: float = 1.0,
        shift_noise: list[Tensor] | None = None,
        dequant_noise: Tensor | None = None,
    ) -> Tensor:
        """Eq. 8: y = f^-1(f(x; h) + u; h) for clean x, or the reverse for degraded x.

        Colours are the real ones on both sides: with colour normalisation, degraded inputs are
        normalised and degraded outputs mapped back.
        """
        x = self.normalize_colors(x, source)
        latents, _ = self.encode(x, cond, source, dequant_noise)
        moved = self.shift_latents(latents, source, temperature, shift_noise)
        target = 1 - source

        return self.denormalize_colors(self.decode(moved, cond), target)

    # Colour statistics

    def set_color_stats(
        self, mean_clean: Tensor, std_clean: Tensor, mean_degraded: Tensor, std_degraded: Tensor
    ) -> None:
        """Per-channel statistics (3,) of each domain on [0, 1] images."""
        with torch.no_grad():
            self.color_mean.copy_(torch.stack([torch.as_tensor(mean_clean),
                                               torch.as_tensor(mean_degraded)]))
            self.color_std.copy_(torch.stack([torch.as_tensor(std_clean),
                                              torch.as_tensor(std_degraded)]))

    def normalize_colors(self, x: Tensor, domain: int | Tensor) -> Tensor:
        """Degraded images mapped to clean colour statistics (identity when disabled)."""
        return self.map_colors(x, domain, DEGRADED, CLEAN, clamp=True)

    def denormalize_colors(self, x: Tensor, domain: int | Tensor) -> Tensor:
        """Degraded images mapped back from clean to degraded colour statistics."""
        return self.map_colors(x, domain, CLEAN, DEGRADED, clamp=False)

    def map_colors(self, x: Tensor, domain, source: int, target: int, clamp: bool) -> Tensor:
        if not self.config.color_normalization:
            return x
        mean, std = self.color_mean[:, :, None, None], self.color_std[:, :, None, None]

        mapped = (x - mean[source]) / std[source] * std[target] + mean[target]
        if clamp:
            mapped = mapped.clamp(0, 1)

        degraded = domain_mask(domain, x.shape[0], x.device)[:, None, None, None]
        return torch.where(degraded, mapped, x)
