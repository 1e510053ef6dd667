"""The compile gate: every Triton kernel of fastebm compiled for sm_80 and sm_90, without a GPU.

    fastebm doctor --compile sm_80,sm_90            # the full matrix (exit 1 on any failure)
    python -m fastebm.doctor.compile_gate --worker  # internal: one worker process (jobs on stdin)

How: the launch wrappers of ``fastebm.kernels`` are called on *meta* tensors of the tiny,
Qwen2-VL-2B and Qwen2-VL-7B shapes inside ``kernels._backend.capture_launches(arch)``, which
records each launch (kernel, constexprs, num_warps / num_stages, the integer arguments that Triton
specialises on) instead of running it, and makes every wrapper pick the launch configuration of
that architecture. Each recorded launch is specialised exactly as Triton's launcher would on a GPU
(its binder, a target of the named architecture), compiled with ``triton.compile`` and the bundled
``ptxas``, and ``ptxas -v`` reports registers and spills; shared memory is the compiled kernel's
(dynamic) shared memory. A row fails on a compile error, any spill, or shared memory beyond the
architecture's per-block limit.

Compiling needs the real ``@triton.jit`` functions, which ``TRITON_INTERPRET=1`` (set by the test
suite on a CPU) replaces at import time: the work therefore runs in worker processes started
without it, 2 at a time by default. Results are cached under ``~/.cache/fastebm/compile`` (or
``$FASTEBM_CACHE_DIR/compile``), keyed by Triton's hash of the kernel source (its helpers included),
the specialisation, the options, the architecture and the Triton / ptxas versions, so an unchanged
kernel is never compiled twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

# Max shared memory per block (opt-in, bytes): A100 163 KiB; sm_86 / sm_89 99 KiB; H100/H200 227 KiB.
SHARED_LIMIT = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448}
# Which launch-configuration table of kernels/ an architecture uses (kernels._backend.arch_of_capability).
TABLE = {"sm_80": "sm80", "sm_86": "sm80", "sm_89": "sm80", "sm_90": "sm90"}
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Shape:
    """Model dimensions the kernels are launched at: the lm_head (hidden x vocab), completion tokens
    per loss call, and the decode attention (query / KV heads, head dim, group size, prefix)."""
    hidden: int
    vocab: int
    tokens: int
    q_heads: int
    kv_heads: int
    head_dim: int
    group: int = 8
    prefix: int = 1500


SHAPES = {
    # fastebm.tiny's random Qwen2-VL: hidden 64, a ~520-token BPE vocabulary, 4 / 2 heads of 16.
    "tiny": Shape(hidden=64, vocab=523, tokens=93, q_heads=4, kv_heads=2, head_dim=16, group=4, prefix=40),
    # Qwen2-VL-2B: hidden 1536, vocabulary 151,936, 12 query / 2 KV heads of 128.
    "2B": Shape(hidden=1536, vocab=151936, tokens=8191, q_heads=12, kv_heads=2, head_dim=128),
    # Qwen2-VL-7B (the flagship): hidden 3584, vocabulary 152,064, 28 query / 4 KV heads of 128.
    "7B": Shape(hidden=3584, vocab=152064, tokens=8192, q_heads=28, kv_heads=4, head_dim=128),
}
# What the test suite compiles on every submission (tests/doctor/test_compile_gate.py): every kernel
# and launch configuration for both architectures, at the tiny and 7B shapes in bf16 and fp32. The
# full matrix (fastebm doctor --compile) adds the 2B shape, fp16 and the bias variants.
SUBSET = dict(shapes=("tiny", "7B"), dtypes=("bfloat16", "float32"), bias=False)


@dataclass
class Row:
    """One compiled (kernel, configuration, architecture, dtype)."""
    kernel: str
    arch: str
    dtype: str
    config: str
    regs: int = 0
    spill_bytes: int = 0
    shared: int = 0
    shared_limit: int = 0
    atomics: int = 0
    status: str = "ok"          # ok | error | spill | shared | spill,shared
    error: str = ""
    uses: tuple = ()
    cached: bool = False

    @property
    def failed(self) -> bool:
        return self.status != "ok"


def cache_dir() -> str:
    base = os.environ.get("FASTEBM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastebm")
    return os.path.join(base, "compile")


# --------------------------------------------------------------------------------------------- #
# Parent side: jobs, workers, the table
# --------------------------------------------------------------------------------------------- #


def parse_archs(text: str) -> list[str]:
    archs = [a.strip().replace("sm", "sm_").replace("sm__", "sm_") for a in text.split(",") if a.strip()]
    bad = [a for a in archs if a not in SHARED_LIMIT]
    if bad or not archs:
        raise ValueError(f"--compile: unknown architecture(s) {bad or text!r}; known: {sorted(SHARED_LIMIT)}")
    return archs


def run_gate(archs: Iterable[str], shapes: Iterable[str] = tuple(SHAPES), dtypes: Iterable[str] = DTYPES,
             bias: bool = True, tiles: Optional[dict] = None, workers: int = 2,
             cache: Optional[str] = None, timeout: float = 1800) -> list[Row]:
    """Compile every kernel launch of ``shapes`` x ``dtypes`` for ``archs`` in worker processes.

    ``tiles``: overrides of ``kernels.fused_linear_logprobs.TILES`` entries, keyed "sm90/2" (table /
    bytes per input element) -> {key: value}: how a test plants a bad configuration. Rows are merged
    per (kernel, arch, dtype, config): the worst registers, spills and shared memory over the
    shapes that launch it, ``uses`` lists those shapes and scenarios.
    """
    jobs = [dict(arch=a, shape=s, dtype=d, bias=bias, tiles=tiles or {})
            for a in archs for s in shapes for d in dtypes]
    for j in jobs:
        if j["arch"] not in SHARED_LIMIT or j["shape"] not in SHAPES or j["dtype"] not in DTYPES:
            raise ValueError(f"bad compile job {j}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTEBM_COMPILE_CACHE"] = cache or cache_dir()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    n = max(1, min(workers, len(jobs)))
    procs = []
    with tempfile.TemporaryDirectory(prefix="fastebm-compile-") as tmp:
        for i in range(n):
            # stdout and stderr to files: a worker never blocks on a full pipe while another is read
            out, err = open(os.path.join(tmp, f"{i}.out"), "w+"), open(os.path.join(tmp, f"{i}.err"), "w+")
            p = subprocess.Popen([sys.executable, "-m", "fastebm.doctor.compile_gate", "--worker"], env=env,
                                 stdin=subprocess.PIPE, stdout=out, stderr=err, text=True)
            p.stdin.write(json.dumps(jobs[i::n]))
            p.stdin.close()
            procs.append((p, out, err))
        raw = []
        deadline = time.time() + timeout
        for p, out, err in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
            out.seek(0)
            err.seek(0)
            if p.returncode:
                raise RuntimeError(f"compile worker failed (exit {p.returncode}):\n{err.read()[-4000:]}")
            raw += [json.loads(line) for line in out.read().splitlines() if line.startswith("{")]
            out.close()
            err.close()
    return merge_rows(Row(**r) for r in raw)


def _status(error: str, spill_bytes: int, shared: int, limit: int) -> str:
    """"ok", or what failed: "error", or "spill" and / or "shared" (comma-separated)."""
    if error:
        return "error"
    return ",".join([w for w, bad in (("spill", spill_bytes > 0), ("shared", shared > limit)) if bad]) or "ok"


def merge_rows(rows: Iterable[Row]) -> list[Row]:
    merged: dict[tuple, Row] = {}
    for r in rows:
        key = (r.kernel, r.arch, r.dtype, r.config)
        m = merged.get(key)
        if m is None:
            merged[key] = Row(**{**asdict(r), "uses": tuple(r.uses)})
            continue
        m.regs, m.spill_bytes = max(m.regs, r.regs), max(m.spill_bytes, r.spill_bytes)
        m.shared, m.atomics = max(m.shared, r.shared), max(m.atomics, r.atomics)
        m.cached = m.cached and r.cached
        m.error = m.error or r.error
        m.status = _status(m.error, m.spill_bytes, m.shared, m.shared_limit)
        m.uses = tuple(sorted(set(m.uses) | set(r.uses)))
    return sorted(merged.values(), key=lambda r: (r.kernel, r.arch, r.dtype, r.config))


def format_table(rows: list[Row], title: Optional[str] = None) -> str:
    """Markdown: one row per kernel, configuration and architecture."""
    out = [f"**{title}**", ""] if title else []
    out += ["| kernel | arch | dtype | configuration | registers | spilled bytes | shared memory | atomics | status |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r.status if not r.error else f"{r.status}: {r.error.splitlines()[0][:120]}"
        out.append(f"| `{r.kernel}` | {r.arch} | {r.dtype} | {r.config} | {r.regs} | {r.spill_bytes} | "
                   f"{r.shared:,} / {r.shared_limit:,} | {'yes' if r.atomics else 'no'} | {status} |")
    return "\n".join(out)


def worst_rows(rows: list[Row]) -> list[Row]:
    """The row with the most registers and the row with the most shared memory (per arch)."""
    out = []
    for arch in sorted({r.arch for r in rows}):
        rs = [r for r in rows if r.arch == arch and r.status != "error"]
        for key in (lambda r: r.regs, lambda r: r.shared):
            if rs:
                w = max(rs, key=key)
                if w not in out:
                    out.append(w)
    return out


# --------------------------------------------------------------------------------------------- #
# Worker side: capture the launches, specialise, compile, ptxas -v
# --------------------------------------------------------------------------------------------- #


def _scenarios(shape: Shape, dtype, bias: bool):
    """(name, fn) pairs; each fn calls real launch wrappers on meta tensors (inside a capture)."""
    import torch

    from fastebm.kernels import fused_linear_logprobs as ll
    from fastebm.kernels.cascade_attention import cascade_attention_triton
    from fastebm.kernels.group_advantages import group_advantages_triton
    from fastebm.kernels.logits_grpo_loss import logits_logprob_bwd_triton, logits_logprob_fwd_triton

    meta = dict(device="meta")
    N, H, V = shape.tokens, shape.hidden, shape.vocab
    h = torch.empty(N, H, dtype=dtype, **meta)
    w = torch.empty(V, H, dtype=dtype, **meta)
    ids = torch.empty(N, dtype=torch.long, **meta)
    g = torch.empty(N, dtype=torch.float32, **meta)

    def loss(b):
        def run():
            _, lse, _ = ll.linear_logprob_fwd_triton(h, w, ids, b, 1.0, False)
            for strategy in ll.BACKWARD_STRATEGIES:
                ll.linear_logprob_bwd_triton(h, w, ids, b, lse, g, 0.7, backward=strategy)
            ll.linear_logprob_bwd_triton(h, w, ids, b, lse, g, 0.7, compute_dw=False, backward="atomic")
        return run

    def scoring():
        ll.linear_logprob_fwd_triton(h, w, ids, None, 1.0, True)

    def logits():
        z = torch.empty(8, -(-N // 8), V, dtype=dtype, **meta)
        zid = torch.empty(z.shape[:2], dtype=torch.long, **meta)
        _, lse = logits_logprob_fwd_triton(z, zid, 1.0)
        logits_logprob_bwd_triton(z, zid, lse, torch.empty(z.shape[:2], dtype=torch.float32, **meta), 0.7)

    def advantages():
        group_advantages_triton(torch.empty(4, 8 * shape.group, dtype=torch.float32, **meta), [1.0, 1.0, 0.8, 0.8],
                                shape.group)

    def cascade():
        B, G, D = 2, shape.group, shape.head_dim
        for P, n in ((shape.prefix, 255), (37, 0)):  # a long and a short prefix, first and later steps
            q = torch.empty(B * G, shape.q_heads, D, dtype=dtype, **meta)
            pk = torch.empty(B, shape.kv_heads, P, D, dtype=dtype, **meta)
            sk = torch.empty(B * G, shape.kv_heads, 256, D, dtype=dtype, **meta)
            cascade_attention_triton(q, pk, pk, [P, P - 1], sk, sk, n)

    out = [("loss", loss(None)), ("scoring", scoring), ("logits", logits), ("advantages", advantages),
           ("cascade", cascade)]
    if bias:
        out.append(("loss+bias", loss(torch.empty(V, dtype=dtype, **meta))))
    return out


_NOT_CONFIG = {"UPCAST_DOT"}   # always False on a GPU


def _config_text(kernel, constexprs: dict, options) -> str:
    names = kernel.arg_names
    parts = []
    for key, val in sorted(constexprs.items()):
        name = names[key[0]]
        if name in _NOT_CONFIG or not (name.isupper() or name.startswith("BLOCK")):
            continue
        if isinstance(val, bool):
            if val:
                parts.append(name)
        else:
            parts.append(f"{name}={val}")
    return " ".join(parts + [f"warps={options.num_warps}", f"stages={options.num_stages}"])


class _MetaArg:
    """A tensor argument as Triton's binder sees it: dtype and address alignment. Meta tensors
    report data_ptr() == 0; a view's storage offset decides its real 16-byte alignment."""

    def __init__(self, t):
        self.dtype = t.dtype
        self.shape = list(t.shape)
        self._ptr = t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr

    def stride(self):
        return ()

    @staticmethod
    def ptr_range():
        return 0


