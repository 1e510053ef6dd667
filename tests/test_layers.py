"""The layering contracts of .importlinter hold (import-linter, as CI runs it), and they can fail:
a deliberately wrong import in a temporary copy of the tree breaks the named contract."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command(['--no-cache'])"


def copy_tree(dst) -> str:
    for name in ("fastebm", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(dst, name),
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, ".importlinter"), dst)
    return str(dst)


def lint(tree: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=tree)  # the copy, not the installed checkout
    return subprocess.run([sys.executable, "-c", LINT], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=120)


def add_import(path: str, line: str) -> None:
    with open(path) as f:
        text = f.read()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    with open(path, "w") as f:
        f.write(head + sep + line + "\n" + rest if sep else line + "\n" + text)


@pytest.fixture
def tree(tmp_path):
    return copy_tree(tmp_path)


def test_contracts_hold(tree):
    res = lint(tree)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "3 kept, 0 broken" in res.stdout


def test_an_upward_import_breaks_the_layers(tree):
    add_import(os.path.join(tree, "fastebm", "data", "records.py"), "import fastebm.train.trainer  # wrong way")
    res = lint(tree)
    assert res.returncode == 1
    assert "One way down" in res.stdout and "fastebm.data is not allowed to import fastebm.train" in res.stdout


def test_a_sibling_import_breaks_the_layers(tree):
    add_import(os.path.join(tree, "fastebm", "rewards", "format.py"), "import fastebm.grpo.loss  # sideways")
    res = lint(tree)
    assert res.returncode == 1 and "fastebm.rewards is not allowed to import fastebm.grpo" in res.stdout


def test_kernels_importing_fastebm_breaks_the_contract(tree):
    add_import(os.path.join(tree, "kernels", "_backend.py"), "import fastebm.utils  # kernels must stand alone")
    res = lint(tree)
    assert res.returncode == 1
    assert "kernels/ imports nothing from fastebm" in res.stdout and "kernels._backend -> fastebm.utils" in res.stdout


def test_integrations_importing_the_trainer_breaks_the_contract(tree):
    add_import(os.path.join(tree, "fastebm", "integrations", "trl.py"), "import fastebm.grpo.loss  # the trainer's")
    res = lint(tree)
    assert res.returncode == 1
    assert "fastebm.integrations needs only fastebm.kernels" in res.stdout
    assert "fastebm.integrations.trl -> fastebm.grpo.loss" in res.stdout
