"""A cost model of the fused linear GRPO loss (forward + backward) for each backward strategy.

    fastebm doctor --costs [--matmul-tflops 989.4] [--bandwidth-gbs 3350]     # a table on stdout
    python -m fastebm.doctor.costs --markdown > table.md                       # what docs/kernels.md holds

For N completion tokens, hidden size H, vocabulary V and b bytes per input element, it counts
what each strategy must do on paper: matmul FLOPs, bytes read and written in device memory (each
tensor counted once per pass that must stream it from memory: the floor, not a cache simulation),
bytes added with float atomics, the extra memory beyond inputs and the returned gradients, and the
time these imply at a given matmul rate and memory bandwidth (by default the H100 SXM's published
dense bf16 rate and HBM3 bandwidth):

    time = max(FLOPs / rate, bytes / bandwidth) + 2 * atomic bytes / bandwidth

(an atomic add reads and writes its target; the d-weight target, 2 GiB at 7B, does not fit in L2).
The atomic term is a lower bound: fp32 atomics rarely stream at full bandwidth. ``gpu_check.py``
prints these predictions beside what it measures; nothing here is a measurement.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from fastebm.kernels import fused_linear_logprobs as ll

# H100 SXM published peaks: dense bf16 / fp16 tensor-core rate, HBM3 bandwidth.
H100_TFLOPS = 989.4
H100_GBS = 3350.0


@dataclass(frozen=True)
class LossShape:
    name: str
    tokens: int
    hidden: int
    vocab: int
    elem_bytes: int = 2


SHAPES = [
    LossShape("tiny", tokens=93, hidden=64, vocab=523),
    LossShape("2B", tokens=8192, hidden=1536, vocab=151936),
    LossShape("7B", tokens=8192, hidden=3584, vocab=152064),
]


@dataclass
class Cost:
    shape: str
    strategy: str
    flops: float
    bytes: float
    atomic_bytes: float
    extra_bytes: float

    def time_s(self, tflops: float = H100_TFLOPS, gbs: float = H100_GBS) -> float:
        bw = gbs * 1e9
        return max(self.flops / (tflops * 1e12), self.bytes / bw) + 2 * self.atomic_bytes / bw


def strategy_costs(s: LossShape, strategy: str, skipped: float = 0.0, chunk_mb: float = ll.DEFAULT_CHUNK_MB,
                   tiles: dict | None = None) -> Cost:
    """Forward + backward of the fused loss with ``strategy`` ("gemm" | "atomic" | "sparse"; for
    "sparse", ``skipped`` is the fraction of vocabulary tiles skipped: an assumption, not a count)."""
    N, H, V, b = s.tokens, s.hidden, s.vocab, s.elem_bytes
    t = tiles or ll.TILES[("sm90", 4 if b == 4 else 2)]
    mm = 2.0 * N * V * H                                   # one (N x H) @ (H x V) product
    fwd_bytes = (N * H + V * H) * b + 16 * N               # X and W once; the (N,) partials
    # backward: the recomputed logits, then d hidden and d weight
    flops = mm + 2 * mm * (1.0 - (skipped if strategy == "sparse" else 0.0))
    if strategy in ("atomic", "sparse"):
        keep = 1.0 - (skipped if strategy == "sparse" else 0.0)
        bm, bv = t["bwd_m"], t["bwd_v"]
        # every (row tile, vocabulary tile) program adds BLOCK_M x H into dX and BLOCK_V x H into dW
        atomic = keep * N * V * H * 4.0 * (1.0 / bv + 1.0 / bm)
        bwd_bytes = ((N * H + V * H) * b          # X, W for the recompute
                     + (N * H + V * H) * 4 * 2    # zeroing the fp32 dX, dW; reading them for the cast
                     + (N * H + V * H) * b)       # writing dX, dW in the input dtype
        extra = (N * H + V * H) * 4.0             # the fp32 accumulators
        return Cost(s.name, strategy, mm + flops, fwd_bytes + bwd_bytes, atomic, extra)
    if strategy != "gemm":
        raise ValueError(f"unknown strategy {strategy!r}")
    plan = ll.gemm_panel_plan(N, V, ll.PANEL_GPU, b, chunk_mb)
    rp, cp = plan["row_panels"], plan["col_panels"]
    bwd_bytes = (N * H * cp + V * H * rp) * b     # the d-logits kernel reads X per column panel, W per row panel
    bwd_bytes += 3.0 * N * V * b                  # d logits written once, read by the two GEMMs
    bwd_bytes += (N * H * cp + V * H * rp) * b    # the GEMMs' other operands
    bwd_bytes += (2 * cp - 1) * N * H * 4.0       # dX fp32: read + written by every column panel but the first
    bwd_bytes += N * H * 4 + N * H * b            # dX: the final cast
    if rp == 1:
        bwd_bytes += V * H * b                    # dW written once, in the weight's dtype
        extra = plan["buffer_bytes"] + N * H * 4.0
    else:
        bwd_bytes += (2 * rp - 1) * V * H * 4.0 + V * H * (4 + b)  # fp32 panel accumulators, then the cast
        extra = plan["buffer_bytes"] + N * H * 4.0 + plan["panel_cols"] * H * 4.0
    return Cost(s.name, strategy, mm + flops, fwd_bytes + bwd_bytes, 0.0, extra)


STRATEGY_ROWS = [("gemm", 0.0), ("atomic", 0.0), ("sparse", 0.9)]


def cost_table(tflops: float = H100_TFLOPS, gbs: float = H100_GBS, shapes=SHAPES) -> list[dict]:
    rows = []
    for s in shapes:
        for strategy, skipped in STRATEGY_ROWS:
            c = strategy_costs(s, strategy, skipped)
            label = strategy if strategy != "sparse" else f"sparse ({skipped:.0%} of tiles skipped, assumed)"
            rows.append(dict(shape=f"{s.name} (N={s.tokens:,}, H={s.hidden:,}, V={s.vocab:,})", strategy=label,
                             tflop=c.flops / 1e12, gb=c.bytes / 1e9, atomic_gb=c.atomic_bytes / 1e9,
                             extra_gib=c.extra_bytes / 2 ** 30, ms=c.time_s(tflops, gbs) * 1e3))
    return rows


def markdown(tflops: float = H100_TFLOPS, gbs: float = H100_GBS) -> str:
    head = (f"Fused loss, forward + backward, bf16 inputs; predicted at {tflops:g} TFLOP/s and {gbs:g} GB/s "
            f"(`python -m fastebm.doctor.costs --markdown`; a model, not a measurement)\n\n"
            "| shape | strategy | matmul TFLOP | GB read + written | GB added atomically | extra memory (GiB) "
            "| predicted ms |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for r in cost_table(tflops, gbs):
        lines.append(f"| {r['shape']} | {r['strategy']} | {r['tflop']:.3g} | {r['gb']:.3g} | {r['atomic_gb']:.3g} "
                     f"| {r['extra_gib']:.3g} | {r['ms']:.3g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastebm.doctor.costs", description=__doc__.splitlines()[0])
    p.add_argument("--matmul-tflops", type=float, default=H100_TFLOPS)
    p.add_argument("--bandwidth-gbs", type=float, default=H100_GBS)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    print(markdown(a.matmul_tflops, a.bandwidth_gbs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
