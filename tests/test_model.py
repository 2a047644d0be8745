"""The whole DeFlow model: exact round trips, log-determinant, determinism and presets."""

import pytest
import torch

from deflow_synth.config import PRESETS, DeFlowConfig, preset
from deflow_synth.model import CLEAN, DEGRADED, DeFlow

from .conftest import tiny_config


def random_model(config: DeFlowConfig, seed: int = 0, std: float = 0.05) -> DeFlow:
    """A model whose zero-initialised parts are moved; 1x1 convs keep their random rotation."""
    torch.manual_seed(seed)
    model = DeFlow(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".invconv." not in name:
                parameter.add_(std * torch.randn_like(parameter))
    return model.eval()


def condition_of(model, x, seed=1):
    generator = torch.Generator().manual_seed(seed)
    h = model.condition_image(x)
    return model.condition(h, torch.randn(h.shape, generator=generator, dtype=h.dtype))


@pytest.mark.parametrize("batch, height, width", [(1, 8, 8), (3, 24, 40), (5, 16, 56)])
@pytest.mark.parametrize("domain", [CLEAN, DEGRADED])
def test_decode_inverts_encode(batch, height, width, domain):
    model = random_model(tiny_config())
    x = torch.rand(batch, 3, height, width)
    cond = condition_of(model, x)

    with torch.no_grad():
        latents, nll = model.encode(x, cond, domain, dequant_noise=torch.full_like(x, 0.5))
        restored = model.decode(latents, cond)

    assert (restored - x).abs().max() < 1e-4
    assert nll.shape == (batch,) and torch.isfinite(nll).all()
    assert [z.shape[1] for z in latents] == list(model.latent_channels)


def test_whole_flow_logdet_matches_autograd():
    model = random_model(tiny_config(), std=0.1).double()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    cond = [c.detach() for c in condition_of(model, x)]

    def flat_latents(v):
        return torch.cat([z.flatten() for z in model.flow_forward(v, cond)[0]])

    _, logdet = model.flow_forward(x, cond)
    jacobian = torch.autograd.functional.jacobian(flat_latents, x).reshape(192, 192)
    expected = torch.linalg.slogdet(jacobian)[1]

    torch.testing.assert_close(logdet[0], expected, atol=1e-4, rtol=1e-6)
    _, inverse_logdet = model.flow_inverse(model.flow_forward(x, cond)[0], cond)
    torch.testing.assert_close(inverse_logdet, -logdet, atol=1e-6, rtol=0)


def test_same_noise_gives_same_translation_and_temperature_zero_is_deterministic():
    model = random_model(tiny_config())
    x = torch.rand(2, 3, 16, 16)
    cond = condition_of(model, x)
    noise = [torch.randn(shape) for shape in model.latent_shapes(cond)]
    dequant = torch.rand_like(x)

    with torch.no_grad():
        first = model.translate(x, cond, CLEAN, 1.0, noise, dequant)
        second = model.translate(x, cond, CLEAN, 1.0, noise, dequant)
        cold = [model.translate(x, cond, CLEAN, 0.0, None, dequant) for _ in range(2)]
        other = model.translate(x, cond, CLEAN, 1.0, None, dequant)

    assert torch.equal(first, second)
    assert torch.equal(cold[0], cold[1])
    assert not torch.equal(first, other)


def test_translation_adds_the_shift_to_every_latent():
    model = random_model(tiny_config())
    x = torch.rand(1, 3, 16, 16)
    cond = condition_of(model, x)
    dequant = torch.rand_like(x)
    noise = [torch.randn(shape) for shape in model.latent_shapes(cond)]

    with torch.no_grad():
        y = model.translate(x, cond, CLEAN, 1.0, noise, dequant)
        latents_x, _ = model.encode(x, cond, CLEAN, dequant)
        latents_y, _ = model.flow_forward(y, cond)

    for shift, zx, zy, n in zip(model.shifts, latents_x, latents_y, noise):
        torch.testing.assert_close(zy - zx, shift.shift(n), atol=1e-3, rtol=0)


def test_reverse_translation_returns_a_clean_image():
    model = random_model(tiny_config())
    y = torch.rand(2, 3, 16, 16)
    cond = condition_of(model, y)

    with torch.no_grad():
        x = model.translate(y, cond, source=DEGRADED, temperature=0.0)

    assert x.shape == y.shape and torch.isfinite(x).all()


def test_sample_shapes_and_domain_dependence():
    model = random_model(tiny_config())
    cond = condition_of(model, torch.rand(2, 3, 16, 24))
    eps = [torch.randn(s) for s in model.latent_shapes(cond)]
    noise = [torch.randn(s) for s in model.latent_shapes(cond)]

    with torch.no_grad():
        clean = model.sample(cond, CLEAN, 0.8, eps, noise)
        degraded = model.sample(cond, DEGRADED, 0.8, eps, noise)

    assert clean.shape == (2, 3, 16, 24)
    assert not torch.allclose(clean, degraded)


def test_paired_nll_prefers_the_learned_shift():
    model = random_model(tiny_config())
    x = torch.rand(2, 3, 16, 16)
    cond = condition_of(model, x)
    dequant = torch.full_like(x, 0.5)

    with torch.no_grad():
        y = model.translate(x, cond, CLEAN, 1.0, None, dequant)
        likely = model.paired_nll(x, y, cond, dequant)
        unlikely = model.paired_nll(x, y + 0.2 * torch.randn_like(y), cond, dequant)

    assert (likely < unlikely).all()


def test_invalid_sizes_are_explained():
    model = random_model(tiny_config())
    x = torch.rand(1, 3, 12, 16)

    with pytest.raises(ValueError, match="multiples of 8"):
        model.flow_forward(x, condition_of(model, torch.rand(1, 3, 16, 16)))


def test_colour_normalisation_round_trip():
    model = random_model(tiny_config(color_normalization=True))
    model.set_color_stats(
        torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.2, 0.2]),
        torch.tensor([0.6, 0.5, 0.4]), torch.tensor([0.1, 0.15, 0.2]),
    )
    x = 0.45 + 0.3 * torch.rand(1, 3, 8, 8)

    normalized = model.normalize_colors(x, DEGRADED)

    torch.testing.assert_close(model.denormalize_colors(normalized, DEGRADED), x)
    assert torch.equal(model.normalize_colors(x, CLEAN), x)


def test_presets_build_with_expected_sizes():
    expected = {"aim-x8": 62_926_053, "ntire-x4": 39_732_389}
    for name, count in expected.items():
        with torch.device("meta"):
            model = DeFlow(preset(name))
        official_trainable = sum(p.numel() for p in model.parameters())
        assert official_trainable == count - unused_official_parameters(name)
    assert set(PRESETS) == {"small", "aim-x8", "ntire-x4"}


def unused_official_parameters(name: str) -> int:
    """Official parameters without effect that we do not build (SR head, last up-conv, f.0)."""
    nf, cond = 64, 320
    head = (nf * nf * 9 + nf) + (3 * nf * 9 + 3)
    last_up = nf * nf * 9 + nf
    initial_injector = 96 * cond * 9 + 96
    return head + last_up + initial_injector
