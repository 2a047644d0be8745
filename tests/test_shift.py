"""The domain shift: densities, the degradation noise and the clean posterior."""

import torch
from torch.distributions import MultivariateNormal

from deflow_synth.shift import CLEAN, DEGRADED, DomainShift


def shift_with(channels=3, seed=0):
    torch.manual_seed(seed)
    shift = DomainShift(channels, init_std=0.5)
    return shift


def test_log_prob_matches_multivariate_normal():
    shift = shift_with()
    z = torch.randn(2, 3, 4, 5)

    covariance = torch.eye(3) + shift.matrix @ shift.matrix.T
    degraded = MultivariateNormal(shift.mean, covariance)
    clean = MultivariateNormal(torch.zeros(3), torch.eye(3))
    per_position = z.movedim(1, -1)

    expected_degraded = degraded.log_prob(per_position).sum((1, 2))
    expected_clean = clean.log_prob(per_position).sum((1, 2))

    torch.testing.assert_close(shift.log_prob(z, DEGRADED), expected_degraded)
    torch.testing.assert_close(shift.log_prob(z, CLEAN), expected_clean)
    mixed = shift.log_prob(z, torch.tensor([CLEAN, DEGRADED]))
    torch.testing.assert_close(mixed, torch.stack([expected_clean[0], expected_degraded[1]]))


def test_matrix_learns_from_a_small_start():
    shift = DomainShift(4, init_std=1e-2)
    z = 3 * torch.randn(8, 4, 2, 2)

    (-shift.log_prob(z, DEGRADED).sum()).backward()

    assert shift.matrix.grad.abs().max() > 0
    assert shift.mean.grad.abs().max() > 0


def test_matrix_at_exactly_zero_gets_no_gradient():
    shift = DomainShift(4, init_std=0.0)
    z = 3 * torch.randn(8, 4, 2, 2)

    (-shift.log_prob(z, DEGRADED).sum()).backward()

    assert shift.matrix.grad.abs().max() == 0


def test_shift_noise_has_the_learned_moments():
    shift = shift_with()
    noise = torch.randn(4000, 3, 1, 1)

    with torch.no_grad():
        u = shift.shift(noise).flatten(1)

    torch.testing.assert_close(u.mean(0), shift.mean.detach(), atol=0.08, rtol=0)
    expected = (shift.matrix @ shift.matrix.T).detach()
    torch.testing.assert_close(torch.cov(u.T), expected, atol=0.15, rtol=0.05)


def test_posterior_is_the_gaussian_conditional():
    shift = shift_with(channels=2)
    with torch.no_grad():
        precision, factor = shift.posterior()
        gram = shift.matrix @ shift.matrix.T

        # Joint of (z_clean, z_degraded): conditional mean and covariance from block formulas.
        expected_cov = torch.eye(2) - torch.linalg.inv(torch.eye(2) + gram)
        torch.testing.assert_close(factor @ factor.T, expected_cov, atol=1e-6, rtol=0)
        torch.testing.assert_close(precision, torch.linalg.inv(torch.eye(2) + gram))

        z = torch.randn(1, 2, 1, 1)
        zero = torch.zeros_like(z)
        mean = shift.to_clean(z, zero)
        expected_mean = precision @ (z.flatten() - shift.mean)
        torch.testing.assert_close(mean.flatten(), expected_mean)
