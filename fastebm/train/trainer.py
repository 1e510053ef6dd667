"""The EBM-RL GRPO trainer.

    fastebm train recipes/tiny.toml [section.key=value ...] [--nproc-per-node N]

One step, top to bottom (``Trainer.train_step``):

  1. batch     this rank's share of ``prompts_per_step`` records (whole groups); each clip decoded
               ONCE, ahead of time on decode threads (frames shared by the policy input and the
               rewards); a record whose video fails is skipped and recorded
  2. rollout   G completions per prompt; with ``rollout.shared_prefix`` the prefix is prefilled
               once and the G samples decode on it with cascade attention   -> time/rollout_s
  3. score     rewards (registry); old log-probs (mu > 1: the rollout's own); reference log-probs
               (beta > 0) in one pass with the sequences teacher-protocol rewards ask the frozen
               reference to score, on one copy of each prompt's prefix      -> time/score_s
  4. advantage per-reward group z-norm then weights (EBM) or summed (GRPO)
  5. update    mu passes; each: micro-batched forward with grad (one packed row per prompt) ->
               fused/eager GRPO loss on hidden states -> backward (accumulated) -> clip ->
               AdamW -> schedule                                            -> time/update_s
  6. log       metrics (train/metrics.py: step_metrics) to metrics.jsonl (rank 0), progress bar;
               checkpoint every N steps and at the end

Where it departs from textbook GRPO: the rewards are z-normalised per reward within the group
before weighting (``rewards.normalize = "per_reward"``, EBM-RL); the KL is k3 against a frozen
reference; the loss follows TRL 1.16's loss types and options (``[grpo]``, docs/kernels.md).
``top_entropy_quantile`` takes its quantile per micro-batch.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from fastebm.config import Config, validate_grpo
from fastebm.data.prompts import load_templates
from fastebm.data.records import Profiles, Record, RecordSampler
from fastebm.grpo.advantages import combine_rewards
from fastebm.grpo.loss import backward_options, compute_grpo_loss, loss_options, micro_batch_scale
from fastebm.model.decode import shared_prefix_rollout
from fastebm.model.forward import completion_hidden_states, lm_head_weight
from fastebm.model.prefix import shared_prefix_hidden_states
from fastebm.model.loading import LoadedModel
from fastebm.model.logprobs import pad_rows, suffix_logprobs
from fastebm.model.rollout import RolloutResult, rollout
from fastebm.rewards import (RewardContext, RewardError, RewardInputs, TeacherRequest, build_rewards, call_reward,
                             check_rewards, finish_teacher_reward, guarded, needs_teacher, uses_teacher)
from fastebm.train.batches import Batch, BatchSource
from fastebm.train.builders import (Checkpointer, SkipRecorder, TrainingError, build_data, build_optimizer,
                                    build_policy, build_reference, build_scheduler, epoch_progress, max_positions,
                                    setup_run, total_steps, video_geometry)
from fastebm.train.checkpoint import latest_checkpoint
from fastebm.train.loop import Progress, train_loop
from fastebm.train.metrics import MetricsWriter, step_metrics
from fastebm.train.parallel import Dist, clip_grad_norm, gathered_params
from fastebm.utils import hash_seed

log = logging.getLogger("fastebm")


@dataclass
class Scored:
    """What scoring a rollout produced (``Trainer.score_step``)."""
    rewards: dict[str, list[float]]          # per reward (configured order): one value per completion
    reward_errors: dict[str, int]            # per reward: completions scored 0 after a failure (on_error = "zero")
    old_logps: Optional[torch.Tensor]        # (N, Tmax) fp32 when grpo.mu > 1
    ref_logps: Optional[torch.Tensor]        # (N, Tmax) fp32 when grpo.beta != 0
    prefix_tokens: int                       # prompt tokens run through a model while scoring


class Trainer:
    cfg: Config
    run_dir: str
    device: torch.device
    dist: Dist
    skips: SkipRecorder
    records: list[Record]
    profiles: Profiles
    sampler: RecordSampler
    policy: LoadedModel
    reference: Optional[LoadedModel]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    checkpointer: Checkpointer
    step: int
    metrics: MetricsWriter
    batches: BatchSource

    # ------------------------------------------------------------------------------------------
    # Construction, in dependency order
    # ------------------------------------------------------------------------------------------

    def __init__(self, cfg: Config):
        self.cfg = cfg
        validate_grpo(cfg)  # groups of >= 2 (the advantage is relative to the group)
        check_rewards(cfg.rewards)  # unknown reward names fail before anything is built (plug-ins imported here)
        self.templates = load_templates(cfg.prompt)  # a bad template fails before anything is built too
        env = setup_run(cfg, records="train")  # run dir, device, process group, seed, sample data, config.toml
        self.run_dir, self.device, self.dist = env.run_dir, env.device, env.dist

        self.skips = SkipRecorder(self.run_dir, self.dist, lambda: getattr(self, "step", 0))
        self.records, self.profiles, self.sampler = build_data(cfg.data.train, cfg.data.profiles, cfg.run.seed,
                                                               self.skips, video_root=cfg.data.video_root,
                                                               allow_outside_root=cfg.data.allow_outside_root)
        self.total_steps = total_steps(cfg.train, len(self.records))  # train.steps, or train.epochs of the records
        resume_from = env.resume_from  # verified by setup_run (train.resume, run.start_over)
        self.policy = build_policy(cfg.model, cfg.parallel, env, resume_from)
        self.reference = None
        if cfg.grpo.beta != 0 or needs_teacher(cfg.rewards.enabled):
            self.reference = build_reference(cfg.model, cfg.parallel, env)
        # Reward models live on every rank, scoring that rank's completions (rank 0 builds caches first).
        with self.dist.main_first():
            self.rewards = build_rewards(cfg.rewards.enabled, cfg.rewards,
                                         RewardContext(tags=tuple(cfg.data.tags), device=self.device,
                                                       reference=self.reference, tiny_cache_dir=cfg.model.tiny_cache_dir,
                                                       video_cache_dir=cfg.video.cache_dir, kernel=cfg.grpo.kernel,
                                                       shared_prefix=cfg.rollout.shared_prefix))
        self.optimizer = build_optimizer(self.policy.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, self.total_steps * cfg.grpo.mu)
        self.checkpointer = Checkpointer(self.run_dir, self.policy, self.optimizer, self.scheduler, self.sampler,
                                         self.skips, self.profiles, self.dist, keep=cfg.train.keep_checkpoints)
        self.step = self.checkpointer.restore(resume_from) if resume_from else 0
        self.metrics = MetricsWriter(self.run_dir, cfg.log.tensorboard,  # rank 0 writes metrics.jsonl
                                     resume_step=self.step if resume_from else None, enabled=self.dist.is_main)
        self._video_sample_kwargs = video_geometry(self.policy.model)
        self.batches = BatchSource(self.records, self.sampler, self.profiles, self.policy.tokenizer, self.skips,
                                   self.dist, prompts_per_step=cfg.train.prompts_per_step, data_cfg=cfg.data,
                                   video_cfg=cfg.video, geometry=self._video_sample_kwargs,
                                   records_file=cfg.data.train, templates=self.templates,
                                   max_positions=max_positions(self.policy.model),
                                   new_tokens=cfg.rollout.max_new_tokens)

    @property
    def samples_skipped(self) -> int:
        """Samples skipped so far, every rank's (``SkipRecorder.count``; restored on resume)."""
        return self.skips.count

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------

    def train(self) -> list[dict]:
        """``total_steps`` steps (``train.steps``, or ``train.epochs`` over the records;
        ``fastebm.train.loop.train_loop``): a checkpoint every ``train.checkpoint_every`` steps and at the
        end; Ctrl-C finishes the step, saves and exits."""
        t = self.cfg.train
        return train_loop(self, self.total_steps, t.checkpoint_every,
                          Progress(self.total_steps, self.step, self.cfg.log.progress, _describe))

    def close(self) -> None:
        """Stop the video decode threads and close the metrics writers."""
        self.batches.close()
        self.metrics.close()

    def train_step(self) -> dict:
        """One GRPO step (see the module docstring): batch -> rollout -> score -> advantages -> update -> log."""
        cfg, t0 = self.cfg, time.perf_counter()
        batch = self.next_batch()
        t1 = time.perf_counter()
        roll = self.rollout(batch)
        t2 = time.perf_counter()
        scored = self.score_step(batch, roll)
        advantages = combine_rewards({n: torch.tensor(v) for n, v in scored.rewards.items()}, cfg.rewards.weights,
                                     cfg.rollout.group_size, cfg.rewards.normalize, cfg.rewards.std_eps,
                                     cfg.rewards.scale).to(self.device)
        t3 = time.perf_counter()
        stats = self.update(batch, roll, advantages, scored.old_logps, scored.ref_logps, self.logprob_temperature)
        t4 = time.perf_counter()
        self.step += 1
        m = self.log_step(scored, roll, advantages, stats.pop("prefix_tokens") + roll.prefill_tokens + scored.prefix_tokens,
                          stats, {"time/rollout_s": t2 - t1, "time/score_s": t3 - t2, "time/update_s": t4 - t3,
                                  "time/step_s": t4 - t0})
        if cfg.log.samples_every and self.step % cfg.log.samples_every == 0 and self.dist.is_main:
            self._write_samples(batch, roll, {n: v[:len(roll.texts)] for n, v in scored.rewards.items()})  # rank 0's
        return m

    def log_step(self, scored: Scored, roll: RolloutResult, advantages: torch.Tensor, prefix_tokens: int,
                 stats: dict, times: dict) -> dict:
        """The step's metrics over every rank's groups (rank 0 writes them; see ``step_metrics``)."""
        rewards, adv, lengths, truncated, prefix_tokens = self.dist.gather_step(
            scored.rewards, advantages.detach().float().cpu().tolist(), [len(c) for c in roll.completion_ids],
            list(roll.truncated), prefix_tokens)
        m = step_metrics(self.step, rewards=rewards, weights=self.cfg.rewards.weights,
                         group_size=self.cfg.rollout.group_size, reward_errors=scored.reward_errors, advantages=adv,
                         lengths=lengths, truncated=truncated, prefix_tokens=prefix_tokens, update=stats, times=times,
                         samples_skipped=self.samples_skipped,
                         profiles_missing=int(self.dist.all_reduce_sum(sum(self.profiles.missing.values()))))
        m["epoch"] = epoch_progress(self.sampler)
        # Counters a reward keeps for its step (``step_counts``, e.g. sequences over a length limit), all ranks summed.
        # A reward's keys are fixed when it is built, so every rank runs the same collectives.
        for name, fn in self.rewards.items():
            counts = getattr(fn, "step_counts", None) or {}
            if counts:
                totals = self.dist.all_reduce_sum(*counts.values())
                for key, total in zip(counts, totals if isinstance(totals, list) else [totals]):
                    m[f"reward/{name}_{key}"] = int(total)
        self.metrics.write(m)
        return m

    # ------------------------------------------------------------------------------------------
    # Steps
    # ------------------------------------------------------------------------------------------

    def next_batch(self) -> Batch:
        """This rank's ``prompts_per_step / world_size`` prompts (whole groups), each clip decoded once
        and ahead of time; a bad video is skipped, recorded and replaced the same way on every rank,
        so the global batch is the 1-process batch (``fastebm.train.batches.BatchSource``)."""
        return self.batches.next(prefetch_next=self.step + 1 < self.total_steps)

    def rollout(self, batch: Batch) -> RolloutResult:
        """G completions per prompt: on the shared prefix (cascade attention) or the repeated path."""
        sample = shared_prefix_rollout if self.cfg.rollout.shared_prefix else rollout
        with gathered_params(self.policy.model, self.dist):  # full weights once per step, not per token
            # One sampling seed per prompt: 2 ranks sample exactly what 1 process samples.
            return sample(self.policy.model, self.policy.tokenizer, batch.prompts, self.cfg.rollout,
                          seeds=self._rollout_seeds(len(batch.prompts)))

    def _rollout_seeds(self, n: int) -> list[int]:
        """Sampling seed of each of this rank's prompts, from (run.seed, step, global prompt index):
        the samples of a prompt do not depend on how the batch is laid out over ranks."""
        first = self.dist.rank * n
        return [hash_seed(self.cfg.run.seed, self.step, first + i) for i in range(n)]

    @property
    def logprob_temperature(self) -> float:
        """The temperature of every log-prob the loss compares: the rollout's (1 when greedy)."""
        t = self.cfg.rollout.temperature
        return t if t > 0 else 1.0

    def score_step(self, batch: Batch, roll: RolloutResult) -> Scored:
        """Everything between rollout and update: rewards, old log-probs (``mu > 1``: the rollout's own
        where it has them), reference log-probs (``beta != 0``) and the sequences teacher-protocol
        rewards ask the frozen reference to score, which ride along in the reference pass."""
        cfg, n = self.cfg, len(roll.texts)
        inputs = self.reward_inputs(batch, roll)
        rewards, errors, requests = {}, {}, {}
        with self._reward_errors():
            for name, fn in self.rewards.items():
                if uses_teacher(fn):
                    reqs, ok = guarded(name, lambda: fn.teacher_requests(roll.texts, inputs), n, cfg.rewards.on_error)
                    if ok:
                        requests[name] = reqs
                    else:
                        rewards[name], errors[name] = [0.0] * n, n
                else:
                    rewards[name], errors[name] = call_reward(name, fn, roll.texts, inputs, cfg.rewards.on_error)
        old_logps, prefix_tokens = None, 0
        if cfg.grpo.mu > 1 and roll.logprobs is not None:
            old_logps = pad_rows(roll.logprobs, self.device)  # computed on the rollout's own prefix cache
        elif cfg.grpo.mu > 1:
            old = self._suffix_logprobs(self.policy.model, batch, roll.completion_ids, roll.prompt_index,
                                        [self.logprob_temperature] * n, batch_size=cfg.train.micro_batch_size)
            old_logps, prefix_tokens = pad_rows(old.logprobs, self.device), old.prefix_tokens
        ref_logps = None
        if cfg.grpo.beta != 0 or requests:
            ref_logps, teacher, p = self.reference_pass(batch, roll, requests)
            prefix_tokens += p
            with self._reward_errors():
                for name, reqs in requests.items():
                    if name in teacher:
                        rewards[name], errors[name] = finish_teacher_reward(
                            name, self.rewards[name], roll.texts, inputs, reqs, teacher[name], cfg.rewards.on_error)
                    else:  # the joint pass failed and rewards.on_error = "zero": scored 0, counted
                        rewards[name], errors[name] = [0.0] * n, n
        return Scored({k: rewards[k] for k in self.rewards}, errors, old_logps, ref_logps, prefix_tokens)

    @contextlib.contextmanager
    def _reward_errors(self):
        try:
            yield
        except RewardError as e:
            raise TrainingError(f"step {self.step + 1}: {e}") from e

    def reference_pass(self, batch: Batch, roll: RolloutResult, requests: dict[str, list[TeacherRequest]]):
        """The frozen reference model's pass: the completions' log-probs at the rollout temperature (the
        KL target, when ``beta != 0``) and, at temperature 1, every teacher request of the rewards, in
        ONE forward per prompt group (with the shared prefix: one packed row, the prefix run once).

        Returns (reference log-probs (N, Tmax) or None, {reward: log-probs per request and suffix},
        prefix tokens). A failure of the joint pass counts against the rewards that asked
        (``rewards.on_error``); the KL pass then runs on its own.
        """
        cfg = self.cfg
        kl = cfg.grpo.beta != 0
        suffixes = list(roll.completion_ids) if kl else []
        index = list(roll.prompt_index) if kl else []
        temps = [self.logprob_temperature] * len(suffixes)
        where: dict[str, list[list[int]]] = {}   # reward -> per request, the positions of its suffixes
        for name, reqs in requests.items():
            where[name] = []
            for r in reqs:
                where[name].append(list(range(len(suffixes), len(suffixes) + len(r.suffixes))))
                suffixes += r.suffixes
                index += [r.prompt] * len(r.suffixes)
                temps += [1.0] * len(r.suffixes)
        if not suffixes:
            return None, {name: [[] for _ in reqs] for name, reqs in requests.items()}, 0
        try:  # one forward per prompt group when rewards asked for sequences (they share the prefix with the KL pass)
            scored = self._suffix_logprobs(self.reference.model, batch, suffixes, index, temps,
                                           batch_size=0 if requests else cfg.train.micro_batch_size)
        except Exception as e:
            if not requests:
                raise
            names = ", ".join(repr(n) for n in requests)
            if cfg.rewards.on_error != "zero":
                raise TrainingError(f"step {self.step + 1}: the reference pass with the teacher requests of reward(s) "
                                    f"{names} failed: {type(e).__name__}: {e}") from e
            log.warning("the reference pass with the teacher requests of reward(s) %s failed (%s: %s); scoring them 0 "
                        "(rewards.on_error = 'zero')", names, type(e).__name__, e)
            ref_logps, _, p = self.reference_pass(batch, roll, {})
            return ref_logps, {}, p
        n = len(roll.completion_ids) if kl else 0
        ref_logps = pad_rows(scored.logprobs[:n], self.device) if kl else None
        teacher = {name: [[scored.logprobs[i] for i in pos] for pos in where[name]] for name in requests}
        return ref_logps, teacher, scored.prefix_tokens

    def _suffix_logprobs(self, model, batch: Batch, suffixes, prompt_index, temperatures, batch_size: int):
        pad = self.policy.tokenizer.pad_token_id if self.policy.tokenizer.pad_token_id is not None else 0
        return suffix_logprobs(model, batch.prompts, suffixes, prompt_index, temperatures, kernel=self.cfg.grpo.kernel,
                               shared_prefix=self.cfg.rollout.shared_prefix, batch_size=batch_size, pad_id=pad)

    def reward_inputs(self, batch: Batch, roll: RolloutResult) -> RewardInputs:
        return RewardInputs(records=batch.records, group_size=self.cfg.rollout.group_size,
                            videos=[p.video for p in batch.prompts], prompt_ids=[p.ids for p in batch.prompts],
                            completion_ids=roll.completion_ids)

    def hidden_states(self, model, prompts, completions, prompt_index):
        """Completion hidden states: one packed row per prompt (shared prefix) or one sequence per sample."""
        fn = shared_prefix_hidden_states if self.cfg.rollout.shared_prefix else completion_hidden_states
        return fn(model, prompts, completions, prompt_index)

    def _micro_batches(self, n: int) -> list[list[int]]:
        mb = self.cfg.train.micro_batch_size
        return [list(range(s, min(n, s + mb))) for s in range(0, n, mb)]

    def update(self, batch: Batch, roll: RolloutResult, advantages: torch.Tensor,
               old_logps: Optional[torch.Tensor], ref_logps: Optional[torch.Tensor], temperature: float) -> dict:
        """``grpo.mu`` optimiser steps on this rollout; gradients accumulated over micro-batches."""
        cfg, g = self.cfg, self.cfg.grpo
        model = self.policy.model
        comps = roll.completion_ids
        # grpo.mask_truncated_completions: a completion cut at max_new_tokens trains no token (DAPO).
        trains = [not (g.mask_truncated_completions and t) for t in roll.truncated]
        # Normalisers are GLOBAL (all ranks' sequences / completion tokens); FSDP sums the gradients.
        N, total_tokens = (int(x) for x in self.dist.all_reduce_sum(
            len(comps), sum(len(c) for c, keep in zip(comps, trains) if keep)))
        losses, kls, clips, gnorms, prefix = [], [], [], [], 0
        options = loss_options(g, temperature, cfg.rollout.max_new_tokens)
        # The off-policy mask compares with the rollout's own log-probs where it has them (else the old ones).
        sampling = pad_rows(roll.logprobs, self.device) if (g.off_policy_mask_threshold is not None
                                                            and roll.logprobs is not None) else None
        for _ in range(g.mu):
            step_loss, kl_sum, clip_sum = 0.0, 0.0, 0.0
            for idx in self._micro_batches(len(comps)):
                cb = self.hidden_states(model, batch.prompts, [comps[i] for i in idx],
                                              [roll.prompt_index[i] for i in idx])
                prefix += cb.num_prompt_tokens
                Tc = cb.ids.shape[1]
                sl = lambda x: None if x is None else x[idx, :Tc]  # noqa: E731
                mask = cb.mask * torch.tensor([trains[i] for i in idx], device=cb.mask.device,
                                              dtype=cb.mask.dtype)[:, None]
                out = compute_grpo_loss(
                    cb.hidden, lm_head_weight(model), cb.ids, mask, advantages[idx], sl(old_logps), sl(ref_logps),
                    options, kernel=g.kernel, backward=backward_options(g), num_items_in_batch=total_tokens,
                    sampling_logps=sl(sampling))
                mb_tokens = int(mask.sum())
                scale = micro_batch_scale(g.loss_type, sequences=len(idx), total_sequences=N, tokens=mb_tokens,
                                          total_tokens=total_tokens)  # accumulated: the whole batch's gradient
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
        """A checkpoint of this step (``Checkpointer``: ``hf`` on one process, sharded ``dcp`` on many; collective)."""
        return self.checkpointer.save(self.step)

    def _write_samples(self, batch: Batch, roll: RolloutResult, rewards: dict) -> None:
        with open(os.path.join(self.run_dir, "samples.jsonl"), "a") as f:
            for i, text in enumerate(roll.texts):
                rec = batch.records[roll.prompt_index[i]]
                f.write(json.dumps({"step": self.step, "problem_id": rec.problem_id, "completion": text,
                                    **{f"reward/{n}": v[i] for n, v in rewards.items()}}) + "\n")


def _describe(m: dict) -> str:
    """The progress line of a GRPO step."""
    return f"loss {m['loss']:+.4f}  reward {m['reward/total']:+.3f}  kl {m['kl']:.4f}  {m['time/step_s']:.2f}s/step"
