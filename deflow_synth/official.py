"""Checkpoints of the official DeFlow implementation: YAML configs and state-dict key names.

The official code saves a flat ``name -> tensor`` dict of its ``RRDBGlowNet``. Its flow layers
are numbered in encoding order (per level: a squeeze, the plain steps, the coupling steps and,
on split levels, a split), the coupling of a step holds ``fAffine`` (our conditional coupling)
and ``fFeatures`` (our affine injector), and the domain shift of the top latent sits at the root.
"""

import re
from pathlib import Path
from typing import Any

import torch

from .config import DeFlowConfig
from .errors import CheckpointError

# The official code counts stacked features as nf * (blocks + 1); ours matches for any width.
OFFICIAL_QUANT_DEFAULT = 32

# Coupling-network layers: official sequential index -> our submodule.
_NET_LAYERS = {"0": "conv_in", "2": "conv_hidden", "4": "conv_out"}
_NET_PARTS = {
    "weight": "conv.weight",
    "actnorm.bias": "actnorm.bias",
    "actnorm.logs": "actnorm.logs",
}


def config_from_yaml(path: Path) -> tuple[DeFlowConfig, dict[str, Any] | None]:
    """The architecture of an official YAML config and its colour statistics (or None)."""
    import yaml

    try:
        options = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise CheckpointError(f"{path}: cannot read the DeFlow YAML config ({error})") from error
    if not isinstance(options, dict) or "network_G" not in options:
        raise CheckpointError(f"{path}: not an official DeFlow config (no 'network_G' section)")

    network = options["network_G"]
    flow = network.get("flow", {})
    coupling = flow.get("CondAffineSeparatedAndCond", {})
    train_data = options.get("datasets", {}).get("train", {})
    n_levels = flow.get("L", 3)

    if not flow.get("noInitialInj", False):
        raise CheckpointError(f"{path}: configs with an initial injector are not supported")
    config = DeFlowConfig(
        scale=options["scale"],
        in_channels=network.get("in_nc", 3),
        n_levels=n_levels,
        n_coupling_steps=flow["K"],
        n_plain_steps=flow.get("additionalFlowNoAffine", 0),
        split_levels=tuple(range(1, n_levels - 1)) if flow.get("split", {}).get("enable") else (),
        coupling_hidden=coupling.get("hidden_channels", 64),
        coupling_eps=coupling.get("eps", 1e-4),
        encoder_features=network["nf"],
        encoder_blocks=network["nb"],
        stacked_blocks=tuple(flow["stackRRDB"]["blocks"]),
        cond_noise_std=flow.get("LR_noise_std", 0.0),
        dequant_bins=train_data.get("quant", OFFICIAL_QUANT_DEFAULT),
        dequant_logdet_per_pixel=True,
        shift_init_std=0.0,
        color_normalization="normalize" in train_data,
    )

    stats = train_data.get("normalize")
    if stats is not None:
        stats = {
            "mean_clean": [v / 255 for v in stats["mean_clean_hr"]],
            "std_clean": [v / 255 for v in stats["std_clean_hr"]],
            "mean_degraded": [v / 255 for v in stats["mean_noisy_hr"]],
            "std_degraded": [v / 255 for v in stats["std_noisy_hr"]],
        }
    return config, stats


def flow_layer_names(config: DeFlowConfig) -> dict[int, str]:
    """Official flow layer index -> our module path (squeezes have no parameters)."""
    names, index = {}, 0
    for level in range(config.n_levels):
        index += 1
        for step in range(config.n_plain_steps + config.n_coupling_steps):
            names[index] = f"levels.{level}.steps.{step}"
            index += 1
        if level + 1 in config.split_levels:
            names[index] = f"levels.{level}.split"
            index += 1

    return names


def split_shift_index(config: DeFlowConfig, level_path: str) -> int:
    level = int(level_path.split(".")[1]) + 1

    return sorted(config.split_levels).index(level)


