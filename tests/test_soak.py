"""The soak in short (``scripts/soak.py --hostile``): random runs, cancels, drops and resumes, cancels in
the same write as their run, hostile names and churned AI SDK sockets for 30 seconds, every character
checked, no lost token, no ``seq`` anomaly, no run without its terminal event, nothing left in flight,
and memory flat after the warm-up."""

from __future__ import annotations

import subprocess
import sys

from .helpers import ROOT


def test_a_short_soak_loses_nothing_and_holds_memory_flat() -> None:
    result = subprocess.run([sys.executable, "scripts/soak.py", "--clients", "20", "--seconds", "30", "--hostile"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lost or wrong: 0; seq anomalies: 0; runs without a terminal event: 0" in result.stdout
    assert "runs_active when every client is gone: 0" in result.stdout
    assert "'early-cancel'" in result.stdout and "'churn'" in result.stdout and "'names'" in result.stdout
