"""Invertible flow layers, each with an exact inverse and log-determinant.

Contract for every layer: ``forward(x, cond)`` maps an image-side tensor to the latent side and
returns ``(z, logdet)``, ``logdet`` of shape (B,) being log|det dz/dx|; ``inverse(z, cond)``
returns ``(x, logdet)`` with log|det dx/dz|, the negative of the forward one. The conditional
coupling follows DeFlow's convention: the encoding direction divides by the scale and subtracts
the shift, so that checkpoints of the official implementation load unchanged.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The sigmoid scale of couplings starts near sigmoid(2) = 0.88, close to the identity.
SIGMOID_OFFSET = 2.0
# Zero-initialised output convolutions learn their log-scale three times faster.
ZERO_CONV_LOGSCALE_FACTOR = 3.0


def spatial_size(x: Tensor) -> int:
    return x.shape[2] * x.shape[3]


class ActNorm(nn.Module):
    """Per-channel affine map y = (x + bias) * exp(logs), initialised from the first batch.

    The data-dependent start (zero mean, unit variance per channel) happens once, in training
    mode; the flag is a buffer so that loaded models never re-initialise.

    Arguments:
        channels: number of channels C of inputs (B, C, H, W).
    """

    def __init__(self, channels: int):
        super().__init__()

        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        self.bias.copy_(-mean)
        self.logs.copy_(-std.log())
        self.initialized.fill_(True)

    def normalize(self, x: Tensor) -> Tensor:
        if self.training and not self.initialized:
            self.initialize(x)

        return (x + self.bias) * self.logs.exp()

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = spatial_size(x) * self.logs.sum()

        return self.normalize(x), logdet.expand(x.shape[0])

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = -spatial_size(z) * self.logs.sum()

        return z * (-self.logs).exp() - self.bias, logdet.expand(z.shape[0])


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution in LU form, W = P (L + I) (U + diag(sign * exp(log_s))).

    The inverse weight is computed in float64 and cached while the parameters are unchanged and
    no gradient is needed (inference).

    Arguments:
        channels: number of channels C.
    """

    def __init__(self, channels: int):
        super().__init__()

        weight = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        p, lower, upper = torch.linalg.lu(weight)
        diagonal = torch.diagonal(upper)

        self.register_buffer("p", p.float())
        self.register_buffer("sign_s", diagonal.sign().float())
        self.l = nn.Parameter(lower.float())
        self.log_s = nn.Parameter(diagonal.abs().log().float())
        self.u = nn.Parameter(torch.triu(upper, 1).float())

        self.register_buffer(
            "lower_mask", torch.tril(torch.ones(channels, channels), -1), persistent=False
        )
        self._inverse_cache: tuple[tuple, Tensor] | None = None

    def factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.l.shape[0], device=self.l.device, dtype=self.l.dtype)
        lower = self.l * self.lower_mask + eye
        upper = self.u * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())

        return lower, upper

    def weight(self) -> Tensor:
        lower, upper = self.factors()

        return self.p @ lower @ upper

    def inverse_weight(self) -> Tensor:
        key = (self.l._version, self.u._version, self.log_s._version, self.l.device, self.l.dtype)
        cacheable = not torch.is_grad_enabled() or not self.l.requires_grad
        if cacheable and self._inverse_cache is not None and self._inverse_cache[0] == key:
            return self._inverse_cache[1]

        lower, upper = (factor.double() for factor in self.factors())
        eye = torch.eye(lower.shape[0], dtype=torch.float64, device=lower.device)
        lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False)
        upper_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        inverse = (upper_inv @ lower_inv).to(self.l.dtype) @ self.p.T

        if cacheable:
            inverse = inverse.detach()
            self._inverse_cache = (key, inverse)
        return inverse

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        weight = self.weight()
        logdet = spatial_size(x) * self.log_s.sum()

        return F.conv2d(x, weight[:, :, None, None]), logdet.expand(x.shape[0])

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        weight = self.inverse_weight()
        logdet = -spatial_size(z) * self.log_s.sum()

        return F.conv2d(z, weight[:, :, None, None]), logdet.expand(z.shape[0])


def squeeze(x: Tensor) -> Tensor:
    """Space-to-depth by 2: (B, C, H, W) -> (B, 4C, H/2, W/2), channel c*4 + 2*dy + dx."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2)

    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unsqueeze(z: Tensor) -> Tensor:
    """Depth-to-space by 2, the inverse of :func:`squeeze`."""
    b, c, h, w = z.shape
    z = z.view(b, c // 4, 2, 2, h, w)

    return z.permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


class ZeroConv2d(nn.Module):
    """3x3 convolution whose output is scaled by exp(3 * logs); starts at exactly zero."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()

        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv2d(x, self.weight, self.bias, padding=1)

        return y * (ZERO_CONV_LOGSCALE_FACTOR * self.logs).exp()


