"""Repeated prefix against shared prefix: rollout, scoring forward, training forward (fwd+bwd).

    python -m pytest bench/test_bench_prefix.py --benchmark-group-by=param:phase,param:ratio,param:G
    python -m pytest bench/test_bench_prefix.py -m quick       # the three guards only

Scoring and training run three ways: ``repeated``; ``shared-mask`` (the packed row through the
model's attention with a dense block mask); ``shared`` (the packed row with block-by-block
attention, the default). ``test_training_forward_memory`` records their peak memory.

Prefix/suffix ratios 1, 4 and 16 and G = 4, 8, 16 with a suffix of S tokens. On the CPU: a small
random Qwen2-VL (hidden 256, 4 layers; S = 16). On a GPU: a model of Qwen2-VL-2B's shape (hidden
1536, 28 layers, 12 heads, 2 KV heads; S = 128). Both are built from a config with random weights.
Rollout lengths are fixed (EOS is never a stop here) so both paths decode the same number of tokens.

Guards (``-m quick``) at prefix 16x the completion, G = 8: rollout, scoring pass and training
fwd+bwd, the repeated prefix against the path the trainer takes for ``rollout.shared_prefix`` of
``bench_config()`` (so ``--fastebm-set rollout.shared_prefix=false`` times repeated against repeated).
Scoring runs the trainer's ``suffix_logprobs`` with the same ``grpo.kernel`` on both sides.
"""

import os
import tempfile

import pytest
import torch

from fastebm.config import RolloutConfig, VideoConfig
from fastebm.model.logprobs import scoring_logprobs, suffix_logprobs, training_logprobs
from fastebm.model import decode as decode_mod
from fastebm.model import rollout as rollout_mod
from fastebm.model.forward import Prompt, completion_hidden_states, lm_head_weight
from fastebm.model.prefix import shared_prefix_hidden_states

from conftest import bench_config, cpu_peak_rss_growth, cuda_peak_growth

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
S = 128 if GPU else 16
HERE = os.path.abspath(__file__)
RATIOS = [1, 4, 16]
GROUPS = [4, 8, 16]


def build_model_and_video(clip_dir: str):
    """The bench model (random weights, see the module doc) and one decoded clip."""
    from transformers import AutoModelForImageTextToText

    from fastebm.data.synth import write_synthetic_clip
    from fastebm.data.video import load_video_sample
    from fastebm.tiny import build_tiny_tokenizer, tiny_config

    tok = build_tiny_tokenizer()
    cfg = tiny_config("qwen2vl", tok)
    t = cfg.text_config
    if GPU:  # Qwen2-VL-2B's text shape
        t.hidden_size, t.intermediate_size, t.num_hidden_layers = 1536, 8960, 28
        t.num_attention_heads, t.num_key_value_heads = 12, 2
        t.rope_parameters["mrope_section"] = [16, 24, 24]
        cfg.vision_config.hidden_size = 1536
    else:
        t.hidden_size, t.intermediate_size, t.num_hidden_layers = 256, 768, 4
        t.num_attention_heads, t.num_key_value_heads = 8, 2
        t.rope_parameters["mrope_section"] = [4, 6, 6]
        cfg.vision_config.hidden_size = 256
    t.layer_types = ["full_attention"] * t.num_hidden_layers
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16 if GPU else torch.float32,
                                                    attn_implementation="sdpa").to(DEV).eval()
    clip = os.path.join(clip_dir, "c.webm")
    write_synthetic_clip(clip, codec="vp9", width=56, height=56, num_frames=8, fps=4)
    video = load_video_sample(clip, VideoConfig(min_frames=4, max_frames=4, min_pixels=3136, max_pixels=3136))
    return model, tok, video


@pytest.fixture(scope="module")
def model_and_video(tmp_path_factory):
    return build_model_and_video(str(tmp_path_factory.mktemp("v")))


def make_prompt(model, tok, video, P: int) -> Prompt:
    c = model.config
    nv = video.num_video_tokens
    assert P >= nv + 2, (P, nv)
    filler = [int(x) for x in torch.randint(100, 400, (P - nv - 2,), generator=torch.Generator().manual_seed(P))]
    return Prompt([c.vision_start_token_id] + [c.video_token_id] * nv + [c.vision_end_token_id] + filler, video)


