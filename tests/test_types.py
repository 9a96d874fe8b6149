"""The type check runs with the tests: mypy over ``auto_model`` and ``bench`` as pyproject.toml
configures it, in a process of its own. On one core it takes about 25 s without a cache; run here, a
worker's core runs it beside the other worker's tests instead of both waiting for it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_finds_no_type_errors():
    run = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
