"""kernels/ stands alone: it imports only torch, triton, the standard library and its own files, and a
copy of the folder under another package name computes the same FusedLinearGRPOLoss loss and
gradients in a process where ``fastebm`` cannot be imported at all."""
from __future__ import annotations

import ast
import inspect
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastebm.kernels

from kernel_helpers import make_batch

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
ALLOWED_TOP_LEVEL = {"torch", "triton"} | set(sys.stdlib_module_names)


def foreign_imports(source: str, filename: str) -> list[str]:
    """Absolute imports of anything but torch, triton and the standard library, anywhere in the file
    (lazy imports inside functions included)."""
    bad = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        bad += [f"{filename}:{node.lineno}: {n}" for n in names if n.split(".")[0] not in ALLOWED_TOP_LEVEL]
    return bad


def test_import_scan_catches_a_lazy_fastebm_import():
    # The scanner itself: a lazy import inside a function is found; relative, torch, stdlib are not.
    src = "from . import a\nimport torch\nfrom typing import Any\n\ndef f():\n    from fastebm.grpo import loss\n"
    assert foreign_imports(src, "x.py") == ["x.py:6: fastebm.grpo"]
    assert foreign_imports("import numpy as np\n", "y.py") == ["y.py:1: numpy"]


def test_kernels_import_only_torch_triton_stdlib_and_themselves():
    files = sorted(KERNELS_DIR.rglob("*.py"))
    assert KERNELS_DIR / "grpo_semantics.py" in files and len(files) >= 7
    bad = [b for f in files for b in foreign_imports(f.read_text(), str(f.relative_to(KERNELS_DIR.parent)))]
    assert not bad, "kernels/ must not import these (fastebm included):\n" + "\n".join(bad)


def _loss_and_grads(K, inp: dict, backend: str) -> dict:
    """FusedLinearGRPOLoss forward + backward; ``K`` is the kernels package (in-tree or the copy).
    Runs in this process and, as source text, in the subprocess."""
    out = {}
    for name, init in {"dapo_kl": dict(beta=0.04, loss_type="dapo", epsilon_high=0.28, temperature=0.8),
                       "dr_grpo_seq": dict(beta=0.0, loss_type="dr_grpo", max_completion_length=8, delta=1.5,
                                           importance_sampling_level="sequence", temperature=1.3)}.items():
        h = inp["hidden"].clone().requires_grad_()
        w = inp["weight"].clone().requires_grad_()
        loss_fn = K.FusedLinearGRPOLoss(backend=backend, **init)
        loss, metrics = loss_fn(h, w, inp["ids"], inp["mask"], inp["adv"], ref_per_token_logps=inp["ref"],
                                old_per_token_logps=inp["old"])
        loss.backward()
        key = f"{backend}/{name}"
        out.update({f"{key}/loss": loss.detach(), f"{key}/d_hidden": h.grad, f"{key}/d_weight": w.grad})
        out.update({f"{key}/metric{i}": m.detach() for i, m in enumerate(metrics)})
    return out


CHILD = """
import sys

sys.modules["fastebm"] = None          # the dev environment has fastebm on sys.path (.pth): block it
try:
    import fastebm
except ImportError:
    pass
else:
    raise SystemExit("fastebm is importable in the child")
copy_root, inputs_path, outputs_path, backends = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
sys.path.insert(0, copy_root)

import torch

torch.set_num_threads(1)
import standalone_kernels as K

assert K.__file__.startswith(copy_root), K.__file__
inp = torch.load(inputs_path, weights_only=True)
out = {}
for backend in backends:
    out.update(_loss_and_grads(K, inp, backend))
loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] == "fastebm")
assert not loaded, loaded
torch.save(out, outputs_path)
"""


@pytest.fixture
def one_thread():
    # The same summation order in this process and the child, so results may be compared exactly.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_copied_kernels_run_without_fastebm_and_match_in_tree(tmp_path, one_thread):
    copy = tmp_path / "copy"
    shutil.copytree(KERNELS_DIR, copy / "standalone_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    b = make_batch(2, 6, 24, 203, seed=21)          # V = 203, H = 24: no tile multiple; one masked row
    inp = {k: b[k] for k in ("hidden", "weight", "ids", "mask", "adv", "old", "ref")}
    torch.save(inp, tmp_path / "inputs.pt")
    # The Triton kernels need the interpreter on a CPU; the chunked torch path runs everywhere.
    backends = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])

    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(inspect.getsource(_loss_and_grads)) + CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), str(copy), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt"), ",".join(backends)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = torch.load(tmp_path / "outputs.pt", weights_only=True)    # plain tensors only

    ours = {}
    for backend in backends:
        ours.update(_loss_and_grads(fastebm.kernels, inp, backend))
    assert sorted(child) == sorted(ours) and len(ours) == len(backends) * (2 * 3 + 2 + 1)
    for k in ours:
        assert ours[k].dtype == child[k].dtype and ours[k].shape == child[k].shape, k
        assert torch.equal(ours[k], child[k]), f"{k}: max diff {(ours[k] - child[k]).abs().max().item():.3e}"
    # the inputs exercise something: non-zero gradients, a KL
    assert ours["torch/dapo_kl/d_weight"].abs().max() > 0 and ours["torch/dapo_kl/metric0"] > 0
