"""One command that measures a GPU, offline:

    python bench/gpu_check.py --out DIR            # on one H100 / H200: under 8 minutes
    python bench/gpu_check.py --tiny --out DIR     # the same code on the CPU at tiny shapes (~1 minute; a test runs it)
    python bench/gpu_check.py --wheelhouse DIR --python 3.12 [--platform manylinux_2_28_x86_64] [--dry-run]

writes DIR/report.json and DIR/report.md. Every number in them was measured on the machine the
report names in its first lines (nothing here claims a GPU number it did not measure). Sections:

  machine        the environment (fastebm doctor's), how fastebm was found or installed
  matmul         the dense matmul rate (bf16 on a GPU, fp32 on a CPU) and the copy bandwidth, measured first
  kernel_tests   the kernel, cascade- and packed-attention tests on this device (pytest; --tiny: a subset)
  kernels        fused GRPO loss fwd+bwd per backward strategy, against Liger's chunked loss and eager
                 PyTorch (time, achieved TFLOP/s, % of the measured matmul rate, peak memory, and the cost
                 model's prediction at the measured rates); the scoring pass; the logits loss
  rollout        shared-prefix rollout against transformers' generate (G = 8, ~1,500-token video prefix,
                 256 new tokens; a Qwen2-VL-2B-shaped random model): tokens per second
  train_step     one whole GRPO step of that model (fused loss, shared prefix, the four rewards with tiny
                 reward models): time per phase, tokens per second, peak memory
  video          DALI GPU (NVDEC) decoding against PyAV, frames per second

It needs PyTorch, Triton and transformers; it installs fastebm from this checkout without
dependencies (``pip install --no-deps --no-build-isolation -e .``) when ``import fastebm`` does not
already resolve to it; a section whose dependency is missing is reported as skipped naming the
package, and a section that fails is reported with its error: neither stops the others.

``--wheelhouse DIR --python X.Y`` downloads, for an offline machine, the wheels fastebm needs beyond
torch and Triton (pinned to the versions installed here, dependencies resolved here, ``--no-deps``),
for that Python version and platform; install them there with
``pip install --no-index --find-links DIR DIR/*.whl`` and then fastebm with
``pip install --no-deps --no-build-isolation -e .`` (README, "Offline install").
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ["machine", "matmul", "kernel_tests", "kernels", "rollout", "train_step", "video"]


# --------------------------------------------------------------------------------------------- #
# Installation and offline wheels
# --------------------------------------------------------------------------------------------- #


def ensure_fastebm(allow_install: bool = True) -> str:
    """Make ``import fastebm`` resolve to this checkout: already so, or pip install it (no deps)."""
    def from_checkout() -> bool:
        r = subprocess.run([sys.executable, "-c", "import fastebm, os; print(os.path.realpath(fastebm.__file__))"],
                           capture_output=True, text=True, cwd=REPO)
        return r.returncode == 0 and r.stdout.strip().startswith(os.path.realpath(REPO))

    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    if from_checkout():
        return f"fastebm imported from this checkout ({REPO}); nothing installed"
    if not allow_install:
        return "fastebm is not importable from this checkout and --no-install was given"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", REPO]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return f"installed: {' '.join(cmd)}"


# Provided by the GPU machine's image: never downloaded.
PREINSTALLED = {"torch", "triton"}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(roots=None, extras=("video",)) -> dict[str, str]:
    """{distribution: installed version} of fastebm's install requirements (and ``extras``) and their
    requirements, transitively, as installed here; torch, Triton and NVIDIA's CUDA wheels left out."""
    from packaging.requirements import Requirement

    if roots is None:
        text = open(os.path.join(REPO, "setup.py"), encoding="utf-8").read()
        body = text[text.index("install_requires=["):text.index("],", text.index("install_requires=["))]
        roots = re.findall(r'^\s*"([^"]+)",', body, re.M)
        for extra in extras:
            m = re.search(rf'"{extra}": \[([^\]]*)\]', text)
            roots += re.findall(r'"([^"]+)"', m.group(1)) if m else []
    env = {"extra": ""}
    seen: dict[str, str] = {}
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = _canon(req.name)
        if name in seen or name in PREINSTALLED or name.startswith("nvidia-") and name != "nvidia-dali-cuda130":
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue                                 # not installed here: nothing to pin
        seen[name] = dist.version
        todo += [Requirement(r) for r in (dist.requires or []) if "extra ==" not in r]
    return dict(sorted(seen.items()))


