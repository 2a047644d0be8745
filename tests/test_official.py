"""The model against checkpoints, vectors and manifests made with the official DeFlow code."""

import json
import math
import pickle

import numpy as np
import pytest
import torch

from deflow_synth.checkpoint import load_model
from deflow_synth.config import preset
from deflow_synth.errors import CheckpointError
from deflow_synth.model import DeFlow
from deflow_synth.official import convert_state_dict, flow_layer_names, native_key

from .conftest import REFERENCE

ATOL = 1e-4
SCALES = (8, 4)


@pytest.fixture(scope="module", params=SCALES, ids=lambda s: f"x{s}")
def tiny(request):
    scale = request.param
    model = load_model(
        REFERENCE / f"tiny/DeFlow-tiny-x{scale}.pth",
        REFERENCE / f"configs/DeFlow-tiny-x{scale}.yml",
    )
    vectors = dict(np.load(REFERENCE / f"tiny/DeFlow-tiny-x{scale}-vectors.npz"))
    tensors = {k: torch.from_numpy(v) for k, v in vectors.items() if v.dtype.kind != "U"}
    with torch.no_grad():
        cond = model.condition(tensors["lq"])
    return model, tensors, cond


def close(actual, expected, atol=ATOL):
    error = (actual - expected).abs().max().item()
    assert error <= atol, f"max abs error {error:.3g} > {atol}"


def test_condition_features(tiny):
    model, v, cond = tiny
    with torch.no_grad():
        block_outputs = {}
        feature = model.encoder.conv_first(v["lq"])
        for index, block in enumerate(model.encoder.body):
            feature = block(feature)
            block_outputs[index] = feature

    names = [k for k in v if k.startswith("cond_level") and not k.endswith("__shape")]
    assert len(names) >= 7
    for name in names:
        level = int(name[len("cond_level")]) - 1
        feature = cond[level]
        if name.endswith("__crop8x8"):
            close(feature[:, :, :8, :8], v[name])
        elif name.endswith("__chan_mean"):
            close(feature.mean((2, 3)), v[name])
        elif name.endswith("__chan_absmean"):
            close(feature.abs().mean((2, 3)), v[name])
        else:
            close(feature, v[name])
        shape = v.get(name.split("__")[0] + "__shape")
        if shape is not None:
            assert tuple(feature.shape) == tuple(shape.tolist())

    blocks = [k for k in v if k.startswith("rrdb_block_")]
    assert len(blocks) == 4
    for name in blocks:
        close(block_outputs[int(name.rsplit("_", 1)[1])], v[name])


def official_encoding_logdet(model, latents, logdet, labels):
    """The official logdet includes the split latents' log-density."""
    return logdet + sum(s.log_prob(z, labels) for s, z in zip(model.shifts[:-1], latents[:-1]))


def test_encoding(tiny):
    model, v, cond = tiny
    with torch.no_grad():
        latents, logdet = model.flow_forward(v["gt"], cond)
        log_p = model.latent_log_prob(latents, v["y_label"]) + logdet

    close(latents[0], v["enc_eps_0"])
    close(latents[1], v["enc_eps_1"])
    official_logdet = official_encoding_logdet(model, latents, logdet, v["y_label"])
    torch.testing.assert_close(official_logdet, v["enc_logdet"], rtol=1e-5, atol=0)

    height, width = v["gt"].shape[2:]
    nll_bits_per_pixel = -log_p / (math.log(2) * height * width)
    close(nll_bits_per_pixel, v["enc_nll"])


def test_encode_api_reports_bits_per_dim(tiny):
    model, v, cond = tiny
    noise = torch.full_like(v["gt"], 0.5)
    with torch.no_grad():
        latents, nll = model.encode(v["gt"], cond, v["y_label"], dequant_noise=noise)

    quant_bits_per_pixel = math.log2(model.config.dequant_bins)
    close(nll * 3, v["enc_nll"] + quant_bits_per_pixel)
    close(latents[1], v["enc_eps_1"])


def test_encoding_trace_per_layer(tiny):
    model, v, cond = tiny
    from deflow_synth.flow import squeeze

    outputs, x = [], v["gt"]
    with torch.no_grad():
        for level, level_cond in zip(model.levels, cond):
            x = squeeze(x)
            outputs.append(x)
            for step in level.steps:
                x, _ = step(x, level_cond)
                outputs.append(x)
            if level.split is not None:
                x, _, _ = level.split(x)
                outputs.append(x)
            if level is model.levels[0]:
                close(outputs[-2], v["trace_enc_level1_out"])
            if level is model.levels[1]:
                close(x, v["trace_enc_level2_out"])

    assert len(outputs) == len(v["trace_enc_z_mean"]) == 16
    for output, mean, std in zip(outputs, v["trace_enc_z_mean"], v["trace_enc_z_std"]):
        close(output.mean((1, 2, 3)), mean)
        close(output.std((1, 2, 3)), std)


def official_decoding_logdet(model, latents, logdet, labels):
    """The official decoding logdet subtracts the split latents' log-density."""
    return logdet - sum(s.log_prob(z, labels) for s, z in zip(model.shifts[:-1], latents[:-1]))


