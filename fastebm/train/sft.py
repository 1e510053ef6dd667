"""The CoT-SFT stage (stage 1 of EBM-RL): supervised fine-tuning on the ``process`` + ``solution``
text of CoT records, whose checkpoint the GRPO stage starts from.

    fastebm sft recipes/tiny_sft.toml [section.key=value ...]

It reuses the GRPO trainer's parts rather than copying them: the same config sections (``[train]``
for steps / lr / schedule / micro-batches / checkpoints / resume, ``data.cot`` for the records),
the same record reader, prompts, video decode (each clip decoded once per step), model loading,
checkpoints (``train/checkpoint.py``) and metrics (``train/metrics.py``). One step:

  1. batch    ``train.prompts_per_step`` CoT records; prompt ids exactly as the GRPO rollout sees them
              (system + user turn with the video, then ``<|im_start|>assistant\\n``)
  2. target   the assistant turn: ``sft_target(record)`` (process, blank line, solution) + ``<|im_end|>``
  3. loss     token-mean negative log-likelihood of the target tokens only: prompt and video tokens
              never enter the loss (they are the prefix of ``completion_hidden_states``, which returns
              hidden states for the target tokens alone); micro-batched, gradients accumulated
  4. update   clip, AdamW, warmup + cosine / constant schedule (the GRPO trainer's ``lr_lambda``)

At the end the last checkpoint is also linked as ``run.output_dir/final`` (a Hugging Face model
directory): the GRPO recipes start from it with ``model.path = <sft output_dir>/final``.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from fastebm.config import Config, write_config
from fastebm.data import DataError
from fastebm.data.prompts import build_messages, encode_prompt, sft_target
from fastebm.data.records import Profiles, Record, RecordSampler, load_usable_records, resolve_video
from fastebm.model.forward import Prompt, completion_hidden_states, lm_head_weight
from fastebm.model.loading import load_model, resolve_model_path
from fastebm.model.logprobs import training_logprobs
from fastebm.train.checkpoint import (fingerprint, latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint,
                                      set_rng_state)
from fastebm.train.metrics import MetricsWriter, append_skipped
from fastebm.train.trainer import TrainingError, lr_lambda, pick_device, prepare_data, seed_everything

log = logging.getLogger("fastebm")


class SFTTrainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = os.path.expanduser(cfg.run.output_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.device = pick_device(cfg.run.device)
        seed_everything(cfg.run.seed)
        if not cfg.data.cot:
            prepare_data(cfg)  # the bundled sample dataset fills data.cot when data.sample_dir is set
        if not cfg.data.cot:
            raise DataError("data.cot: no CoT records file given (the SFT stage trains on its process + solution)")
        write_config(cfg, self.run_dir)
        self.skipped_path = os.path.join(self.run_dir, "skipped.jsonl")
        self.samples_skipped = 0
        self.records = self._load_records()
        self.profiles = Profiles.load(cfg.data.profiles)
        self.sampler = RecordSampler(len(self.records), cfg.run.seed)

        resume_from = resolve_resume(cfg.train.resume, self.run_dir)
        self.policy = load_model(resume_from or resolve_model_path(cfg.model), self.device, cfg.model.dtype,
                                 cfg.model.attn_implementation, trainable=True)
        if cfg.model.gradient_checkpointing:
            self.policy.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        t = cfg.train
        params = [p for p in self.policy.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, t.steps, t.warmup_steps, t.lr_schedule, t.min_lr_ratio))
        self.fingerprint = fingerprint(self.policy.model.config.to_dict(), len(self.records))
        self.step = 0
        if resume_from:
            state = load_checkpoint(resume_from, self.fingerprint)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.sampler.load_state(state["sampler"])
            self.samples_skipped = state.get("samples_skipped", 0)
            set_rng_state(state["rng"])
            self.step = state["step"]
        self.metrics = MetricsWriter(self.run_dir, cfg.log.tensorboard, resume_step=self.step if resume_from else None)
        v = self.policy.model.config.vision_config
        self._video_kwargs = dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                  merge_size=v.spatial_merge_size)
        self.eos_id = self.policy.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def _load_records(self) -> list[Record]:
        """The usable CoT records (a record without ``process`` is skipped like a malformed one)."""
        return load_usable_records(self.cfg.data.cot, self._skip, require=sft_target)

    def _skip(self, **entry) -> None:
        self.samples_skipped += 1
        log.warning("skipped sample: %s", entry.get("reason"))
        append_skipped(self.skipped_path, getattr(self, "step", 0) + 1, entry)

    def next_batch(self) -> tuple[list[Prompt], list[list[int]]]:
        """Prompts (video decoded once) and target ids of ``prompts_per_step`` CoT records."""
        from fastebm.data.video import VideoError, load_video_sample

        tok, cfg = self.policy.tokenizer, self.cfg
        prompts, targets, failures = [], [], 0
        while len(prompts) < cfg.train.prompts_per_step:
            rec = self.records[self.sampler.next()]
            path = resolve_video(rec, cfg.data.video_root)
            try:
                video = load_video_sample(path, cfg.video, **self._video_kwargs)
            except VideoError as e:
                self._skip(file=path, record=rec.index, problem_id=rec.problem_id, reason=str(e))
                failures += 1
                if failures >= len(self.records):
                    raise DataError(f"{cfg.data.cot}: {failures} videos failed in a row; see {self.skipped_path}") from e
                continue
            messages = build_messages(rec, self.profiles.get(rec.data_source, rec.assistant), cfg.data.tags,
                                      cfg.data.max_history_turns)
            prompts.append(Prompt(encode_prompt(tok, messages, video.num_video_tokens), video))
            targets.append(tok(sft_target(rec), add_special_tokens=False)["input_ids"] + [self.eos_id])
        return prompts, targets

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        prompts, targets = self.next_batch()
        model, mb = self.policy.model, self.cfg.train.micro_batch_size
        total = sum(len(t) for t in targets)
        loss_sum, prefix = 0.0, 0
        for s in range(0, len(targets), mb):
            idx = list(range(s, min(len(targets), s + mb)))
            cb = completion_hidden_states(model, prompts, [targets[i] for i in idx], idx)
            lp = training_logprobs(cb.hidden, lm_head_weight(model), cb.ids, kernel=self.cfg.grpo.kernel)  # (B, T) fp32
            # Sum over this micro-batch's target tokens / all target tokens of the step: the accumulated
            # gradient is that of the step's token-mean NLL.
            loss = -(lp * cb.mask).sum() / total
            loss.backward()
            loss_sum += float(loss.detach())
            prefix += cb.num_prompt_tokens
        if not torch.isfinite(torch.tensor(loss_sum)):
            raise TrainingError(f"non-finite SFT loss at step {self.step + 1}; the last good checkpoint is "
                                f"{latest_checkpoint(self.run_dir) or '(none yet)'}")
        mx = self.cfg.train.max_grad_norm
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), mx if mx > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        m = {"step": self.step, "loss": loss_sum, "grad_norm": float(gn), "lr": self.scheduler.get_last_lr()[0],
             "tokens/target": total, "tokens/prefix": prefix, "time/step_s": time.perf_counter() - t0,
             "samples_skipped": self.samples_skipped}
        self.metrics.write(m)
        return m

    def save(self) -> str:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "sampler": self.sampler.state(), "samples_skipped": self.samples_skipped}
        return save_checkpoint(self.run_dir, self.step, self.policy.model, self.policy.tokenizer, state,
                               self.fingerprint, keep=self.cfg.train.keep_checkpoints)

    def train(self) -> list[dict]:
        history, every = [], self.cfg.train.checkpoint_every
        try:
            while self.step < self.cfg.train.steps:
                m = self.train_step()
                history.append(m)
                log.info("sft step %d: loss %.4f  %.2fs/step", m["step"], m["loss"], m["time/step_s"])
                if every and self.step % every == 0 and self.step < self.cfg.train.steps:
                    self.save()
            path = self.save()
        finally:
            self.metrics.close()
        final = os.path.join(self.run_dir, "final")
        if os.path.islink(final):
            os.remove(final)
        if not os.path.exists(final):
            os.symlink(os.path.relpath(path, self.run_dir), final)
        log.info("SFT checkpoint: %s (linked as %s)", path, final)
        return history
