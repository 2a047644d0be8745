"""The learned domain shift: clean latents are N(0, I), degraded ones N(mean, I + M M^T)."""

import math

import torch
from torch import Tensor, nn

from .flow import gaussian_log_prob

CLEAN = 0
DEGRADED = 1


def domain_mask(domain: int | Tensor, batch: int, device: torch.device) -> Tensor:
    """Boolean (B,) mask of the degraded samples, from an int or a (B,) label tensor."""
    if isinstance(domain, int):
        return torch.full((batch,), domain == DEGRADED, device=device)

    return domain.to(device) == DEGRADED


def full_gaussian_log_prob(z: Tensor, mean: Tensor, covariance: Tensor) -> Tensor:
    """log N(z; mean, covariance) along channels at every position of (B, C, H, W), summed."""
    channels = z.shape[1]
    cholesky = torch.linalg.cholesky(covariance)

    centred = (z - mean[None, :, None, None]).movedim(1, -1).reshape(-1, channels)
    whitened = torch.linalg.solve_triangular(cholesky, centred.T, upper=False)
    mahalanobis = (whitened**2).sum(0).view(z.shape[0], -1).sum(1)

    log_det = 2 * torch.diagonal(cholesky).log().sum()
    positions = z.shape[2] * z.shape[3]

    return -0.5 * (mahalanobis + positions * (channels * math.log(2 * math.pi) + log_det))


class DomainShift(nn.Module):
    """Mean and mixing matrix of the degradation u ~ N(mean, M M^T) for one latent.

    Both are shared over spatial positions and act along channels. They start at small random
    values: at M = 0 the gradient of any loss through M M^T vanishes and M would never learn.

    Arguments:
        channels: channels C of the latent (B, C, H, W).
        init_std: std of the random initial mean and matrix entries.
    """

    def __init__(self, channels: int, init_std: float = 1e-2):
        super().__init__()

        self.mean = nn.Parameter(init_std * torch.randn(channels))
        self.matrix = nn.Parameter(init_std * torch.randn(channels, channels))

    def covariance(self) -> Tensor:
        """I + M M^T, the covariance of degraded latents."""
        eye = torch.eye(self.matrix.shape[0], device=self.matrix.device, dtype=self.matrix.dtype)

        return eye + self.matrix @ self.matrix.T

    def degraded_log_prob(self, z: Tensor) -> Tensor:
        """log N(z; mean, I + M M^T) per position over channels, summed; shape (B,)."""
        return full_gaussian_log_prob(z, self.mean, self.covariance())

    def difference_log_prob(self, difference: Tensor, floor: float) -> Tensor:
        """log N(d; mean, M M^T + floor I) of latent differences d = z_degraded - z_clean."""
        eye = torch.eye(self.matrix.shape[0], device=self.matrix.device, dtype=self.matrix.dtype)
        covariance = self.matrix @ self.matrix.T + floor * eye

        return full_gaussian_log_prob(difference, self.mean, covariance)

    def log_prob(self, z: Tensor, domain: int | Tensor) -> Tensor:
        """Log-density of each latent under its domain's distribution; shape (B,)."""
        degraded = domain_mask(domain, z.shape[0], z.device)
        clean_lp = gaussian_log_prob(z)
        if not degraded.any():
            return clean_lp

        return torch.where(degraded, self.degraded_log_prob(z), clean_lp)

    def shift(self, noise: Tensor) -> Tensor:
        """The degradation u = mean + M n for standard-normal n of shape (B, C, H, W)."""
        mixed = torch.einsum("ij,bjhw->bihw", self.matrix, noise)

        return self.mean[None, :, None, None] + mixed

    def posterior(self) -> tuple[Tensor, Tensor]:
        """(P, R) of the clean latent given a degraded one: mean P (z - mean), std factor R.

        With z_degraded = z_clean + u, the clean latent's posterior is N(P (z - mean), R R^T)
        where P = (I + M M^T)^-1 and R R^T = M M^T P (symmetric, as the two commute).
        """
        matrix = self.matrix.double()
        gram = matrix @ matrix.T
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        precision = torch.linalg.inv(eye + gram)
        posterior_cov = gram @ precision

        values, vectors = torch.linalg.eigh(0.5 * (posterior_cov + posterior_cov.T))
        factor = vectors * values.clamp_min(0).sqrt()

        return precision.to(self.matrix.dtype), factor.to(self.matrix.dtype)

    def to_clean(self, z: Tensor, noise: Tensor) -> Tensor:
        """A clean latent drawn from the posterior given degraded latent z and std-normal noise."""
        precision, factor = self.posterior()
        centred = z - self.mean[None, :, None, None]

        mean = torch.einsum("ij,bjhw->bihw", precision, centred)

        return mean + torch.einsum("ij,bjhw->bihw", factor, noise)
