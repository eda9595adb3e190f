"""volseg: 3D U-Nets for volumetric medical image segmentation.

`volseg.load_model(path)` returns the plain `torch.nn.Module` (logits out) and its `Config`.
Imports are lazy so that the command line starts without loading torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_model", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from volseg.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'volseg' has no attribute {name!r}")
