"""``fastebm doctor --recipe R``: the recipe's own model and reward paths on this machine.

The recipe is loaded and validated; its policy model is loaded through the real loading code (a
tiny recipe builds its tiny model first) and run on a synthetic clip + prompt, its fused scoring
log-probs compared with the eager ones; each enabled reward is built as the trainer builds it and
scores two completions (finite values, one per completion). Nothing is downloaded: a recipe whose
model or reward weights are not on this machine fails that check, naming the missing path.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile

import torch

from fastebm.doctor.checks import three_way


def recipe_checks(path: str, device: torch.device, overrides: list[str]) -> list:
    state: dict = {"overrides": list(overrides)}

    def config():
        from fastebm.config import load_config
        from fastebm.rewards import check_rewards

        state["cfg"] = cfg = load_config(path, state["overrides"])
        check_rewards(cfg.rewards, source=path)
        return [("config errors", 0.0, 0.0)]

    def model():
        from fastebm.data.prompts import build_messages, encode_prompt
        from fastebm.data.records import parse_record
        from fastebm.data.sample import make_records
        from fastebm.data.synth import write_synthetic_clip
        from fastebm.data.video import load_video_sample
        from fastebm.model.forward import Prompt, completion_hidden_states, lm_head_weight
        from fastebm.model.loading import load_model, resolve_model_path
        from fastebm.model.logprobs import scoring_logprobs

        cfg = state.get("cfg") or _config(state, path)
        lm = load_model(resolve_model_path(cfg.model, cfg.run.seed), device, cfg.model.dtype)
        v = lm.model.config.vision_config
        geometry = dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                        merge_size=v.spatial_merge_size)
        state["tmp"] = tmp = tempfile.mkdtemp(prefix="fastebm-doctor-")
        clip = write_synthetic_clip(os.path.join(tmp, "clip.webm"), codec="vp9", width=96, height=72, num_frames=16,
                                    fps=8)
        video_cfg = dataclasses.replace(cfg.video, cache_dir="", min_frames=4, max_frames=4)
        video = load_video_sample(clip, video_cfg, **geometry)
        rec = parse_record(make_records()[0], "sample.json", 0)
        prompt = Prompt(encode_prompt(lm.tokenizer, build_messages(rec, "A profile.", tuple(cfg.data.tags)),
                                      video.num_video_tokens), video)
        comp = lm.tokenizer("<vision>A hall.</vision><think>Fear.</think><answer>Run.</answer>",
                            add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            cb = completion_hidden_states(lm.model, [prompt], [comp], [0])
            w = lm_head_weight(lm.model)
            fused = scoring_logprobs(cb.hidden, w, cb.ids, 1.0, kernel="fused")
            eager64 = scoring_logprobs(cb.hidden.double(), w.double(), cb.ids, 1.0, kernel="eager")
            eager = scoring_logprobs(cb.hidden, w, cb.ids, 1.0, kernel="eager")
        state.update(lm=lm, video=video, prompt=prompt, record=rec)
        dt = cb.hidden.dtype if cb.hidden.dtype in (torch.bfloat16, torch.float16) else torch.float32
        m = cb.mask.bool()
        return [("finite hidden states", float(not torch.isfinite(cb.hidden).all()), 0.0),
                three_way("fused vs eager log-probs", fused[m], eager64[m], eager[m], dt)]

    def reward(name):
        def run():
            from fastebm.rewards import RewardContext, RewardInputs, build_rewards

            if "lm" not in state:
                model()
            cfg, lm = state["cfg"], state["lm"]
            ctx = RewardContext(tags=tuple(cfg.data.tags), device=device, reference=lm,
                                tiny_cache_dir=cfg.model.tiny_cache_dir, video_cache_dir=state["tmp"],
                                kernel=cfg.grpo.kernel)
            fn = build_rewards([name], cfg.rewards, ctx)[name]
            v, t, a = cfg.data.tags
            comps = [f"<{v}>A figure walks through the dark hall.</{v}>\n<{t}>They are afraid.</{t}>\n"
                     f"<{a}>{state['record'].reference_answer}</{a}>", "no tags at all"]
            inputs = RewardInputs(records=[state["record"]], group_size=2, videos=[state["video"]],
                                  prompt_ids=[state["prompt"].ids])
            vals = list(fn(comps, inputs))
            bad = len(vals) != 2 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in vals)
            return [("missing or non-finite values", float(bad), 0.0)]
        return run

    checks = [(f"recipe {os.path.basename(path)}: config", config),
              (f"recipe {os.path.basename(path)}: model (load, forward, fused log-probs)", model)]
    try:
        names = list(_config(state, path).rewards.enabled)
    except Exception:  # the config check reports it
        names = []
    checks += [(f"recipe {os.path.basename(path)}: reward {n}", reward(n)) for n in names]
    return checks


def _config(state: dict, path: str):
    from fastebm.config import load_config

    if "cfg" not in state:
        state["cfg"] = load_config(path, state["overrides"])
    return state["cfg"]
