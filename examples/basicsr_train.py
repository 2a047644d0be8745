"""Run BasicSR's training with the torchvision import fix, from the current folder.

basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, which torchvision 0.17
removed, so ``python -m basicsr.train`` fails on current torchvision. This script applies
deflow-synth's fix and then runs basicsr.train's own pipeline with the same arguments. It also
keeps ``experiments/`` in the current folder (``python -m basicsr.train`` puts it next to the
installed basicsr package).

    python examples/basicsr_train.py -opt examples/train_rrdbnet_x4.yml [--auto_resume]
"""

from pathlib import Path

from deflow_synth._basicsr import import_basicsr


def main() -> None:
    """Train with BasicSR's ``train_pipeline``; arguments are read from the command line."""
    import_basicsr("train").train_pipeline(str(Path.cwd()))


if __name__ == "__main__":
    main()
