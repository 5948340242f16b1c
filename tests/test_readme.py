"""The README's Python quickstart runs as written and trains one step with a finite loss."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def first_python_block(text: str) -> str:
    match = re.search(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_readme_quickstart_runs_and_prints_a_finite_loss(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(first_python_block(README.read_text(encoding="utf-8")))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"README quickstart failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    losses = re.findall(r"^loss: (\S+)$", done.stdout, flags=re.M)
    assert len(losses) == 1, f"expected one 'loss: ...' line, got:\n{done.stdout}"
    assert math.isfinite(float(losses[0]))
    assert re.search(r"^caption: ", done.stdout, flags=re.M)
    assert re.search(r"^answer: ", done.stdout, flags=re.M)