def wheelhouse_command(dest: str, python: str, platform_tag: str, pins: dict[str, str]) -> list[str]:
    """``pip download`` of exactly ``pins`` (no resolution: --no-deps) as binary wheels for another
    Python and platform. Pure-Python packages come as py3-none-any wheels; compiled ones for ``python``."""
    major, minor = python.split(".")[:2]
    return [sys.executable, "-m", "pip", "download", "--dest", dest, "--only-binary=:all:", "--no-deps",
            "--python-version", f"{major}.{minor}", "--implementation", "cp", "--abi", f"cp{major}{minor}",
            "--abi", "abi3", "--abi", "none", "--platform", platform_tag, "--platform", "any",
            *[f"{n}=={v}" for n, v in pins.items()]]


def wheelhouse(dest: str, python: str, platform_tag: str, dry_run: bool) -> int:
    pins = requirement_closure()
    cmd = wheelhouse_command(dest, python, platform_tag, pins)
    print(" ".join(cmd))
    if dry_run:
        return 0
    os.makedirs(dest, exist_ok=True)
    r = subprocess.run(cmd)
    if r.returncode == 0:
        print(f"\n{len(pins)} wheels in {dest}. On the offline machine (torch and Triton already there):\n"
              f"  pip install --no-index --find-links {dest} {dest}/*.whl\n"
              f"  pip install --no-deps --no-build-isolation -e /path/to/fastebm")
    return r.returncode


# --------------------------------------------------------------------------------------------- #
# Sections
# --------------------------------------------------------------------------------------------- #


class Skipped(Exception):
    """A section that cannot run here; the message names the reason (the missing package)."""


