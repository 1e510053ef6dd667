"""Packaging: kernels/ imports as fastebm.kernels (checkout and wheel), never as top-level `kernels`."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_import_as_fastebm_kernels_from_checkout():
    code = ("import fastebm.kernels, os, sys; print(os.path.dirname(fastebm.kernels.__file__)); "
            "print('kernels' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path, toplevel = out.stdout.split()
    assert os.path.realpath(path) == os.path.realpath(os.path.join(ROOT, "kernels"))
    assert toplevel == "False"


@pytest.mark.slow
def test_wheel_maps_kernels_under_fastebm(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), ROOT], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (whl,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / whl).namelist()
    assert "fastebm/kernels/__init__.py" in names
    # the default prompt templates are package data: a wheel without them could not build a prompt
    assert {"fastebm/data/templates/ebm_system.txt", "fastebm/data/templates/ebm_user.txt"} <= set(names)
    assert "fastebm/eval/templates/judge_absolute.txt" in names  # the evaluation templates ship as files
    assert not any(n.startswith("kernels/") for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
    ep = [n for n in names if n.endswith("entry_points.txt")][0]
    assert "fastebm = fastebm.cli:main" in zipfile.ZipFile(tmp_path / whl).read(ep).decode()
