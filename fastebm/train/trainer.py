"""The EBM-RL GRPO trainer.

    fastebm train recipes/tiny.toml [section.key=value ...] [--nproc-per-node N]

One step, top to bottom (``Trainer.train_step``):

  1. batch     this rank's share of ``prompts_per_step`` records (whole groups); each clip decoded
               ONCE, ahead of time on decode threads (frames shared by the policy input and the
               rewards); a record whose video fails is skipped and recorded
  2. rollout   G completions per prompt; with ``rollout.shared_prefix`` the prefix is prefilled
               once and the G samples decode on it with cascade attention   -> time/rollout_s
  3. score     rewards (registry); old log-probs (mu > 1: the rollout's own); reference log-probs
               (beta > 0) packed with the PCG teacher's suffixes on one copy of the reference
               prefix                                                       -> time/score_s
  4. advantage per-reward group z-norm then weights (EBM) or summed (GRPO)
  5. update    mu passes; each: micro-batched forward with grad (one packed row per prompt) ->
               fused/reference GRPO loss on hidden states -> backward (accumulated) -> clip ->
               AdamW -> schedule                                            -> time/update_s
  6. log       metrics.jsonl (rank 0), progress bar; checkpoint every N steps and at the end

Where it departs from textbook GRPO: the rewards are z-normalised per reward within the group
before weighting (``rewards.normalize = "per_reward"``, EBM-RL); the KL is k3 against a frozen
reference; loss reductions follow TRL's loss types.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from fastebm.config import Config, write_config
from fastebm.data import DataError
from fastebm.data.prompts import build_messages, encode_prompt
from fastebm.data.records import Profiles, Record, RecordSampler, load_usable_records, resolve_video
from fastebm.grpo.advantages import combine_rewards
from fastebm.grpo.loss import compute_grpo_loss, loss_options
from fastebm.model.decode import shared_prefix_rollout
from fastebm.model.forward import Prompt, completion_hidden_states, lm_head_weight
from fastebm.model.prefix import shared_prefix_hidden_states
from fastebm.model.loading import LoadedModel, resolve_model_path
from fastebm.model.logprobs import scoring_logprobs
from fastebm.model.rollout import RolloutResult, rollout
from fastebm.rewards import RewardContext, RewardError, RewardInputs, build_rewards, call_reward, check_rewards
from fastebm.train.checkpoint import (fingerprint, hf_weights_dir, latest_checkpoint, load_checkpoint, resolve_resume,
                                      load_full_optimizer_state, load_sharded_weights, save_checkpoint,
                                      save_sharded_checkpoint, set_rng_state)
from fastebm.train.metrics import MetricsWriter, append_skipped
from fastebm.train.parallel import clip_grad_norm, gathered_params, init_distributed, load_parallel_model, seeded_rollout
from fastebm.utils import hash_seed

log = logging.getLogger("fastebm")


class TrainingError(RuntimeError):
    pass


@dataclass
class Batch:
    records: list[Record]
    prompts: list[Prompt]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("run.device = 'cuda' but CUDA is not available on this machine")
    return torch.device(name)


def lr_lambda(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr after ``step`` optimiser steps: linear warmup, then cosine or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def prepare_data(cfg: Config) -> None:
    """Fill data.train / profiles / video_root from the bundled sample dataset when asked to."""
    d = cfg.data
    if not d.train and d.sample_dir:
        from fastebm.data.sample import write_sample_dataset

        paths = write_sample_dataset(os.path.expanduser(d.sample_dir))
        d.train = paths["train"]
        d.profiles = d.profiles or paths["profiles"]
        d.cot = d.cot or paths["cot"]
        d.video_root = d.video_root or paths["video_root"]
    if not d.train:
        raise DataError("data.train: no records file given (set data.train, or data.sample_dir for the sample data)")


class Trainer:
    cfg: Config
    device: torch.device
    policy: LoadedModel
    reference: Optional[LoadedModel]
    records: list[Record]
    sampler: RecordSampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int

    # ------------------------------------------------------------------------------------------
    # Construction, in dependency order
    # ------------------------------------------------------------------------------------------

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = os.path.expanduser(cfg.run.output_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.device = pick_device(cfg.run.device)
        # One process, or one rank of a torchrun job: rank, world size, collectives (parallel.py).
        self.dist = init_distributed(cfg.parallel, self.device, cfg.train.prompts_per_step)
        self.device = self.dist.local_device(self.device)
        seed_everything(cfg.run.seed)
        check_rewards(cfg.rewards)  # unknown reward names fail before any model loads (plug-ins imported here)
        with self.dist.main_first():  # rank 0 writes the sample data / tiny model, the others read them
            prepare_data(cfg)
            model_path = resolve_model_path(cfg.model)
        if self.dist.is_main:
            write_config(cfg, self.run_dir)

        self.skipped_path = os.path.join(self.run_dir, "skipped.jsonl")
        self.samples_skipped = 0
        self.records = self._load_records()
        self.profiles = Profiles.load(cfg.data.profiles)
        self.sampler = RecordSampler(len(self.records), cfg.run.seed)

        resume_from = resolve_resume(cfg.train.resume, self.run_dir)
        # A dcp checkpoint has no from_pretrained weights: start from the model, load the shards in _restore.
        # Under FSDP only rank 0 reads weights; the others build on the meta device and get their shards.
        self.policy = load_parallel_model(hf_weights_dir(resume_from) or model_path, self.device, cfg.model.dtype,
                                          cfg.model.attn_implementation, cfg.parallel, self.dist, trainable=True,
                                          activation_checkpointing=cfg.model.gradient_checkpointing)
        self.reference = None
        if cfg.grpo.beta != 0 or "pcg" in cfg.rewards.enabled:
            # Always the *initial* weights (or reference_path), also when resuming. Sharded too, eval mode, no grads.
            self.reference = load_parallel_model(os.path.expanduser(cfg.model.reference_path) or model_path,
                                                 self.device, cfg.model.dtype, cfg.model.attn_implementation,
                                                 cfg.parallel, self.dist, trainable=False)
        # Reward models live on every rank, scoring that rank's completions (rank 0 builds caches first).
        with self.dist.main_first():
            self.rewards = build_rewards(cfg.rewards.enabled, cfg.rewards,
                                         RewardContext(tags=tuple(cfg.data.tags), device=self.device,
                                                       reference=self.reference, tiny_cache_dir=cfg.model.tiny_cache_dir,
                                                       video_cache_dir=cfg.video.cache_dir, kernel=cfg.grpo.kernel,
                                                       shared_prefix=cfg.rollout.shared_prefix))

        params = [p for p in self.policy.model.parameters() if p.requires_grad]
        t = cfg.train
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        total_updates = t.steps * cfg.grpo.mu
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, total_updates, t.warmup_steps, t.lr_schedule, t.min_lr_ratio))
        self.fingerprint = fingerprint(self.policy.model.config.to_dict(), len(self.records))
        self.step = 0
        if resume_from:
            self._restore(resume_from)
        self.metrics = MetricsWriter(self.run_dir, cfg.log.tensorboard,  # rank 0 writes metrics.jsonl
                                     resume_step=self.step if resume_from else None, enabled=self.dist.is_main)
        self._stop_requested = False
        self._video_sample_kwargs = self._vision_geometry()
        self._ahead: dict = {}   # path -> Future of its VideoSample, decoded ahead (see _decode_ahead)
        self._pool = None        # decode threads (video.num_workers), started on first use

    def _load_records(self) -> list[Record]:
        """Every usable record; malformed ones are skipped, counted and recorded, never fatal alone."""
        return load_usable_records(self.cfg.data.train, self._skip)

    def _restore(self, path: str) -> None:
        state = load_checkpoint(path, self.fingerprint)
        if state["format"] == "dcp":  # sharded weights + optimizer, resharded to this world size
            load_sharded_weights(path, self.policy.model, self.optimizer)
            rank_rng = os.path.join(path, "rng", f"{self.dist.rank}.pt")
            if state["world_size"] == self.dist.world_size and os.path.isfile(rank_rng):
                state["rng"] = torch.load(rank_rng, weights_only=False)
        elif self.dist.enabled:  # a 1-process checkpoint on many ranks: shard its optimizer state
            load_full_optimizer_state(self.policy.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state(state["sampler"])
        self.samples_skipped = state.get("samples_skipped", self.samples_skipped)
        self.profiles.missing = dict(state.get("profiles_missing", {})) if self.dist.is_main else {}  # merged at save
        set_rng_state(state["rng"])
        self.step = state["step"]
        log.info("resumed from %s at step %d", path, self.step)

    def _vision_geometry(self) -> dict:
        v = self.policy.model.config.vision_config
        return dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                    merge_size=v.spatial_merge_size)

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------

    def train(self) -> list[dict]:
        cfg = self.cfg
        history = []
        prev_handler = signal.signal(signal.SIGINT, self._on_sigint)
        progress = _Progress(cfg.train.steps, self.step, enabled=cfg.log.progress)
        try:
            while self.step < cfg.train.steps:
                m = self.train_step()
                history.append(m)
                progress.update(self.step, m)
                every = cfg.train.checkpoint_every
                if every and self.step % every == 0 and self.step < cfg.train.steps:
                    self.save()
                if self.dist.any(self._stop_requested):  # every rank stops after the same step
                    self._stop_requested = True
                    log.warning("interrupted: saving a checkpoint at step %d and stopping", self.step)
                    self.save()
                    raise KeyboardInterrupt
            if not self._stop_requested:
                self.save()
        finally:
            progress.close()
            signal.signal(signal.SIGINT, prev_handler)
            self.close()
        return history

    def close(self) -> None:
        """Stop the video decode threads and close the metrics writers."""
        if self._pool is not None:
            for f in self._ahead.values():
                f.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool, self._ahead = None, {}
        self.metrics.close()

    def _on_sigint(self, signum, frame):
        if self._stop_requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_requested = True
        log.warning("Ctrl-C: finishing step %d, then saving and exiting (press again to abort)", self.step + 1)

    def train_step(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        batch = self.next_batch()
        temp = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0

        t1 = time.perf_counter()
        roll = self.rollout(batch)
        t2 = time.perf_counter()

        rewards, old_logps, ref_logps, scored_prefix = self.score_step(batch, roll, temp)
        prefix_tokens = roll.prefill_tokens + scored_prefix
        advantages = combine_rewards({n: torch.tensor(v) for n, v in rewards.items()}, cfg.rewards.weights,
                                     cfg.rollout.group_size, cfg.rewards.normalize, cfg.rewards.eps,
                                     cfg.rewards.scale).to(self.device)
        t3 = time.perf_counter()

        stats = self.update(batch, roll, advantages, old_logps, ref_logps, temp)
        prefix_tokens += stats.pop("prefix_tokens")
        t4 = time.perf_counter()

        self.step += 1
        G = cfg.rollout.group_size
        # Every rank's groups in rank order (= the 1-process batch); rank 0 writes them (no-op on 1 process).
        rewards, advantages, roll_view, prefix_tokens = self.dist.gather_step(rewards, advantages, roll, prefix_tokens)
        total = sum(cfg.rewards.weights[n] * torch.tensor(v, dtype=torch.float64) for n, v in rewards.items())
        lengths = [len(c) for c in roll_view.completion_ids]
        m = {"step": self.step, **stats, "reward/total": float(total.mean())}
        for n, v in rewards.items():
            rv = torch.tensor(v, dtype=torch.float64)
            m[f"reward/{n}"] = float(rv.mean())
            m[f"reward/{n}_std"] = float(rv.view(-1, G).std(dim=1).mean()) if G > 1 else 0.0
            m[f"reward/{n}_errors"] = self.reward_errors.get(n, 0)
        m.update({
            "adv/std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
            "tokens/prefix": prefix_tokens,
            "tokens/completion": sum(lengths),
            "completion/mean_len": sum(lengths) / len(lengths),
            "completion/truncated_frac": sum(roll_view.truncated) / len(roll_view.truncated),
            "time/rollout_s": t2 - t1, "time/score_s": t3 - t2, "time/update_s": t4 - t3,
            "time/step_s": t4 - t0,
            "samples_skipped": self.samples_skipped,
            "profiles_missing": int(self.dist.all_reduce_sum(sum(self.profiles.missing.values()))),
        })
        self.metrics.write(m)
        if cfg.log.samples_every and self.step % cfg.log.samples_every == 0 and self.dist.is_main:
            self._write_samples(batch, roll, {n: v[:len(roll.texts)] for n, v in rewards.items()})  # rank 0's
        return m

    # ------------------------------------------------------------------------------------------
    # Steps
    # ------------------------------------------------------------------------------------------

    def next_batch(self) -> Batch:
        """This rank's ``prompts_per_step / world_size`` prompts (whole groups), each clip decoded once.

        Every rank holds the same seeded RecordSampler and draws the same candidates; rank r takes
        its slice. A bad video is skipped and replaced: the ranks exchange their skips (one object
        all-gather per round), every rank draws the replacements of all ranks in rank order, so the
        sampler stays identical everywhere (resume continues mid-epoch on every rank) and the global
        batch is the 1-process batch. Rank 0 writes every rank's skips to skipped.jsonl.
        """
        from fastebm.data.video import VideoError

        d = self.dist
        records, prompts, failures = [], [], 0
        need = [self.cfg.train.prompts_per_step // d.world_size] * d.world_size
        while sum(need):
            candidates = [self.records[self.sampler.next()] for _ in range(sum(need))]
            start = sum(need[:d.rank])
            skips = []
            mine = candidates[start:start + need[d.rank]]
            self._decode_ahead([resolve_video(rec, self.cfg.data.video_root) for rec in mine])
            for rec in mine:
                path = resolve_video(rec, self.cfg.data.video_root)
                try:
                    video = self._decoded(path)
                except VideoError as e:
                    skips.append(dict(file=path, record=rec.index, problem_id=rec.problem_id, reason=str(e)))
                    continue
                messages = build_messages(rec, self.profiles.get(rec.data_source, rec.assistant), self.cfg.data.tags,
                                          self.cfg.data.max_history_turns)
                ids = encode_prompt(self.policy.tokenizer, messages, video.num_video_tokens)
                records.append(rec)
                prompts.append(Prompt(ids, video))
            need = []
            for rank_skips in d.all_gather_object(skips):
                for entry in rank_skips:
                    self._skip(**entry)
                need.append(len(rank_skips))
            failures += sum(need)
            if failures >= len(self.records):
                raise DataError(f"{self.cfg.data.train}: {failures} videos failed in one batch; "
                                f"see {self.skipped_path}")
        if self.step + 1 < self.cfg.train.steps:  # the next batch's clips decode while this step runs
            per = self.cfg.train.prompts_per_step // d.world_size
            nxt = self.sampler.peek(self.cfg.train.prompts_per_step)[d.rank * per:(d.rank + 1) * per]
            self._decode_ahead([resolve_video(self.records[i], self.cfg.data.video_root) for i in nxt])
        return Batch(records, prompts)

    def _decode_ahead(self, paths: list[str]) -> None:
        """Start decoding ``paths`` on the ``video.num_workers`` decode threads (PyAV and DALI do their
        work outside the GIL). A guess that turns out wrong (a skipped video changes the draw) costs one
        wasted decode, never a wrong sample: results are looked up by path."""
        if self.cfg.video.num_workers <= 0:
            return
        if self._pool is None:
            from fastebm.data.video.api import decode_thread_pool

            self._pool = decode_thread_pool(self.cfg.video.num_workers)  # torch single-threaded in them
        from fastebm.data.video import load_video_sample

        for path in paths:
            if path not in self._ahead:
                self._ahead[path] = self._pool.submit(load_video_sample, path, self.cfg.video,
                                                      **self._video_sample_kwargs)

    def _decoded(self, path: str):
        """The VideoSample of ``path``: decoded ahead, or here (each clip once per use either way).
        A failed decode raises VideoError (the per-file time limit included)."""
        fut = self._ahead.pop(path, None)
        if fut is not None:
            return fut.result()
        from fastebm.data.video import load_video_sample

        return load_video_sample(path, self.cfg.video, **self._video_sample_kwargs)

    def rollout(self, batch: Batch) -> RolloutResult:
        """G completions per prompt: on the shared prefix (cascade attention) or the repeated path."""
        sample = shared_prefix_rollout if self.cfg.rollout.shared_prefix else rollout
        with gathered_params(self.policy.model, self.dist):  # full weights once per step, not per token
            return seeded_rollout(sample, self.policy.model, self.policy.tokenizer, batch.prompts, self.cfg.rollout,
                                  self._rollout_seeds(len(batch.prompts)))

    def _rollout_seeds(self, n: int) -> list[int]:
        """Sampling seed of each of this rank's prompts, from (run.seed, step, global prompt index):
        the samples of a prompt do not depend on how the batch is laid out over ranks."""
        first = self.dist.rank * n
        return [hash_seed(self.cfg.run.seed, self.step, first + i) for i in range(n)]

    def score_step(self, batch: Batch, roll: RolloutResult, temperature: float):
        """Everything between rollout and update: (rewards, old log-probs, reference log-probs, prefix
        tokens processed). Old log-probs (mu > 1) are the rollout's own where it has them; with a
        shared prefix the PCG teacher scores its suffixes in the same packed forward as the reference
        KL pass, so the reference prefix runs once per step."""
        cfg = self.cfg
        joint_pcg = "pcg" in self.rewards and cfg.grpo.beta != 0 and cfg.rollout.shared_prefix
        rewards = self.compute_rewards(batch, roll, skip=("pcg",) if joint_pcg else ())
        old_logps = ref_logps = None
        prefix_tokens = 0
        if cfg.grpo.mu > 1 and roll.logprobs is not None:
            old_logps = self._pad(roll.logprobs)  # computed on the rollout's own prefix cache
        elif cfg.grpo.mu > 1:
            old_logps, n = self.score(self.policy.model, batch, roll, temperature)
            prefix_tokens += n
        if joint_pcg:
            ref_logps, n, rewards["pcg"], self.reward_errors["pcg"] = self.score_reference_and_pcg(batch, roll,
                                                                                                  temperature)
            prefix_tokens += n
            rewards = {name: rewards[name] for name in self.rewards}  # the configured order
        elif cfg.grpo.beta != 0:
            ref_logps, n = self.score(self.reference.model, batch, roll, temperature)
            prefix_tokens += n
        return rewards, old_logps, ref_logps, prefix_tokens

    def reward_inputs(self, batch: Batch, roll: RolloutResult) -> RewardInputs:
        return RewardInputs(records=batch.records, group_size=self.cfg.rollout.group_size,
                            videos=[p.video for p in batch.prompts], prompt_ids=[p.ids for p in batch.prompts],
                            completion_ids=roll.completion_ids)

    def compute_rewards(self, batch: Batch, roll: RolloutResult, skip=()) -> dict[str, list[float]]:
        inputs = self.reward_inputs(batch, roll)
        out, self.reward_errors = {}, {}
        for name, fn in self.rewards.items():
            if name in skip:
                continue
            try:  # rewards.on_error = "zero": a failure scores 0 and is counted, never silent
                out[name], self.reward_errors[name] = call_reward(name, fn, roll.texts, inputs,
                                                                  self.cfg.rewards.on_error)
            except RewardError as e:
                raise TrainingError(f"step {self.step + 1}: {e}") from e
        return out

    def hidden_states(self, model, prompts, completions, prompt_index):
        """Completion hidden states: one packed row per prompt (shared prefix) or one sequence per sample."""
        fn = shared_prefix_hidden_states if self.cfg.rollout.shared_prefix else completion_hidden_states
        return fn(model, prompts, completions, prompt_index)

    def _pad(self, rows: list[list[float]]) -> torch.Tensor:
        out = torch.zeros((len(rows), max(1, max(len(r) for r in rows))), dtype=torch.float32)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
        return out.to(self.device)

    def _micro_batches(self, n: int) -> list[list[int]]:
        mb = self.cfg.train.micro_batch_size
        return [list(range(s, min(n, s + mb))) for s in range(0, n, mb)]

    @torch.no_grad()
    def score(self, model, batch: Batch, roll: RolloutResult, temperature: float) -> tuple[torch.Tensor, int]:
        """Per-token log-probs (N, Tmax) of the completions under ``model``; prefix tokens processed."""
        N, Tmax = len(roll.completion_ids), max(1, max(len(c) for c in roll.completion_ids))
        out = torch.zeros((N, Tmax), dtype=torch.float32, device=self.device)
        prefix = 0
        for idx in self._micro_batches(N):
            cb = self.hidden_states(model, batch.prompts, [roll.completion_ids[i] for i in idx],
                                          [roll.prompt_index[i] for i in idx])
            lp = scoring_logprobs(cb.hidden, lm_head_weight(model), cb.ids, temperature, kernel=self.cfg.grpo.kernel)
            out[idx, :lp.shape[1]] = lp * cb.mask
            prefix += cb.num_prompt_tokens
        return out, prefix

    @torch.no_grad()
    def score_reference_and_pcg(self, batch: Batch, roll: RolloutResult, temperature: float):
        """The reference model's KL log-probs and the PCG reward in ONE packed forward per prompt group:
        ``[prefix | completion_1..G | context_i + answer ... | answer]`` on one copy of the prefix.

        Returns (ref log-probs (N, Tmax), prefix tokens, pcg values, pcg errors). A PCG failure is
        handled as any reward's (``rewards.on_error``); the KL pass then runs on its own.
        """
        from fastebm.model.forward import CompletionBatch
        from fastebm.rewards.pcg import answer_mean_logprob

        ref, pcg = self.reference.model, self.rewards["pcg"]
        kernel = self.cfg.grpo.kernel
        comps = roll.completion_ids
        N, Tmax = len(comps), max(1, max(len(c) for c in comps))
        out = torch.zeros((N, Tmax), dtype=torch.float32, device=self.device)
        done = {}

        def joint(completions, inputs):
            plans = {g.prompt: g for g in pcg.plan(completions, inputs)}
            lls, prefix = [], 0
            for p in range(len(batch.prompts)):
                members = [i for i in range(N) if roll.prompt_index[i] == p]
                extra = plans[p].suffixes() if p in plans else []
                suffixes = [comps[i] for i in members] + extra
                cb = shared_prefix_hidden_states(ref, batch.prompts, suffixes, [p] * len(suffixes))
                k = len(members)
                w = min(Tmax, cb.ids.shape[1])  # the PCG suffixes may be longer than any completion
                W = lm_head_weight(ref)  # read after the forward: under FSDP the root unit is gathered by then
                lp = scoring_logprobs(cb.hidden[:k, :w], W, cb.ids[:k, :w], temperature, kernel=kernel)
                out[members, :w] = lp * cb.mask[:k, :w]
                if p in plans:  # the PCG teacher scores at temperature 1
                    rest = CompletionBatch(cb.hidden[k:], cb.ids[k:], cb.mask[k:], 0)
                    lls.append(answer_mean_logprob(ref, rest, len(plans[p].answer_ids), kernel))
                prefix += cb.num_prompt_tokens
            done["prefix"] = prefix
            return pcg.finish(N, list(plans.values()), lls)

        try:
            vals, errors = call_reward("pcg", joint, roll.texts, self.reward_inputs(batch, roll),
                                       self.cfg.rewards.on_error)
        except RewardError as e:
            raise TrainingError(f"step {self.step + 1}: {e}") from e
        if "prefix" not in done:  # PCG failed and was zeroed: the KL pass alone
            ref_logps, prefix = self.score(ref, batch, roll, temperature)
            return ref_logps, prefix, vals, errors
        return out, done["prefix"], vals, errors

    def update(self, batch: Batch, roll: RolloutResult, advantages: torch.Tensor,
               old_logps: Optional[torch.Tensor], ref_logps: Optional[torch.Tensor], temperature: float) -> dict:
        """``grpo.mu`` optimiser steps on this rollout; gradients accumulated over micro-batches."""
        cfg, g = self.cfg, self.cfg.grpo
        model = self.policy.model
        comps = roll.completion_ids
        # Normalisers are GLOBAL (all ranks' sequences / completion tokens); FSDP sums the gradients.
        N, total_tokens = (int(x) for x in self.dist.all_reduce_sum(len(comps), sum(len(c) for c in comps)))
        losses, kls, clips, gnorms, prefix = [], [], [], [], 0
        options = loss_options(g, temperature, cfg.rollout.max_new_tokens)
        for _ in range(g.mu):
            step_loss, kl_sum, clip_sum = 0.0, 0.0, 0.0
            for idx in self._micro_batches(len(comps)):
                cb = self.hidden_states(model, batch.prompts, [comps[i] for i in idx],
                                              [roll.prompt_index[i] for i in idx])
                prefix += cb.num_prompt_tokens
                Tc = cb.ids.shape[1]
                sl = lambda x: None if x is None else x[idx, :Tc]  # noqa: E731
                out = compute_grpo_loss(
                    cb.hidden, lm_head_weight(model), cb.ids, cb.mask, advantages[idx], sl(old_logps), sl(ref_logps),
                    options, kernel=g.kernel, num_items_in_batch=total_tokens)
                mb_tokens = int(cb.mask.sum())
                # Scale each micro-batch so that the accumulated gradient is that of the whole batch.
                scale = {"grpo": len(idx) / N, "dr_grpo": len(idx) / N,
                         "bnpo": mb_tokens / max(1, total_tokens), "dapo": 1.0}[g.loss_type]
                loss = out.loss * scale
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"non-finite loss ({float(out.loss.detach())}) at step {self.step + 1}; stopping without saving. "
                        f"The last good checkpoint is {latest_checkpoint(self.run_dir) or '(none yet)'}")
                loss.backward()
                step_loss += float(loss.detach())
                kl_sum += float(out.kl) * mb_tokens
                clip_sum += float(out.clip_ratio) * mb_tokens
            step_loss, kl_sum, clip_sum = self.dist.all_reduce_sum(step_loss, kl_sum, clip_sum)
            gn = clip_grad_norm(list(model.parameters()), cfg.train.max_grad_norm)  # global norm (sharded grads)
            if not torch.isfinite(gn):
                raise TrainingError(f"non-finite gradient norm at step {self.step + 1}; stopping without saving. "
                                    f"The last good checkpoint is {latest_checkpoint(self.run_dir) or '(none yet)'}")
            lr = self.scheduler.get_last_lr()[0]  # the rate this update uses
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            kls.append(kl_sum / max(1, total_tokens))
            clips.append(clip_sum / max(1, total_tokens))
            gnorms.append(float(gn))
        return {"loss": losses[0], "loss/last": losses[-1], "kl": kls[0], "clip_ratio": clips[-1],
                "grad_norm": gnorms[0], "lr": lr, "prefix_tokens": prefix}

    # ------------------------------------------------------------------------------------------
    # Bookkeeping
    # ------------------------------------------------------------------------------------------

    def save(self) -> str:
        """A checkpoint of this step: ``hf`` format on one process, sharded ``dcp`` on many (collective)."""
        state = {"scheduler": self.scheduler.state_dict(),
                 "sampler": self.sampler.state(), "samples_skipped": self.samples_skipped,
                 "profiles_missing": self._merged_profiles_missing()}
        if self.dist.enabled:
            path = save_sharded_checkpoint(self.run_dir, self.step, self.policy.model, self.optimizer,
                                           self.policy.tokenizer, state, self.fingerprint, self.dist,
                                           keep=self.cfg.train.keep_checkpoints)
        else:
            state["optimizer"] = self.optimizer.state_dict()
            path = save_checkpoint(self.run_dir, self.step, self.policy.model, self.policy.tokenizer, state,
                                   self.fingerprint, keep=self.cfg.train.keep_checkpoints)
        log.info("checkpoint: %s", path)
        return path

    def _merged_profiles_missing(self) -> dict:
        merged: dict = {}
        for part in self.dist.all_gather_object(dict(self.profiles.missing)):
            for k, v in part.items():
                merged[k] = merged.get(k, 0) + v
        return merged

    def _skip(self, **entry) -> None:
        """Count a skipped sample; rank 0 records it (callers pass every rank's skips to every rank)."""
        self.samples_skipped += 1
        if not self.dist.is_main:
            return
        log.warning("skipped sample: %s", entry.get("reason"))
        append_skipped(self.skipped_path, getattr(self, "step", 0) + 1, entry)

    def _write_samples(self, batch: Batch, roll: RolloutResult, rewards: dict) -> None:
        with open(os.path.join(self.run_dir, "samples.jsonl"), "a") as f:
            for i, text in enumerate(roll.texts):
                rec = batch.records[roll.prompt_index[i]]
                f.write(json.dumps({"step": self.step, "problem_id": rec.problem_id, "completion": text,
                                    **{f"reward/{n}": v[i] for n, v in rewards.items()}}) + "\n")


class _Progress:
    """A rich progress bar with ETA, or one log line per step when disabled / not a terminal."""

    def __init__(self, total: int, start: int, enabled: bool):
        import sys

        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, m: dict) -> None:
        info = f"loss {m['loss']:+.4f}  reward {m['reward/total']:+.3f}  kl {m['kl']:.4f}  {m['time/step_s']:.2f}s/step"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            log.info("step %d: %s", step, info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
