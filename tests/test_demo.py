"""python -m torch_cnnbp demo, run as a new user runs it: a LeNet-5 of our modules beside a native one on
scikit-learn's digits. Oracle: the native network trained on the same batches from the same weights."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from torch_cnnbp import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_trains_to_target_and_matches_native(tmp_path):
    pytest.importorskip("sklearn", reason="the demo's dataset needs scikit-learn (pip install scikit-learn)")
    plot = tmp_path / "loss.png"
    run = subprocess.run([sys.executable, "-m", "torch_cnnbp", "demo", "--plot", str(plot)], cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = re.findall(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.e+-]+)\s", run.stdout, re.M)
    assert len(rows) == 15, run.stdout  # one line per epoch
    for _, loss_ours, loss_native, acc_ours, acc_native, diff in rows:
        assert abs(float(loss_ours) - float(loss_native)) <= 1e-3 and float(diff) <= 1e-4
    assert float(rows[-1][3]) >= 95.0
    assert "reached" in run.stdout and "within float32 tolerance" in run.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install matplotlib" in run.stderr
    else:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_without_scikit_learn_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` raise ImportError
    assert demo.main([]) == 2
    assert "pip install scikit-learn" in capsys.readouterr().err