def test_reconstruction(tiny):
    model, v, cond = tiny
    latents = [v["enc_eps_0"], v["enc_eps_1"]]
    with torch.no_grad():
        x, logdet = model.flow_inverse(latents, cond)

    close(x, v["rec_x"])
    close(x, v["gt"])
    official = official_decoding_logdet(model, latents, logdet, v["y_label"])
    torch.testing.assert_close(official, v["rec_logdet"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("label", [0, 1])
def test_decoding_with_each_label(tiny, label):
    model, v, cond = tiny
    latents = [v["dec_in_eps_0"], v["dec_in_eps_1"]]
    labels = torch.full((2,), label)
    with torch.no_grad():
        x, logdet = model.flow_inverse(latents, cond)
        official = official_decoding_logdet(model, latents, logdet, labels)

    close(x, v["dec_x"])
    torch.testing.assert_close(official, v[f"dec_logdet_label{label}"], rtol=1e-5, atol=0)
    if label == 1:
        _, dequant_logdet = model.dequantize(v["dec_x"], torch.zeros_like(v["dec_x"]))
        with_noise = official - dequant_logdet
        torch.testing.assert_close(
            with_noise, v["dec_logdet_label1_addgtnoise"], rtol=1e-5, atol=0
        )


def test_sampling_with_supplied_noise(tiny):
    model, v, cond = tiny
    with torch.no_grad():
        x = model.sample(
            cond,
            v["y_label"],
            temperature=1.0,
            eps=[v["dec_in_eps_0"], v["dec_in_eps_1"]],
            shift_noise=[v["noise_u_0"], v["noise_u_1"]],
        )
        expected = model.denormalize_colors(v["sample_x"], v["y_label"])

    close(x, expected)


def test_translation_both_directions(tiny, monkeypatch):
    model, v, cond = tiny
    for index, shift in enumerate(model.shifts):
        precision, factor = shift.posterior()
        stored = v[f"translate_svd_U_{index}"] * v[f"translate_svd_S_{index}"].sqrt()
        close(factor @ factor.T, stored @ stored.T, atol=1e-5)
        monkeypatch.setattr(shift, "posterior", lambda p=precision, f=stored: (p, f))

    latents = [v["enc_eps_0"], v["enc_eps_1"]]
    with torch.no_grad():
        moved = model.shift_latents(latents, v["y_label"], 1.0, [v["noise_u_0"], v["noise_u_1"]])
        y = model.decode(moved, cond)

    close(y, v["translate_x"])


def manifest_keys(name):
    manifest = json.loads((REFERENCE / "manifests" / name).read_text())
    return manifest["keys"]


@pytest.mark.parametrize(
    "name, preset_name",
    [
        ("DeFlow-AIM-RWSR-manifest.json", "aim-x8"),
        ("DeFlow-NTIRE-RWSR-manifest.json", "ntire-x4"),
        ("DeFlow-DPED-RWSR-manifest.json", "ntire-x4"),
    ],
)
def test_full_manifest_keys_map_onto_presets(name, preset_name):
    config = preset(preset_name, dequant_bins=32, shift_init_std=0.0)
    with torch.device("meta"):
        model = DeFlow(config)
    native = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    layers = flow_layer_names(config)
    mapped = {}
    for key, shape, _, _ in manifest_keys(name):
        target = native_key(key, config, layers)
        if target is None:
            continue
        assert target in native, f"{key} -> {target} is not a model key"
        assert native[target] == tuple(shape), f"{key}: shape {shape} vs {native[target]}"
        mapped[target] = key

    unmapped = [
        k for k in native
        if k not in mapped and not k.endswith(".initialized") and not k.startswith("color_")
    ]
    assert unmapped == []


def test_ignored_official_keys_are_the_ones_without_effect():
    manifest = json.loads((REFERENCE / "tiny/DeFlow-tiny-x8-manifest.json").read_text())
    config = preset("aim-x8", encoder_features=16, encoder_blocks=5, stacked_blocks=(1, 2, 3, 4),
                    n_coupling_steps=2, coupling_hidden=16)
    layers = flow_layer_names(config)
    ignored = {k for k, *_ in manifest["keys"] if native_key(k, config, layers) is None}

    facts = manifest["vector_facts"]
    expected = set(facts["params_without_effect"]) | set(facts["params_requires_grad_false"])
    assert ignored == expected


def test_module_prefix_is_tolerated():
    state = torch.load(REFERENCE / "tiny/DeFlow-tiny-x4.pth", weights_only=True)
    config = load_model(
        REFERENCE / "tiny/DeFlow-tiny-x4.pth", REFERENCE / "configs/DeFlow-tiny-x4.yml"
    ).config
    prefixed = {f"module.{k}": v for k, v in state.items()}

    assert convert_state_dict(prefixed, config).keys() == convert_state_dict(state, config).keys()


class Exploit:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as file:
        pickle.dump({"weights": Exploit()}, file)

    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(path, REFERENCE / "configs/DeFlow-tiny-x4.yml")


def test_official_checkpoint_needs_its_yaml():
    with pytest.raises(CheckpointError, match="YAML"):
        load_model(REFERENCE / "tiny/DeFlow-tiny-x4.pth")
