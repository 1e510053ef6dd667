"""``fastebm doctor``: the environment and a self-check of every fast path; the compile gate; costs.

    fastebm doctor                          # environment + self-checks on this machine's device
    fastebm doctor --recipe recipes/tiny.toml [section.key=value ...]   # + the recipe's model and rewards
    fastebm doctor --compile sm_80,sm_90    # compile every Triton kernel for those GPUs (no GPU needed)
    fastebm doctor --costs                  # the fused loss's cost model per backward strategy
    fastebm doctor --json report.json       # also write everything as JSON

Exit status: 1 when any check or compile row fails (the failing ones are named), 0 otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def add_parsers(sub) -> None:
    p = sub.add_parser("doctor", help="environment, self-checks of every fast path, compile gate, cost model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="also check this recipe's model and reward paths")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="with --recipe: overrides, as for train")
    p.add_argument("--compile", metavar="ARCHS", help="compile every Triton kernel for these architectures, "
                   "e.g. sm_80,sm_90 (instead of the self-checks)")
    p.add_argument("--subset", action="store_true", help="with --compile: the CI subset (tiny and 7B shapes, "
                   "bf16 and fp32, no bias variants) instead of the full matrix")
    p.add_argument("--costs", action="store_true", help="print the fused loss's cost model (instead of the checks)")
    p.add_argument("--matmul-tflops", type=float, default=None, help="with --costs: the matmul rate (H100 default)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="with --costs: memory bandwidth (H100 default)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    if not torch.cuda.is_available():
        # Check the Triton kernels too, under the interpreter: it must be set before Triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    report: dict = {}
    failed = False
    if args.costs:
        from fastebm.doctor import costs

        kw = {k: v for k, v in (("tflops", args.matmul_tflops), ("gbs", args.bandwidth_gbs)) if v is not None}
        print(costs.markdown(**kw))
        report["costs"] = costs.cost_table(**kw)
    elif args.compile:
        from fastebm.doctor import compile_gate as cg

        archs = cg.parse_archs(args.compile)
        kw = dict(shapes=cg.SUBSET["shapes"], dtypes=cg.SUBSET["dtypes"], bias=cg.SUBSET["bias"]) if args.subset else {}
        rows = cg.run_gate(archs, **kw)
        print(cg.format_table(rows))
        print("\nworst rows (most registers, most shared memory):")
        print(cg.format_table(cg.worst_rows(rows)))
        bad = [r for r in rows if r.failed]
        for r in bad:
            print(f"FAILED: {r.kernel} [{r.config}] {r.arch} {r.dtype}: {r.status} "
                  f"{r.error or f'(spilled {r.spill_bytes} B, shared {r.shared:,} of {r.shared_limit:,} B)'}",
                  file=sys.stderr)
        failed = bool(bad)
        report["compile"] = [dataclasses.asdict(r) for r in rows]
    else:
        from fastebm.doctor.checks import format_checks, self_checks
        from fastebm.doctor.env import environment, format_environment

        env = environment()
        print(format_environment(env))
        print()
        results = self_checks(recipe=args.recipe, overrides=args.overrides)
        print(format_checks(results))
        failed = any(r.failed for r in results)
        print(f"\n{sum(r.status == 'pass' for r in results)} passed, {sum(r.failed for r in results)} failed, "
              f"{sum(r.status == 'skipped' for r in results)} skipped")
        report.update(environment=env, checks=[dataclasses.asdict(r) for r in results])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 1 if failed else 0
