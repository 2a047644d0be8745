"""Check a trained run against held-out data and publish it as the shipped default model.

    python scripts/publish_pretrained.py runs/pretrained-small-x4 --data ../shared/data \
        --out pretrained --command "make pretrained"

Steps: pick the temperature whose pairs match the degraded training images best in noise
level (unpaired, like training); degrade the held-out clean photos (DATA/val/hr) with it; make
their bicubic counterparts; compare both, with `deflow-synth inspect`, against the true
degraded LR versions (DATA/val/lr) and against the degraded training images the run held out;
then write OUT/deflow-small-x4.pt whose card carries the training card, the temperature, these
figures, the command and licence notes, and the same card as OUT/deflow-small-x4.json.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from deflow_synth.checkpoint import load_model, read_card, save_model
from deflow_synth.data import (
    HELD_OUT_FRACTION,
    MAX_HELD_OUT,
    MIN_TRAINING_IMAGES,
    list_images,
    split_held_out,
)

MODEL_NAME = "deflow-small-x4"
LICENCE = (
    "Weights trained by deflow-synth on the project's shared photo set: natural photos from the "
    "Debian packages mate-backgrounds, plasma-workspace-wallpapers and lomiri-wallpapers-16.04 "
    "(mostly GPL or CC-BY-SA, see each package's copyright file) and, for evaluation only, "
    "scikit-image sample photos (public domain or CC0). Released under the project's licence."
)
CALIBRATION_TEMPERATURES = (0.25, 0.5, 0.75, 1.0)
SUMMARY_KEYS = ("channel_std", "intensity_std", "high_low_ratio", "block_ratio",
                "mean_color_correlation")


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def deflow(*arguments: str) -> None:
    run(str(Path(sys.executable).with_name("deflow-synth")), *arguments)


def held_out_degraded(degraded_dir: Path, work: Path) -> Path:
    """Copy the degraded images the training run held out (same rule as train) to a folder."""
    images, _ = list_images(degraded_dir, "degraded")
    _, held = split_held_out(images, HELD_OUT_FRACTION, MAX_HELD_OUT, MIN_TRAINING_IMAGES)
    folder = work / "held-out-degraded"
    folder.mkdir(parents=True, exist_ok=True)
    for path in held:
        shutil.copy2(path, folder / Path(path).name)
    return folder


def inspect(generated: Path, real: Path, out: Path, clean: Path | None = None) -> dict:
    arguments = ["inspect", str(generated), str(real), "--out", str(out)]
    if clean is not None:
        arguments += ["--clean", str(clean)]
    deflow(*arguments)
    report = json.loads((out / "inspect.json").read_text())

    def brief(summary):
        return None if summary is None else {k: summary[k] for k in SUMMARY_KEYS}

    return {
        "generated": brief(report["generated"]["estimated"]),
        "generated_minus_clean": brief(report["generated"]["paired"]),
        "real": brief(report["real"]["estimated"]),
        "distance": report["distance"],
    }


def calibrate_temperature(model_path: Path, data: Path, work: Path) -> tuple[float, dict]:
    """The temperature whose pairs match the degraded training images best in noise level.

    Unpaired, like training: the clean training photos are degraded at each candidate
    temperature and compared with the degraded training images (other photos) by the noise
    part of `deflow-synth inspect`'s distance.
    """
    distances = {}
    for temperature in CALIBRATION_TEMPERATURES:
        pairs = work / f"calibration-{temperature}"
        deflow("degrade", str(data / "clean"), str(pairs), "--model", str(model_path),
               "--seed", "0", "--device", "cpu", "--temperature", str(temperature))
        report_dir = work / f"calibration-{temperature}-report"
        report = inspect(pairs / "lr", data / "degraded", report_dir)
        distances[str(temperature)] = report["distance"]["noise"]

    best = min(CALIBRATION_TEMPERATURES, key=lambda t: distances[str(t)])
    method = ("noise distance of deflow-synth inspect between the clean training photos "
              "degraded at each temperature and the degraded training images")
    return best, {"method": method, "noise_distance": distances}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("pretrained"))
    parser.add_argument("--command", default="make pretrained")
    parser.add_argument("--note", default="", help="how the run differed from --command")
    args = parser.parse_args()

    model_path = args.run_dir / "model.pt"
    work = args.run_dir / "evaluation"
    pairs, bicubic = work / "pairs", work / "bicubic"

    temperature, calibration = calibrate_temperature(model_path, args.data, work)
    deflow("degrade", str(args.data / "val/hr"), str(pairs), "--model", str(model_path),
           "--seed", "0", "--device", "cpu", "--temperature", str(temperature))
    run(sys.executable, "scripts/bicubic_downsample.py", str(args.data / "val/hr"), str(bicubic))
    held_out = held_out_degraded(args.data / "degraded", work)

    evaluation = {
        "method": "deflow-synth inspect (noise std in [0, 1] units): LR images generated from "
        "DATA/val/hr versus the true degraded LR versions DATA/val/lr, and versus the degraded "
        "training images the run held out (other photos); bicubic-only LR for comparison",
        "model_vs_val_lr": inspect(pairs / "lr", args.data / "val/lr", work / "vs-val", bicubic),
        "bicubic_vs_val_lr": inspect(bicubic, args.data / "val/lr", work / "bicubic-vs-val"),
        "model_vs_held_out": inspect(pairs / "lr", held_out, work / "vs-held-out", bicubic),
        "bicubic_vs_held_out": inspect(bicubic, held_out, work / "bicubic-vs-held-out"),
        "held_out_files": sorted(p.name for p in held_out.iterdir()),
    }

    card = read_card(model_path)
    card.update(
        name=MODEL_NAME,
        temperature=temperature,
        temperature_calibration=calibration,
        command=args.command,
        training_note=args.note,
        licence=LICENCE,
        evaluation=evaluation,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    save_model(load_model(model_path), args.out / f"{MODEL_NAME}.pt", card)
    (args.out / f"{MODEL_NAME}.json").write_text(json.dumps(card, indent=2) + "\n")
    for name in ("vs-val", "bicubic-vs-val"):
        shutil.copy2(work / name / "inspect.png", args.out / f"{MODEL_NAME}-{name}.png")
    print(f"published {args.out / MODEL_NAME}.pt")


if __name__ == "__main__":
    main()