def native_key(key: str, config: DeFlowConfig, layers: dict[int, str]) -> str | None:
    """Our state-dict key for an official one; None for entries without any effect."""
    top_shift = f"shifts.{len(config.split_levels)}"
    n_up = len(_up_factors(config))

    if key in ("I", "flowUpsamplerNet.f.0.weight", "flowUpsamplerNet.f.0.bias"):
        return None
    if key == "mean_shift":
        return f"{top_shift}.mean"
    if key == "cov_shift":
        return f"{top_shift}.matrix"

    if key.startswith("RRDB."):
        return _encoder_key(key[len("RRDB."):], n_up)

    match = re.fullmatch(r"flowUpsamplerNet\.layers\.(\d+)\.(.+)", key)
    if match is None or int(match[1]) not in layers:
        raise CheckpointError(f"unexpected key {key!r} for this configuration")
    prefix, rest = layers[int(match[1])], match[2]

    if prefix.endswith(".split"):
        return _split_key(prefix, rest, config)
    return _step_key(prefix, rest)


def _up_factors(config: DeFlowConfig) -> list[float]:
    return [f for f in config.feature_factors if f > 1]


def _encoder_key(rest: str, n_up: int) -> str | None:
    renames = {"conv_first.": "conv_first.", "trunk_conv.": "conv_body."}
    for old, new in renames.items():
        if rest.startswith(old):
            return "encoder." + new + rest[len(old):]

    match = re.fullmatch(r"RRDB_trunk\.(\d+)\.RDB(\d)\.(conv\d\.(?:weight|bias))", rest)
    if match:
        return f"encoder.body.{match[1]}.rdb{match[2]}.{match[3]}"

    match = re.fullmatch(r"upconv(\d)\.(weight|bias)", rest)
    if match:
        index = int(match[1]) - 1
        return f"encoder.conv_up.{index}.{match[2]}" if index < n_up else None

    if re.fullmatch(r"(HRconv|conv_last)\.(weight|bias)", rest):
        return None
    raise CheckpointError(f"unexpected encoder key 'RRDB.{rest}'")


def _split_key(prefix: str, rest: str, config: DeFlowConfig) -> str | None:
    shift = f"shifts.{split_shift_index(config, prefix)}"
    names = {
        "I": None,
        "mean_shift": f"{shift}.mean",
        "cov_shift": f"{shift}.matrix",
        "conv.weight": f"{prefix}.prior.weight",
        "conv.bias": f"{prefix}.prior.bias",
        "conv.logs": f"{prefix}.prior.logs",
    }
    if rest not in names:
        raise CheckpointError(f"unexpected split key {rest!r} in {prefix}")
    return names[rest]


def _step_key(prefix: str, rest: str) -> str:
    if re.fullmatch(r"(actnorm\.(bias|logs)|invconv\.(l|log_s|u|p|sign_s))", rest):
        return f"{prefix}.{rest}"

    match = re.fullmatch(r"affine\.(fAffine|fFeatures)\.(\d)\.(.+)", rest)
    if match is None or match[2] not in _NET_LAYERS:
        raise CheckpointError(f"unexpected flow-step key {rest!r} in {prefix}")
    part = "coupling" if match[1] == "fAffine" else "injector"
    layer = _NET_LAYERS[match[2]]
    tail = match[3] if layer == "conv_out" else _NET_PARTS.get(match[3])
    if tail is None:
        raise CheckpointError(f"unexpected coupling-net key {rest!r} in {prefix}")

    return f"{prefix}.{part}.net.{layer}.{tail}"


def convert_state_dict(
    official: dict[str, torch.Tensor], config: DeFlowConfig
) -> dict[str, torch.Tensor]:
    """Our state dict (without native-only buffers) from an official one."""
    layers = flow_layer_names(config)
    converted = {}
    for key, value in official.items():
        key = key.removeprefix("module.")
        name = native_key(key, config, layers)
        if name is not None:
            converted[name] = value

    return converted