class NormalizedConv(nn.Module):
    """Convolution without bias followed by a (non-invertible use of) ActNorm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()

        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        nn.init.normal_(self.conv.weight, std=0.05)
        self.actnorm = ActNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.actnorm.normalize(self.conv(x))


class CouplingNet(nn.Module):
    """3x3 conv, ActNorm, ReLU, 1x1 conv, ActNorm, ReLU, zero-initialised 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int):
        super().__init__()

        self.conv_in = NormalizedConv(in_channels, hidden, 3)
        self.conv_hidden = NormalizedConv(hidden, hidden, 1)
        self.conv_out = ZeroConv2d(hidden, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv_in(x))
        x = F.relu(self.conv_hidden(x))

        return self.conv_out(x)


def shift_and_scale(h: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Shift from the even channels of a net output, a positive scale from the odd ones."""
    shift = h[:, 0::2]
    scale = torch.sigmoid(h[:, 1::2] + SIGMOID_OFFSET) + eps

    return shift, scale


def sum_log(scale: Tensor) -> Tensor:
    return scale.log().flatten(1).sum(1)


class ConditionalAffineCoupling(nn.Module):
    """Affine coupling of the second channel half, from the first half and the condition.

    Encoding: z2 <- z2 / scale - shift, with (shift, scale) = net([z1, cond]).

    Arguments:
        channels: channels C of the flow tensor (the first C // 2 condition the rest).
        cond_channels: channels of the condition feature map at this level.
        hidden: width of the coupling network.
        eps: lower bound of the scale.
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int, eps: float):
        super().__init__()

        self.n_kept = channels // 2
        self.eps = eps
        self.net = CouplingNet(self.n_kept + cond_channels, 2 * (channels - self.n_kept), hidden)

    def parameters_from(self, kept: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        return shift_and_scale(self.net(torch.cat([kept, cond], dim=1)), self.eps)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        kept, changed = x[:, : self.n_kept], x[:, self.n_kept :]
        shift, scale = self.parameters_from(kept, cond)

        changed = changed / scale - shift

        return torch.cat([kept, changed], dim=1), -sum_log(scale)

    def inverse(self, z: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        kept, changed = z[:, : self.n_kept], z[:, self.n_kept :]
        shift, scale = self.parameters_from(kept, cond)

        changed = (changed + shift) * scale

        return torch.cat([kept, changed], dim=1), sum_log(scale)


class AffineInjector(nn.Module):
    """Affine map of all channels whose scale and shift come from the condition alone.

    Encoding: z <- z / scale - shift, with (shift, scale) = net(cond).
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int, eps: float):
        super().__init__()

        self.eps = eps
        self.net = CouplingNet(cond_channels, 2 * channels, hidden)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        shift, scale = shift_and_scale(self.net(cond), self.eps)

        return x / scale - shift, -sum_log(scale)

    def inverse(self, z: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        shift, scale = shift_and_scale(self.net(cond), self.eps)

        return (z + shift) * scale, sum_log(scale)


class FlowStep(nn.Module):
    """ActNorm, invertible 1x1 conv and, optionally, conditional coupling and affine injector."""

    def __init__(self, channels: int, cond_channels: int, hidden: int, eps: float, coupling: bool):
        super().__init__()

        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels)
        self.coupling = None
        self.injector = None
        if coupling:
            self.coupling = ConditionalAffineCoupling(channels, cond_channels, hidden, eps)
            self.injector = AffineInjector(channels, cond_channels, hidden, eps)

    def layers(self) -> list[nn.Module]:
        return [m for m in (self.actnorm, self.invconv, self.coupling, self.injector) if m]

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers():
            x, layer_logdet = layer(x, cond)
            logdet = logdet + layer_logdet

        return x, logdet

    def inverse(self, z: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        logdet = z.new_zeros(z.shape[0])
        for layer in reversed(self.layers()):
            z, layer_logdet = layer.inverse(z, cond)
            logdet = logdet + layer_logdet

        return z, logdet


class Split(nn.Module):
    """Factor out the second channel half as a latent, whitened by a prior learned from the first.

    ``forward`` returns ``(kept, latent, logdet)``; the log-density of the latent itself is left
    to the caller, which knows the domain.
    """

    def __init__(self, channels: int):
        super().__init__()

        self.n_kept = channels // 2
        self.prior = ZeroConv2d(self.n_kept, 2 * (channels - self.n_kept))

    def mean_and_logs(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        h = self.prior(kept)

        return h[:, 0::2], h[:, 1::2]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        kept, factored = x[:, : self.n_kept], x[:, self.n_kept :]
        mean, logs = self.mean_and_logs(kept)

        latent = (factored - mean) * (-logs).exp()

        return kept, latent, -logs.flatten(1).sum(1)

    def inverse(self, kept: Tensor, latent: Tensor) -> tuple[Tensor, Tensor]:
        mean, logs = self.mean_and_logs(kept)

        factored = mean + logs.exp() * latent

        return torch.cat([kept, factored], dim=1), logs.flatten(1).sum(1)


def gaussian_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over all but the batch axis."""
    return (-0.5 * (z**2 + math.log(2 * math.pi))).flatten(1).sum(1)