def _need(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Skipped(f"{package} is not installed ({e})") from e


def _timeit(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` (synchronised on CUDA)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _peak(fn) -> float | None:
    """Peak memory (GiB) the call needed beyond what was allocated before it (CUDA only)."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 30


def section_machine(ctx):
    from fastebm.doctor.env import environment

    env = environment()
    return dict(environment=env, install=ctx["install"], device=ctx["device_name"])


def section_matmul(ctx):
    import torch

    dev, tiny = ctx["device"], ctx["tiny"]
    n = 512 if tiny else 8192
    dt = torch.float32 if dev.type == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    t = _timeit(lambda: a @ b, reps=3 if tiny else 20)
    x = torch.empty(int((64 if tiny else 2048) * 2 ** 20 // 4), device=dev)
    y = torch.empty_like(x)
    tc = _timeit(lambda: y.copy_(x), reps=3 if tiny else 20)
    ctx["tflops"] = 2 * n ** 3 / t / 1e12
    ctx["gbs"] = 2 * x.numel() * 4 / tc / 1e9          # read + write
    return dict(dtype=str(dt).replace("torch.", ""), n=n, matmul_tflops=ctx["tflops"], copy_gbs=ctx["gbs"])


def section_kernel_tests(ctx):
    files = ["tests/kernels", "tests/prefix/test_cascade_attention.py", "tests/prefix/test_packed_attention.py"]
    if ctx["tiny"]:   # on a CPU Triton runs under the interpreter: the backward strategies' and the
        # attentions' tests on the PyTorch path stand for the rest (the full suite runs them all)
        files = ["tests/kernels/test_backward_strategies.py"] + files[1:]
        sel = ["-m", "not slow", "-k", "torch and not triton"]
    else:
        sel = ["-m", "slow or not slow"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *sel]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=ctx["tests_timeout"],
                       env={**os.environ, "PYTHONPATH": REPO})
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", tail)}
    out = dict(command=" ".join(cmd[2:]), summary=tail, seconds=time.perf_counter() - t0, subset=ctx["tiny"], **counts)
    if r.returncode not in (0, 5) or counts.get("failed") or counts.get("error") or counts.get("errors"):
        raise RuntimeError(f"kernel tests failed: {tail}\n{r.stdout[-3000:]}")
    return out


def _loss_inputs(ctx):
    import torch

    if ctx["tiny"]:
        B, T, H, V, dt = 2, 64, 64, 4099, torch.float32
    else:
        B, T, H, V, dt = 8, 1024, 3584, 152064, torch.bfloat16
    g = torch.Generator().manual_seed(0)
    dev = ctx["device"]
    h = torch.randn(B, T, H, generator=g).to(dev, dt)
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dev, dt)
    ids = torch.randint(0, V, (B, T), generator=g).to(dev)
    mask = torch.ones(B, T, device=dev)
    adv = torch.randn(B, generator=g).to(dev)
    old = (torch.randn(B, T, generator=g) * 0.1 - 12).to(dev)
    return (B, T, H, V, dt), (h, w, ids, mask, adv, old, old + 0.05)


def section_kernels(ctx):
    import torch

    from fastebm.doctor import costs
    from fastebm.kernels import GRPOLossOptions, fused_linear_grpo_loss, grpo_loss_from_logps, token_logprobs

    (B, T, H, V, dt), (h0, w0, ids, mask, adv, old, ref) = _loss_inputs(ctx)
    kw = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo")
    opts = GRPOLossOptions(**kw)
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    reps = 2 if ctx["tiny"] else 5
    N = B * T
    shape = costs.LossShape("measured", N, H, V, elem_bytes=h0.element_size())
    rows = []

    def measure(name, loss_fn, strategy=None):
        def call():
            loss_fn().backward()
            h.grad = w.grad = None
        t = _timeit(call, reps)
        peak = _peak(call)
        flops = 4 * 2.0 * N * V * H           # forward + recomputed logits + two gradient products
        row = dict(provider=name, ms=t * 1e3, tflops=flops / t / 1e12, pct_of_matmul=100 * flops / t / 1e12 / ctx["tflops"],
                   peak_gib=peak)
        if strategy is not None:
            pred = costs.strategy_costs(shape, strategy, 0.0).time_s(ctx["tflops"], ctx["gbs"])
            row["predicted_ms_at_measured_rates"] = pred * 1e3
        rows.append(row)

    for strategy in ("gemm", "atomic", "sparse"):
        stats = {}

        def fused(s=strategy, st=stats):
            loss, m = fused_linear_grpo_loss(h, w, ids, mask, adv, old, ref, opts, backward=s)
            st["m"] = m
            return loss
        measure(f"fastebm fused, backward={strategy}", fused, strategy)
        if strategy == "sparse" and "sparse_tiles" in stats.get("m", {}):
            skipped, total = stats["m"]["sparse_tiles"].tolist()
            rows[-1]["sparse_skipped_fraction"] = skipped / max(total, 1)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(compiled=False, temperature=1.0, **kw)
        measure("Liger LigerFusedLinearGRPOLoss (chunked)",
                lambda: liger(h, w, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0])
    except ImportError as e:
        rows.append(dict(provider="Liger chunked", skipped=f"liger-kernel is not installed ({e})"))

    def eager():
        logits = (h @ w.t()).float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
        return grpo_loss_from_logps(logp, old, ref, adv, mask, opts).loss
    try:
        measure("PyTorch eager (full logits)", eager)
    except torch.OutOfMemoryError as e:
        rows.append(dict(provider="PyTorch eager (full logits)", failed=f"out of memory: {e}"))
    with torch.no_grad():
        t = _timeit(lambda: token_logprobs(h0, w0, ids), reps)
    rows.append(dict(provider="fastebm token_logprobs (scoring, no grad)", ms=t * 1e3,
                     tflops=2.0 * N * V * H / t / 1e12, pct_of_matmul=100 * 2.0 * N * V * H / t / 1e12 / ctx["tflops"]))
    return dict(shape=dict(B=B, T=T, H=H, V=V, dtype=str(dt).replace("torch.", "")), rows=rows,
                note="TFLOP/s count 4 x 2NVH for fwd+bwd (2NVH for scoring); predictions: fastebm.doctor.costs "
                     "at this section's measured matmul rate and copy bandwidth")


def _bench_model(ctx, tmp):
    """A random Qwen2-VL with Qwen2-VL-2B's text shape on a GPU (the tiny one with --tiny), its
    tokenizer and a decoded synthetic clip."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from fastebm.config import VideoConfig
    from fastebm.data.synth import write_synthetic_clip
    from fastebm.data.video import load_video_sample
    from fastebm.tiny import build_tiny_tokenizer, tiny_config

    out = os.path.join(tmp, "model")
    tok = build_tiny_tokenizer(out)
    cfg = tiny_config("qwen2vl", tok)
    if not ctx["tiny"]:
        t = cfg.text_config
        t.hidden_size, t.intermediate_size, t.num_hidden_layers = 1536, 8960, 28
        t.num_attention_heads, t.num_key_value_heads = 12, 2
        t.rope_parameters["mrope_section"] = [16, 24, 24]
        t.layer_types = ["full_attention"] * 28
        cfg.vision_config.hidden_size = 1536
    dt = torch.float32 if ctx["tiny"] else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(ctx["device"]):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dt, attn_implementation="sdpa").eval()
    model.generation_config = GenerationConfig(eos_token_id=[cfg.text_config.eos_token_id],
                                               pad_token_id=cfg.text_config.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    clip = write_synthetic_clip(os.path.join(tmp, "c.webm"), codec="vp9", width=112, height=112, num_frames=16, fps=4)
    video = load_video_sample(clip, VideoConfig(min_frames=4, max_frames=4 if ctx["tiny"] else 16,
                                                min_pixels=3136, max_pixels=12544))
    return model, tok, video, out


def section_rollout(ctx):
    import torch

    from fastebm.config import RolloutConfig
    from fastebm.model import decode as decode_mod
    from fastebm.model import rollout as rollout_mod
    from fastebm.model.forward import Prompt

    model, tok, video, _ = ctx["model"]
    c = model.config
    G, P, S = (4, 64, 16) if ctx["tiny"] else (8, 1500, 256)
    nv = video.num_video_tokens
    filler = [int(x) for x in torch.randint(100, 400, (max(0, P - nv - 2),), generator=torch.Generator().manual_seed(0))]
    prompt = Prompt([c.vision_start_token_id] + [c.video_token_id] * nv + [c.vision_end_token_id] + filler, video)
    cfg = RolloutConfig(group_size=G, temperature=1.0, max_new_tokens=S)
    real_eos = rollout_mod.eos_ids
    rollout_mod.eos_ids = lambda m, t: [-1]          # fixed-length samples: both paths decode G x S tokens
    try:
        out = {}
        for name, fn in (("shared prefix (fastebm)", decode_mod.shared_prefix_rollout),
                         ("transformers generate (prefix repeated)", rollout_mod.rollout)):
            t = _timeit(lambda: fn(model, tok, [prompt], cfg), reps=1 if ctx["tiny"] else 2)
            out[name] = dict(seconds=t, tokens_per_s=G * S / t)
    finally:
        rollout_mod.eos_ids = real_eos
    speedup = out["transformers generate (prefix repeated)"]["seconds"] / out["shared prefix (fastebm)"]["seconds"]
    return dict(G=G, prefix_tokens=len(prompt.ids), video_tokens=nv, new_tokens=S, results=out, speedup=speedup)


def section_train_step(ctx):
    import torch

    from fastebm.config import load_config
    from fastebm.train.trainer import Trainer

    _, _, _, model_dir = ctx["model"]
    tmp = ctx["tmp"]
    over = [f"run.output_dir={tmp}/run", f"model.tiny_cache_dir={tmp}/models", f"data.sample_dir={tmp}/sample",
            "log.progress=false", "model.tiny=", f"model.path={model_dir}", "rollout.shared_prefix=true",
            "grpo.kernel=fused", "rewards.enabled=['format', 'accuracy', 'clip', 'pcg']"]
    if not ctx["tiny"]:
        over += ["run.device=cuda", "rollout.group_size=8", "rollout.max_new_tokens=256", "train.prompts_per_step=2"]
    cfg = load_config(os.path.join(REPO, "recipes", "tiny.toml"), over)
    t = Trainer(cfg)
    try:
        t.train_step()                       # warm-up: compiles, caches
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        m = t.train_step()
    finally:
        t.close()
    toks = m.get("tokens/completion", 0)
    return dict(phases_s={k: v for k, v in m.items() if k.startswith("time/")}, completion_tokens=toks,
                tokens_per_s=toks / m["time/step_s"] if m.get("time/step_s") else None,
                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None,
                rewards=sorted(cfg.rewards.enabled), loss=m.get("loss"))


def section_video(ctx):
    from fastebm.data.synth import write_synthetic_clip
    from fastebm.data.video import dali_backend, pyav_backend

    import torch

    if not dali_backend.available():
        raise Skipped("nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
    gpu = torch.cuda.is_available()
    codec = "h264" if gpu else "vp9"             # DALI's CPU decoder takes VP8/VP9/MJPEG only
    w, h, n = (1280, 720, 96) if not ctx["tiny"] else (320, 180, 24)
    path = write_synthetic_clip(os.path.join(ctx["tmp"], f"v.{'mp4' if codec == 'h264' else 'webm'}"), codec=codec,
                                width=w, height=h, num_frames=n, fps=24)
    info = pyav_backend.probe(path)
    idx = list(range(n))
    out = {}
    dali_name = f"DALI ({'GPU, NVDEC' if gpu else 'CPU'})"
    for name, fn in (("PyAV (CPU)", lambda: pyav_backend.decode_frames(path, info, idx)),
                     (dali_name, lambda: dali_backend.decode_frames(path, info, idx, gpu=gpu))):
        t = _timeit(fn, reps=2)
        out[name] = dict(seconds=t, frames_per_s=n / t)
    return dict(clip=f"{w}x{h} {codec}, {n} frames", results=out)


SECTION_FNS = {"machine": section_machine, "matmul": section_matmul, "kernel_tests": section_kernel_tests,
               "kernels": section_kernels, "rollout": section_rollout, "train_step": section_train_step,
               "video": section_video}


def run_sections(ctx, only=None) -> dict:
    report = {}
    for name in SECTIONS:
        if only and name not in only:
            report[name] = dict(status="skipped", reason="not selected (--only)")
            continue
        t0 = time.perf_counter()
        try:
            if name in ("rollout", "train_step") and "model" not in ctx:
                _need("transformers", "transformers")
                ctx["model"] = _bench_model(ctx, ctx["tmp"])
            data = SECTION_FNS[name](ctx)
            report[name] = dict(status="ok", **data)
        except Skipped as e:
            report[name] = dict(status="skipped", reason=str(e))
        except ImportError as e:
            report[name] = dict(status="skipped", reason=f"{e.name or e} is not installed ({e})")
        except Exception as e:  # report it and go on with the other sections
            report[name] = dict(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        report[name]["seconds"] = time.perf_counter() - t0
        print(f"[gpu_check] {name}: {report[name]['status']} ({report[name]['seconds']:.1f}s)", flush=True)
    return report


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def to_markdown(report: dict) -> str:
    m = report["meta"]
    lines = [f"# fastebm GPU check", "", f"**Measured on: {m['machine']}** ({m['mode']}, {m['date']}). Every number "
             f"below comes from this machine in this run; nothing else is claimed.", ""]
    for name in SECTIONS:
        s = report[name]
        lines += [f"## {name}", "", f"status: **{s['status']}** ({s['seconds']:.1f} s)"]
        if s["status"] == "skipped":
            lines.append(f"skipped: {s['reason']}")
        elif s["status"] == "failed":
            lines += ["", "```", s["error"], "```"]
        else:
            rows = s.get("rows")
            for k, v in s.items():
                if k in ("status", "seconds", "rows", "traceback"):
                    continue
                lines.append(f"- {k}: {json.dumps(v, default=_fmt) if isinstance(v, (dict, list)) else _fmt(v)}")
            if rows:
                keys = sorted({k for r in rows for k in r if k != "provider"})
                lines += ["", "| provider | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
                lines += ["| " + r["provider"] + " | " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write DIR/report.json and DIR/report.md")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (what the test runs)")
    p.add_argument("--only", help="comma-separated sections to run (the others are reported as skipped)")
    p.add_argument("--no-install", action="store_true", help="never pip install fastebm from the checkout")
    p.add_argument("--tests-timeout", type=float, default=300, help="seconds for the kernel tests")
    p.add_argument("--wheelhouse", metavar="DIR", help="download offline wheels into DIR instead of measuring")
    p.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="with --wheelhouse: the offline machine's Python version")
    p.add_argument("--platform", default="manylinux_2_28_x86_64", help="with --wheelhouse: its platform tag")
    p.add_argument("--dry-run", action="store_true", help="with --wheelhouse: print the pip command only")
    a = p.parse_args(argv)
    if a.wheelhouse:
        return wheelhouse(a.wheelhouse, a.python, a.platform, a.dry_run)
    if not a.out:
        p.error("--out DIR is required (or --wheelhouse DIR)")
    install = ensure_fastebm(not a.no_install)
    import torch

    if not torch.cuda.is_available() and not a.tiny:
        print("[gpu_check] no CUDA GPU visible: running the --tiny shapes on the CPU", flush=True)
        a.tiny = True
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = (torch.cuda.get_device_name() if dev.type == "cuda"
            else f"CPU only: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        ctx = dict(device=dev, device_name=name, tiny=a.tiny, tmp=tmp, install=install, tflops=1.0, gbs=1.0,
                   tests_timeout=a.tests_timeout)
        t0 = time.perf_counter()
        report = run_sections(ctx, a.only.split(",") if a.only else None)
    report["meta"] = dict(machine=name, mode="tiny shapes (CPU)" if a.tiny else "flagship shapes",
                          date=time.strftime("%Y-%m-%d %H:%M:%S"), seconds=time.perf_counter() - t0)
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(to_markdown(report))
    failed = [n for n in SECTIONS if report[n]["status"] == "failed"]
    print(f"[gpu_check] wrote {a.out}/report.json and report.md; failed sections: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