@pytest.fixture
def no_eos(monkeypatch):
    """Fixed-length rollouts: no token stops a sample."""
    monkeypatch.setattr(rollout_mod, "eos_ids", lambda model, tok: [-1])
    monkeypatch.setattr(decode_mod, "eos_ids", lambda model, tok: [-1])


def _completions(G, s=S):
    g = torch.Generator().manual_seed(G)
    return [[int(x) for x in torch.randint(100, 400, (s,), generator=g)] for _ in range(G)]


@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("mode", ["repeated", "shared"])
def test_rollout(benchmark, model_and_video, no_eos, mode, ratio, G):
    model, tok, video = model_and_video
    prompt = make_prompt(model, tok, video, ratio * S)
    cfg = RolloutConfig(group_size=G, temperature=1.0, max_new_tokens=S)
    fn = decode_mod.shared_prefix_rollout if mode == "shared" else rollout_mod.rollout
    benchmark.extra_info.update(phase="rollout", mode=mode, ratio=ratio, G=G, P=len(prompt.ids), S=S,
                                device=str(DEV))
    r = benchmark.pedantic(fn, args=(model, tok, [prompt], cfg), rounds=5, iterations=1, warmup_rounds=1)
    assert all(len(c) == S for c in r.completion_ids)


FORWARD_MODES = ["repeated", "shared-mask", "shared"]


def _forward_fn(mode):
    """The scoring / training forward of each mode: the repeated prefix; the packed row with the
    model's attention over a dense block mask; the packed row with block-by-block attention."""
    if mode == "repeated":
        return completion_hidden_states
    attention = "mask" if mode == "shared-mask" else "blocks"
    return lambda *a: shared_prefix_hidden_states(*a, attention=attention)


@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("mode", FORWARD_MODES)
def test_scoring(benchmark, model_and_video, mode, ratio, G):
    model, tok, video = model_and_video
    prompt = make_prompt(model, tok, video, ratio * S)
    comps = _completions(G)
    fn = _forward_fn(mode)
    W = lm_head_weight(model)

    @torch.no_grad()
    def score():
        cb = fn(model, [prompt], comps, [0] * G)
        return scoring_logprobs(cb.hidden, W, cb.ids, kernel="eager")

    benchmark.extra_info.update(phase="scoring", mode=mode, ratio=ratio, G=G, P=len(prompt.ids), S=S, device=str(DEV))
    lp = benchmark.pedantic(score, rounds=5, iterations=1, warmup_rounds=1)
    assert lp.shape == (G, S)


def train_call(model, tok, video, mode, ratio, G, s=S):
    """One training forward + backward (no-argument call) of ``mode`` at prefix ``ratio * s``."""
    prompt = make_prompt(model, tok, video, ratio * s)
    comps = _completions(G, s)
    fn = _forward_fn(mode)
    W = lm_head_weight(model)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        cb = fn(model, [prompt], comps, [0] * G)
        loss = (training_logprobs(cb.hidden, W, cb.ids, kernel="eager") * cb.mask).sum()
        loss.backward()
        return float(loss.detach())

    return fwd_bwd


def train_memory_factory(mode, ratio, G, s):
    """For the peak-RSS probe (a fresh process): build everything, return the call to measure."""
    return train_call(*build_model_and_video(tempfile.mkdtemp()), mode, ratio, G, s)


@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("mode", FORWARD_MODES)
def test_training_forward(benchmark, model_and_video, mode, ratio, G):
    fwd_bwd = train_call(*model_and_video, mode, ratio, G)
    benchmark.extra_info.update(phase="train_fwd_bwd", mode=mode, ratio=ratio, G=G, P=ratio * S, S=S,
                                device=str(DEV))
    benchmark.pedantic(fwd_bwd, rounds=2, iterations=1, warmup_rounds=1)
    model_and_video[0].zero_grad(set_to_none=True)


MEM_S = 128 if GPU else 64  # longer suffixes than the timing cells: the attention's share grows with them


@pytest.mark.parametrize("mode", FORWARD_MODES)
def test_training_forward_memory(benchmark, model_and_video, mode):
    """Peak memory of one training forward + backward at prefix 8x the suffix, G = 8."""
    ratio, G = 8, 8
    call = train_call(*model_and_video, mode, ratio, G, MEM_S)
    call()
    if GPU:
        peak, method = cuda_peak_growth(call), "torch.cuda.max_memory_allocated growth"
    else:
        peak, method = cpu_peak_rss_growth(HERE, "train_memory_factory", mode, ratio, G, MEM_S), \
            "subprocess peak RSS growth"
    benchmark.extra_info.update(phase="train_memory", mode=mode, ratio=ratio, G=G, P=ratio * MEM_S, S=MEM_S,
                                device=str(DEV), peak_mem_bytes=peak, mem_method=method)
    benchmark.pedantic(call, rounds=2, iterations=1)
    model_and_video[0].zero_grad(set_to_none=True)
    print(f"\ntraining fwd+bwd {mode} P={ratio * MEM_S} S={MEM_S} G={G}: peak growth {peak / 2**20:.0f} MiB")


