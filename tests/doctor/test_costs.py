"""The backward cost model: its arithmetic against hand counts, the issue's figure for the atomic
kernel at 64 x 128 tiles, the 7B weight-gradient buffers, and the table in docs/kernels.md being the
one the code generates."""
from __future__ import annotations

import os

import pytest

from fastebm.doctor import costs
from fastebm.kernels import fused_linear_logprobs as ll

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S7 = costs.SHAPES[2]


def test_flops_are_four_lm_head_products_for_every_dense_strategy():
    mm = 2.0 * 8192 * 152064 * 3584
    for s in ("gemm", "atomic"):
        assert costs.strategy_costs(S7, s).flops == pytest.approx(4 * mm)
    # sparse skipping 90% of tiles still recomputes every logit: 2 + 2 x 0.1 products
    assert costs.strategy_costs(S7, "sparse", skipped=0.9).flops == pytest.approx(2.2 * mm)
    assert 4 * mm / (costs.H100_TFLOPS * 1e12) == pytest.approx(0.0361, rel=0.01)     # 36 ms at the H100 peak


def test_atomic_traffic_reproduces_the_issue_figure():
    # issue 17: tiles 64 x 128 -> about 418 GB of fp32 atomic adds per backward at the flagship shape
    c = costs.strategy_costs(S7, "atomic", tiles=dict(bwd_m=64, bwd_v=128))
    assert c.atomic_bytes / 1e9 == pytest.approx(418.6, rel=1e-3)
    assert costs.strategy_costs(S7, "gemm").atomic_bytes == 0
    assert costs.strategy_costs(S7, "sparse", skipped=0.9).atomic_bytes == pytest.approx(
        0.1 * costs.strategy_costs(S7, "atomic").atomic_bytes)


def test_weight_gradient_buffers_at_7b():
    # atomic / sparse: fp32 d weight (V x H x 4 = 2.18 GB) + fp32 d hidden; gemm: the d-logits chunk
    # (4 panels of 8192 x 8192 bf16 at the default 512 MiB) + fp32 d hidden, d weight written once in bf16.
    atomic = costs.strategy_costs(S7, "atomic").extra_bytes
    assert atomic == 152064 * 3584 * 4 + 8192 * 3584 * 4
    gemm = costs.strategy_costs(S7, "gemm").extra_bytes
    assert gemm == 4 * 8192 * 8192 * 2 + 8192 * 3584 * 4
    assert gemm < atomic / 3


def test_time_is_the_slower_of_compute_and_memory_plus_atomics():
    c = costs.Cost("x", "atomic", flops=1e12, bytes=1e9, atomic_bytes=2e9, extra_bytes=0)
    assert c.time_s(tflops=1.0, gbs=1.0) == pytest.approx(1.0 + 4.0)
    assert c.time_s(tflops=1e6, gbs=0.5) == pytest.approx(2.0 + 8.0)


def test_docs_hold_the_generated_table():
    with open(os.path.join(ROOT, "docs", "kernels.md"), encoding="utf-8") as f:
        doc = f.read()
    assert costs.markdown() in doc, "regenerate: python -m fastebm.doctor.costs --markdown"


def test_panel_plan_matches_the_kernel_constants():
    assert ll.PANEL_GPU == (8192, 8192) and ll.DEFAULT_CHUNK_MB == 512.0