def _ptxas_report(ptx: str, capability: int) -> dict:
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # Triton's own ptxas flags (backends/nvidia/compiler.py: make_cubin), plus -v.
        cmd = [knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", os.path.join(d, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = max([int(x) for x in re.findall(r"Used (\d+) registers", log)] or [0])
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return dict(regs=regs, spill_bytes=spills)


def _compile_one(launch, arch: str, cache: str) -> dict:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    capability = int(arch.split("_")[1])
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    wrap = lambda v: _MetaArg(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
    args = [wrap(a) for a in launch.args]
    kwargs = {k: wrap(v) for k, v in launch.kwargs.items()}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    src = ASTSource(kernel, signature, constexprs, attrs)
    first_tensor = next(a for a in launch.args if isinstance(a, torch.Tensor))
    row = dict(kernel=kernel.__name__, arch=arch, dtype=str(first_tensor.dtype).replace("torch.", ""),
               config=_config_text(kernel, constexprs, options), shared_limit=SHARED_LIMIT[arch])
    key = hashlib.sha256("|".join([src.hash(), json.dumps(options.__dict__, sort_keys=True, default=str), arch,
                                   triton.__version__]).encode()).hexdigest()
    path = os.path.join(cache, key[:2], key + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return {**row, **json.load(f), "cached": True}
    try:
        compiled = triton.compile(src, target=target, options=options.__dict__)
        ptx = compiled.asm["ptx"]
        res = dict(**_ptxas_report(ptx, capability), shared=int(compiled.metadata.shared),
                   atomics=len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.", ptx, re.M)), error="")
    except Exception as e:  # a compile error is a failed row, named, not a crash of the gate
        res = dict(regs=0, spill_bytes=0, shared=0, atomics=0, error=f"{type(e).__name__}: {e}")
    res["status"] = _status(res["error"], res["spill_bytes"], res["shared"], SHARED_LIMIT[arch])
    if res["status"] != "error":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(res, f)
        os.replace(tmp, path)
    return {**row, **res, "cached": False}


def _worker(jobs: list[dict]) -> None:
    import torch

    from fastebm.kernels import _backend
    from fastebm.kernels import fused_linear_logprobs as ll

    if _backend.triton_interpreted():
        raise SystemExit("the compile worker must run without TRITON_INTERPRET")
    cache = os.environ.get("FASTEBM_COMPILE_CACHE") or cache_dir()
    base_tiles = {k: dict(v) for k, v in ll.TILES.items()}
    for job in jobs:
        arch, table = job["arch"], TABLE[job["arch"]]
        ll.TILES.clear()
        ll.TILES.update({k: dict(v) for k, v in base_tiles.items()})
        for k, v in job["tiles"].items():
            t, width = k.split("/")
            ll.TILES[(t, int(width))].update(v)
        dtype = getattr(torch, job["dtype"])
        shape = SHAPES[job["shape"]]
        seen = set()
        # fp32 inputs: the loss kernels' dots are "ieee" or "tf32" as torch.backends.cuda.matmul.allow_tf32
        # says at launch time; both are configurations the launchers can choose.
        variants = [False, True] if dtype == torch.float32 else [False]
        for name, fn in _scenarios(shape, dtype, job["bias"]):
            launches = []
            for tf32 in variants:
                torch.backends.cuda.matmul.allow_tf32 = tf32
                with _backend.capture_launches(table) as captured:
                    fn()
                launches += captured
            for launch in launches:
                row = _compile_one(launch, arch, cache)
                row["uses"] = [f"{job['shape']}/{name}"]
                ident = (row["kernel"], row["config"], row.get("regs"), row.get("shared"), row["uses"][0])
                if ident in seen:
                    continue
                seen.add(ident)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker(json.loads(sys.stdin.read()))
    else:
        raise SystemExit("usage: fastebm doctor --compile sm_80,sm_90  (this module's --worker is internal)")
