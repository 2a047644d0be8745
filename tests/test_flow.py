"""Every flow layer: exact inverse, and log-determinant equal to autograd's Jacobian."""

import pytest
import torch

from deflow_synth.flow import (
    ActNorm,
    AffineInjector,
    ConditionalAffineCoupling,
    FlowStep,
    InvConv1x1,
    Split,
    squeeze,
    unsqueeze,
)


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

CHANNELS, COND_CHANNELS, SIZE = 4, 3, 3


def randomize(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Move every parameter away from its (often zero) start, keeping the module valid."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(std * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def jacobian_logdet(function, x: torch.Tensor) -> torch.Tensor:
    jacobian = torch.autograd.functional.jacobian(lambda v: function(v).flatten(), x)
    return torch.linalg.slogdet(jacobian.reshape(x.numel(), x.numel()))[1]


LAYERS = {
    "actnorm": lambda: ActNorm(CHANNELS),
    "invconv": lambda: InvConv1x1(CHANNELS),
    "coupling": lambda: ConditionalAffineCoupling(CHANNELS, COND_CHANNELS, 5, 1e-3),
    "injector": lambda: AffineInjector(CHANNELS, COND_CHANNELS, 5, 1e-3),
    "plain step": lambda: FlowStep(CHANNELS, COND_CHANNELS, 5, 1e-3, coupling=False),
    "coupling step": lambda: FlowStep(CHANNELS, COND_CHANNELS, 5, 1e-3, coupling=True),
}


@pytest.fixture(params=LAYERS, ids=str)
def layer(request):
    return randomize(LAYERS[request.param]().double())


def inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, CHANNELS, SIZE, SIZE, generator=generator)
    cond = torch.randn(1, COND_CHANNELS, SIZE, SIZE, generator=generator)
    return x, cond


def test_inverse_restores_input(layer):
    x, cond = inputs()
    x = x.expand(3, -1, -1, -1)
    cond = cond.expand(3, -1, -1, -1)

    z, logdet = layer(x, cond)
    restored, inverse_logdet = layer.inverse(z, cond)

    torch.testing.assert_close(restored, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet + inverse_logdet, torch.zeros(3), atol=1e-10, rtol=0)
    assert logdet.shape == (3,)


def test_logdet_matches_autograd(layer):
    x, cond = inputs()

    _, logdet = layer(x, cond)
    expected = jacobian_logdet(lambda v: layer(v, cond)[0], x)

    torch.testing.assert_close(logdet[0], expected, atol=1e-8, rtol=1e-8)


def test_gradients_reach_every_parameter(layer):
    x, cond = inputs()
    layer.train()

    z, logdet = layer(x, cond)
    (z.square().sum() - logdet.sum()).backward()

    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_squeeze_layout_and_inverse():
    x = torch.arange(2 * 8 * 6, dtype=torch.float64).view(1, 2, 8, 6)

    z = squeeze(x)

    assert z.shape == (1, 8, 4, 3)
    # channel c * 4 + 2 * dy + dx holds pixel (2i + dy, 2j + dx) of channel c
    assert z[0, 1 * 4 + 2 * 1 + 0, 2, 1] == x[0, 1, 5, 2]
    torch.testing.assert_close(unsqueeze(z), x)


def test_split_inverse_and_logdet():
    split = randomize(Split(CHANNELS).double())
    x, _ = inputs()

    kept, latent, logdet = split(x)
    restored, inverse_logdet = split.inverse(kept, latent)

    torch.testing.assert_close(restored, x, atol=1e-10, rtol=0)
    expected = jacobian_logdet(lambda v: torch.cat(split(v)[:2], dim=1), x)
    torch.testing.assert_close(logdet[0], expected, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(logdet, -inverse_logdet)


def test_actnorm_initialises_from_data_once():
    norm = ActNorm(3).double().train()
    x = 5 + 3 * torch.randn(64, 3, 4, 4, dtype=torch.float64)

    y, _ = norm(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-10, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(3), atol=1e-10, rtol=0)

    bias = norm.bias.clone()
    norm(x * 10)
    torch.testing.assert_close(norm.bias, bias)
    assert "initialized" in norm.state_dict()


def test_invconv_caches_inverse_until_weights_change():
    conv = InvConv1x1(CHANNELS).double().eval()
    z = torch.randn(1, CHANNELS, 2, 2, dtype=torch.float64)

    with torch.no_grad():
        first = conv.inverse_weight()
        assert conv.inverse_weight() is first
        conv.log_s.add_(0.1)
        second = conv.inverse_weight()

    assert second is not first
    x, _ = conv.inverse(z)
    torch.testing.assert_close(conv(x)[0], z)
