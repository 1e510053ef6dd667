"""The compile gate: every Triton kernel compiled for sm_80 and sm_90 without a GPU (Triton's own
compiler and bundled ptxas), the table it prints, and a planted configuration it must name.

The gate runs in worker processes without TRITON_INTERPRET (which the suite sets on a CPU) and
caches its results under ~/.cache/fastebm/compile: a cold run of the CI subset takes a minute or two
on 2 cores, a warm one seconds. The full matrix (2B shape, fp16, bias variants) is
``fastebm doctor --compile sm_80,sm_90`` (docs/kernels.md has its table).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastebm.doctor import compile_gate as cg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Every @triton.jit kernel fastebm launches (the helpers inline into them).
KERNELS = {"_linear_logprob_fwd_kernel", "_linear_logprob_bwd_kernel", "_linear_logprob_dlogits_kernel",
           "_logits_logprob_fwd_kernel", "_logits_logprob_bwd_kernel", "_group_advantages_kernel",
           "_prefix_phase_kernel", "_suffix_merge_kernel"}


def _every_launched_kernel_is_listed():
    import ast

    found = set()
    for name in os.listdir(os.path.join(ROOT, "kernels")):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(ROOT, "kernels", name)).read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "launch" and node.args:
                    found.add(node.args[0].id)
    return found


def test_the_gate_knows_every_launched_kernel():
    assert _every_launched_kernel_is_listed() == KERNELS


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastebm.cli", "doctor", "--compile", "sm_80,sm_90", "--subset",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    return proc, json.loads(out.read_text())["compile"] if out.exists() else []


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(gate):
    proc, rows = gate
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {r["kernel"] for r in rows} == KERNELS
    for arch in ("sm_80", "sm_90"):
        arch_rows = [r for r in rows if r["arch"] == arch]
        assert {r["kernel"] for r in arch_rows} == KERNELS, arch
        assert {r["dtype"] for r in arch_rows if r["kernel"] == "_linear_logprob_fwd_kernel"} == {"bfloat16", "float32"}
    for r in rows:
        assert r["status"] == "ok" and r["spill_bytes"] == 0 and 0 < r["regs"] <= 255, r
        assert r["shared"] <= r["shared_limit"], r
        if r["arch"] == "sm_80":   # the sm80 table also serves sm_86 / sm_89 (99 KiB)
            assert r["shared"] <= cg.SHARED_LIMIT["sm_86"], r
    # the printed table: one row per kernel, configuration and architecture, then the worst rows
    assert "| kernel | arch | dtype | configuration | registers | spilled bytes | shared memory |" in proc.stdout
    assert "worst rows (most registers, most shared memory)" in proc.stdout


@pytest.mark.slow
def test_the_deterministic_backward_has_no_atomic_instruction(gate):
    # The "gemm" strategy's only kernel compiles to PTX without atom/red instructions on both
    # architectures; the atomic kernel's PTX has them (so the count can see one).
    _, rows = gate
    dz = [r for r in rows if r["kernel"] == "_linear_logprob_dlogits_kernel"]
    atomic = [r for r in rows if r["kernel"] == "_linear_logprob_bwd_kernel"]
    assert dz and all(r["atomics"] == 0 for r in dz)
    assert atomic and all(r["atomics"] > 0 for r in atomic)


@pytest.mark.slow
def test_a_planted_spill_and_shared_memory_overflow_are_named():
    # sm_90, bf16, 7B: the d-logits kernel with 128 x 256 x 128 tiles in 4 stages needs ~384 KiB of
    # shared memory (227 KiB exist); the atomic kernel with 128 x 128 tiles on 4 warps cannot keep
    # its (BLOCK_M, BLOCK_V) fp32 tiles in registers and spills.
    planted = {"sm90/2": dict(dz_m=128, dz_v=256, dz_k=128, dz_stages=4,
                              bwd_m=128, bwd_v=128, bwd_k=64, bwd_warps=4, bwd_stages=1)}
    rows = cg.run_gate(["sm_90"], shapes=["7B"], dtypes=["bfloat16"], bias=False, tiles=planted)
    bad = {r.kernel: r for r in rows if r.failed}
    assert set(bad) == {"_linear_logprob_dlogits_kernel", "_linear_logprob_bwd_kernel"}, [(r.kernel, r.status) for r in rows]
    dz = bad["_linear_logprob_dlogits_kernel"]
    assert "shared" in dz.status.split(",") and dz.shared > cg.SHARED_LIMIT["sm_90"]
    assert "BLOCK_M=128 BLOCK_V=256 BLOCK_K=128" in dz.config and "stages=4" in dz.config
    sp = bad["_linear_logprob_bwd_kernel"]
    assert "spill" in sp.status.split(",") and sp.spill_bytes > 0 and "BLOCK_M=128 BLOCK_V=128" in sp.config
    table = cg.format_table([dz, sp])
    assert "`_linear_logprob_dlogits_kernel`" in table and "shared" in table and "spill" in table
    # the unplanted kernels of the same job stay green
    assert all(r.status == "ok" for r in rows if r.kernel not in bad)


def test_parse_archs_names_the_unknown_one():
    assert cg.parse_archs("sm_80,sm90") == ["sm_80", "sm_90"]
    with pytest.raises(ValueError, match="sm_75"):
        cg.parse_archs("sm_80,sm_75")


def test_merge_keeps_the_worst_of_every_shape():
    a = cg.Row("k", "sm_90", "bfloat16", "c", regs=100, shared=10, uses=("tiny/loss",), shared_limit=232448)
    b = cg.Row("k", "sm_90", "bfloat16", "c", regs=120, shared=5, spill_bytes=8, status="spill", uses=("7B/loss",),
               shared_limit=232448)
    (m,) = cg.merge_rows([a, b])
    assert (m.regs, m.shared, m.spill_bytes, m.status, m.uses) == (120, 10, 8, "spill", ("7B/loss", "tiny/loss"))
    assert cg.worst_rows([a, cg.Row("j", "sm_90", "bfloat16", "c", regs=90, shared=99)])[0].regs == 100
