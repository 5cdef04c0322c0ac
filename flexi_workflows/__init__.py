"""flexi-workflows: Flexi-LoRA (input-adaptive LoRA ranks) on Ray, DeepSpeed and MLflow."""

import os as _os

__version__ = "0.1.0"


def _pin_deepspeed_accelerator() -> None:
    """Tell DeepSpeed its accelerator up front.

    transformers imports DeepSpeed whenever it is installed; left to auto-detect on a CPU machine,
    DeepSpeed prints a warning to *stdout*, which corrupts `--json` output. An explicit choice is
    silent and the same one DeepSpeed would make.
    """
    if "DS_ACCELERATOR" in _os.environ:
        return
    import torch

    _os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"


_pin_deepspeed_accelerator()
