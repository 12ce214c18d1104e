"""The README's Python snippets run as written."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_snippets() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def test_readme_python_snippets_run(tmp_path):
    snippets = _python_snippets()
    assert snippets, "README.md has no ```python block"
    # A fresh interpreter per snippet, as a user pasting it would have; the default model is
    # cached in a private TIDAL_CACHE so the test also covers its first creation.
    env = {**os.environ, "TIDAL_CACHE": str(tmp_path / "cache")}
    for i, code in enumerate(snippets):
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, f"README snippet {i} failed:\n{code}\n--- stderr ---\n{proc.stderr[-4000:]}"
        if "update_weights(" in code:  # the offline-API snippet ends by printing llm.state()
            assert "'weight_version': 2" in proc.stdout, proc.stdout[-2000:]
