"""Session-wide tiny data: one synthetic dataset and one short training run shared by many tests.

Both are built once per session (about two seconds on a 2-core CPU) and must be treated as
read-only: a test that changes a run or a dataset copies it into its own `tmp_path` first.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest

# Odd, anisotropic, tiny: 24 x 24 x 16 voxels of 1 x 1 x 2 mm, three classes (background + 2).
TINY_SHAPE_VOX = (24, 24, 16)
TINY_SPACING_MM = (1.0, 1.0, 2.0)
TINY_CASES = 5
TINY_CLASSES = 3

# A network and schedule small enough that two epochs take about a second on a CPU.
_TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "model": {"base_width": 4, "depth": 3},
    "train": {"patch_size": (16, 16, 16), "batch_size": 2, "iters_per_epoch": 5, "max_epochs": 2},
}

@pytest.fixture
def src_env() -> dict[str, str]:
    """Environment for a `python -m volseg` subprocess: this checkout's src first, then any PYTHONPATH
    the suite itself runs under (dependencies installed with `pip --target`, as on a bare GPU box)."""
    import volseg

    src = str(Path(volseg.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}


@pytest.fixture
def tiny_overrides() -> dict[str, dict[str, Any]]:
    """A fresh copy of the tiny-network overrides (tests may add keys to it)."""
    return copy.deepcopy(_TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """nnU-Net-layout synthetic dataset: 5 training cases + 2 test cases (imagesTs/labelsTs)."""
    from volseg import synthetic

    root = tmp_path_factory.mktemp("tiny_dataset") / "Dataset001_Tiny"
    return synthetic.write_dataset(
        root,
        n_cases=TINY_CASES,
        shape_vox=TINY_SHAPE_VOX,
        spacing_mm=TINY_SPACING_MM,
        n_classes=TINY_CLASSES,
        seed=0,
        n_test=2,
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> tuple[Path, dict[str, Any]]:
    """(run folder, summary) of a two-epoch training of the tiny network on `tiny_dataset`."""
    from volseg.train import train

    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    summary = train(
        tiny_dataset,
        run_dir,
        max_minutes=5,
        seed=0,
        device="cpu",
        overrides=copy.deepcopy(_TINY_OVERRIDES),
        progress=False,
        members=1,  # five cases would plan two averaged models; these tests read one model's run folder
    )
    return run_dir, summary