def test_prefix_kv_memory_independent_of_G(model_and_video):
    """The shared rollout keeps one copy of the prefix K/V whatever G is: the static buffers are
    per-sample suffix only. Checked on the decoder's own tensors."""
    model, tok, video = model_and_video
    prompt = make_prompt(model, tok, video, 16 * S)
    sizes = {}
    orig = decode_mod._PrefixDecoder.__init__

    def spy(self, m, prefix_kv, prefix_len, rows, max_new, **kw):
        orig(self, m, prefix_kv, prefix_len, rows, max_new, **kw)
        sizes[rows] = (sum(k.numel() + v.numel() for k, v in prefix_kv),
                    sum(k.numel() + v.numel() for k, v in zip(self.k, self.v)))

    decode_mod._PrefixDecoder.__init__ = spy
    try:
        for G in GROUPS:
            decode_mod.shared_prefix_rollout(model, tok, [prompt], RolloutConfig(group_size=G, max_new_tokens=4))
    finally:
        decode_mod._PrefixDecoder.__init__ = orig
    prefix = {G: s[0] for G, s in sizes.items()}
    assert len(set(prefix.values())) == 1, prefix
    assert sizes[16][1] == 4 * sizes[4][1]  # suffix buffers scale with G, the prefix does not


# ------------------------------------------------------------------------------------ guards --- #

GUARD_RATIO, GUARD_G = 16, 8


def _guard_prompt(model_and_video):
    model, tok, video = model_and_video
    prompt = make_prompt(model, tok, video, GUARD_RATIO * S)
    return prompt, f"P={len(prompt.ids)} S={S} G={GUARD_G}"


@pytest.mark.quick
def test_guard_prefix_rollout(guard, model_and_video, no_eos):
    model, tok, _ = model_and_video
    prompt, shape = _guard_prompt(model_and_video)
    cfg = RolloutConfig(group_size=GUARD_G, temperature=1.0, max_new_tokens=S)
    # What Trainer.rollout runs for this setting.
    fast = decode_mod.shared_prefix_rollout if bench_config().rollout.shared_prefix else rollout_mod.rollout
    guard.speedup("prefix_rollout_speedup", op="rollout", shape=shape,
                  reference=("repeated", lambda: rollout_mod.rollout(model, tok, [prompt], cfg)),
                  fastebm=("fastebm", lambda: fast(model, tok, [prompt], cfg)), rounds=5)


@pytest.mark.quick
def test_guard_prefix_scoring(guard, model_and_video):
    model, tok, _ = model_and_video
    prompt, shape = _guard_prompt(model_and_video)
    comps = _completions(GUARD_G)
    cfg = bench_config()

    def score(shared_prefix):  # the trainer's reference / old-policy pass (one forward per prompt group)
        return lambda: suffix_logprobs(model, [prompt], comps, [0] * GUARD_G, kernel=cfg.grpo.kernel,
                                       shared_prefix=shared_prefix, pad_id=tok.pad_token_id or 0)

    guard.speedup("prefix_scoring_speedup", op="scoring", shape=shape, reference=("repeated", score(False)),
                  fastebm=("fastebm", score(cfg.rollout.shared_prefix)), rounds=5)


@pytest.mark.quick
def test_guard_prefix_training(guard, model_and_video):
    _, shape = _guard_prompt(model_and_video)
    mode = "shared" if bench_config().rollout.shared_prefix else "repeated"  # Trainer.hidden_states' choice
    try:
        guard.speedup("prefix_training_speedup", op="train_fwd_bwd", shape=shape,
                      reference=("repeated", train_call(*model_and_video, "repeated", GUARD_RATIO, GUARD_G)),
                      fastebm=("fastebm", train_call(*model_and_video, mode, GUARD_RATIO, GUARD_G)), rounds=5)
    finally:
        model_and_video[0].zero_grad(set_to_none=True)
