"""Saving and loading models without executing code from the file.

Native checkpoints are ``torch.save`` dicts of tensors, strings and numbers, read back with
``weights_only=True``: the architecture config, the state dict and the model card. Official
DeFlow ``.pth`` files (a flat state dict) are read the same way, with their YAML config.
"""

import hashlib
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write
from .config import DeFlowConfig
from .errors import CheckpointError
from .model import DeFlow
from .official import config_from_yaml, convert_state_dict

FORMAT = "deflow-synth"
FORMAT_VERSION = 1
PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
DEFAULT_MODEL_NAME = "deflow-small-x4.pt"


def default_model_path() -> Path:
    """The shipped default model."""
    override = os.environ.get("DEFLOW_SYNTH_MODEL")
    return Path(override) if override else PRETRAINED_DIR / DEFAULT_MODEL_NAME


def atomic_torch_save(payload: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``."""
    with atomic_write(path, durable=True) as file:
        torch.save(payload, file)


def save_model(model: DeFlow, path: Path, card: dict[str, Any] | None = None) -> None:
    """Write the model (config, weights, card) atomically in the native format."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": state,
        "card": json.dumps(card or {}),
    }
    atomic_torch_save(payload, path)


def safe_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load that only accepts tensors and plain containers; anything else is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():
            # Files from other pickle protocols draw a warning before they are refused.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to load: not a checkpoint of tensors and plain containers (it is "
            "damaged, not a checkpoint, or holds objects that could run code when unpickled)"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({error})") from error


def is_native(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def model_from_native(payload: dict[str, Any], path: Path) -> DeFlow:
    if payload.get("format_version") != FORMAT_VERSION:
        version = payload.get("format_version")
        raise CheckpointError(f"{path}: unsupported format version {version}")
    try:
        config = DeFlowConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid model config ({error})") from error

    model = DeFlow(config)
    load_weights(model, payload["state_dict"], path)
    return model


def model_from_official(state: dict[str, Any], yaml: Path | None, path: Path) -> DeFlow:
    if yaml is None:
        raise CheckpointError(f"{path}: an official DeFlow checkpoint needs its YAML (--yaml)")
    config, stats = config_from_yaml(yaml)

    model = DeFlow(config)
    converted = convert_state_dict(state, config)
    for name, buffer in model.state_dict().items():
        if name.endswith(".initialized"):
            converted[name] = torch.tensor(True)
        elif name in ("color_mean", "color_std"):
            converted[name] = buffer
    load_weights(model, converted, path)

    if stats is not None:
        model.set_color_stats(**{k: torch.tensor(v) for k, v in stats.items()})
    return model


def load_weights(model: DeFlow, state: dict[str, Any], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit the model ({error})") from error


def load_model(
    path: Path, yaml: Path | None = None, device: str | torch.device = "cpu"
) -> DeFlow:
    """A DeFlow model in eval mode from a native checkpoint or an official .pth with its YAML."""
    path = Path(path)
    payload = safe_load(path)

    if is_native(payload):
        model = model_from_native(payload, path)
    elif isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        model = model_from_official(payload, yaml, path)
    else:
        raise CheckpointError(f"{path}: not a DeFlow checkpoint (native or official)")

    return model.to(device).eval()


def read_card(path: Path) -> dict[str, Any]:
    """The model card stored in a native checkpoint (empty for official files)."""
    payload = safe_load(path)
    if not is_native(payload):
        return {}
    return json.loads(payload.get("card") or "{}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_model(path: Path | None, yaml: Path | None = None) -> str:
    """A short human-readable description of a model file (the default one when None)."""
    path = Path(path) if path is not None else default_model_path()
    model = load_model(path, yaml)
    n_parameters = sum(p.numel() for p in model.parameters())
    lines = [
        f"model: {path}",
        f"sha256: {file_sha256(path)[:16]}",
        f"parameters: {n_parameters:,}",
        f"config: {json.dumps(model.config.to_dict())}",
    ]
    card = read_card(path)
    if card:
        lines.append(f"card: {json.dumps(card, indent=2)}")

    return "\n".join(lines)


def describe_devices() -> str:
    """The devices a model can run on here."""
    if torch.cuda.is_available():
        return f"devices: cpu, cuda ({torch.cuda.get_device_name()})"
    return "devices: cpu"
