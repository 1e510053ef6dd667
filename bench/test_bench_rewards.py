"""Reward computation per step, G = 8: fastebm's batched in-process rewards against a sequential,
reference-style loop (one BERTScore call and one CLIP text pass per completion, one teacher forward
per sample plus the base, unbatched — what the reference's HTTP servers and PCG loop do).

    python -m pytest bench/test_bench_rewards.py
    python -m pytest bench/test_bench_rewards.py -m quick     # the guard only

Models: the tiny policy as PCG teacher, the tiny BERT (BERTScore) and tiny CLIP of the tiny recipe,
2 prompts x G = 8. On a GPU the same code runs on CUDA. Frame embeddings are cached in both variants
(the reference precomputes them offline), so the CLIP difference is the text passes.

Guard (``-m quick``): the sequential loop against the batched rewards with the PCG teacher pass set
as the trainer sets it (``rollout.shared_prefix`` and ``grpo.kernel`` of ``bench_config()``).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from fastebm.config import RewardsConfig  # noqa: E402
from fastebm.data.records import parse_record  # noqa: E402
from fastebm.data.sample import make_records  # noqa: E402
from fastebm.model.forward import Prompt  # noqa: E402
from fastebm.rewards import RewardContext, RewardInputs, build_rewards  # noqa: E402
from fastebm.rewards.pcg import teacher_answer_loglik  # noqa: E402
from fastebm.rewards.text import extract_tag, vision_think_blocks  # noqa: E402

from conftest import bench_config  # noqa: E402

G = 8
GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bench_cache):
    from helpers import clip_sample, make_prompt, tiny_model

    d = tmp_path_factory.mktemp("bench_rewards")
    teacher = tiny_model("qwen2vl", str(bench_cache.models))
    if GPU:
        teacher.model.to("cuda")
    v = teacher.model.config.vision_config
    g = dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size)
    videos = [clip_sample(str(d / f"{i}.webm"), "vp9", seed=i, geometry=g) for i in range(2)]
    prompts = [make_prompt(teacher, videos[i], i) for i in range(2)]
    records = [parse_record(r, "sample.json", i) for i, r in enumerate(make_records()[:2])]
    cfg = RewardsConfig(enabled=["format", "accuracy", "clip", "pcg"])
    cfg.accuracy.tiny = cfg.clip.tiny = True
    ctx = RewardContext(reference=teacher, tiny_cache_dir=str(bench_cache.models), device="cuda" if GPU else "cpu")
    fns = build_rewards(cfg.enabled, cfg, ctx)
    comps = []
    for p in range(2):
        for k in range(G):
            comps.append(f"<vision>A figure {k} walks through the dark hall. Light flickers.</vision>\n"
                         f"<think>They seem afraid of sample {k}. Danger is near.</think>\n"
                         f"<answer>{records[p].reference_answer if k % 2 else 'We should go.'}</answer>")
    inputs = RewardInputs(records=records, group_size=G, videos=videos, prompt_ids=[p.ids for p in prompts])
    fns["clip"](comps, inputs)  # warm the frame-embedding cache (both variants use it)
    return fns, comps, inputs, teacher


def batched(fns, comps, inputs):
    return {n: fn(comps, inputs) for n, fn in fns.items()}


def sequential(fns, comps, inputs, teacher):
    """The reference's shape: per completion requests, PCG one forward per sample + the base."""
    out = {"format": fns["format"](comps, inputs), "accuracy": [], "clip": [], "pcg": []}
    scorer, clip = fns["accuracy"].scorer, fns["clip"]
    tok = teacher.tokenizer
    for i, c in enumerate(comps):
        ans, ref = extract_tag(c, "answer") or "", inputs.record_of(i).reference_answer
        out["accuracy"].append(scorer.score([ans], [ref])[0] if ans else 0.0)
        one = RewardInputs(records=[inputs.record_of(i)], group_size=1, videos=[inputs.videos[i // G]],
                           prompt_ids=[inputs.prompt_ids[i // G]])
        out["clip"].append(clip([c], one)[0])
    for p in range(len(inputs.records)):
        prompt = Prompt(inputs.prompt_ids[p], inputs.videos[p])
        ans = tok(inputs.records[p].reference_answer, add_special_tokens=False)["input_ids"]
        base = float(teacher_answer_loglik(teacher, prompt, [[]], ans)[0])
        for i in range(p * G, (p + 1) * G):
            v, t = vision_think_blocks(comps[i])
            ctx = tok(f"{v}\n{t}\n", add_special_tokens=False)["input_ids"]
            out["pcg"].append(float(teacher_answer_loglik(teacher, prompt, [ctx], ans)[0]) - base)
    return out


@pytest.mark.parametrize("shared_prefix", [False, True], ids=["repeated-prefix", "shared-prefix"])
def test_rewards_batched(benchmark, setup, shared_prefix):
    """One pass per reward model per step; the PCG teacher pass with the prompt repeated per
    sequence, or as one packed row on a single copy of the prefix (rollout.shared_prefix)."""
    fns, comps, inputs, _ = setup
    fns["pcg"].shared_prefix = shared_prefix
    benchmark.extra_info.update(device="cuda" if GPU else "cpu", group_size=G, prompts=2, shared_prefix=shared_prefix)
    try:
        out = benchmark.pedantic(batched, args=(fns, comps, inputs), rounds=5, iterations=1, warmup_rounds=1)
    finally:
        fns["pcg"].shared_prefix = False
    assert all(len(v) == 2 * G for v in out.values())


def test_rewards_sequential_reference_style(benchmark, setup):
    fns, comps, inputs, teacher = setup
    benchmark.extra_info.update(device="cuda" if GPU else "cpu", group_size=G, prompts=2)
    out = benchmark.pedantic(sequential, args=(fns, comps, inputs, teacher), rounds=5, iterations=1, warmup_rounds=1)
    ref = batched(fns, comps, inputs)
    for n in ("accuracy", "clip", "pcg"):  # same values, only the batching differs
        assert out[n] == pytest.approx(ref[n], abs=1e-4), n


@pytest.mark.quick
def test_guard_rewards_vs_sequential(guard, setup):
    fns, comps, inputs, teacher = setup
    cfg, pcg = bench_config(), fns["pcg"]
    pcg.shared_prefix, pcg.kernel = cfg.rollout.shared_prefix, cfg.grpo.kernel  # as the trainer builds it
    try:
        guard.speedup("rewards_speedup_vs_sequential", op="rewards", shape=f"G={G} prompts=2 format+accuracy+clip+pcg",
                      reference=("sequential", lambda: sequential(fns, comps, inputs, teacher)),
                      fastebm=("fastebm", lambda: batched(fns, comps, inputs)), rounds=5)
    finally:
        pcg.shared_prefix, pcg.kernel = False, "fused"
