"""The package's one-way import order (STYLE.md section 2), checked by import-linter's contracts."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold(src_env: dict[str, str]) -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    env = {**src_env, "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(
        [exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
