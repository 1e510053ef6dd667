"""The CoT-SFT stage (stage 1 of EBM-RL): supervised fine-tuning on the ``process`` + ``solution``
text of CoT records, whose checkpoint the GRPO stage starts from.

    fastebm sft recipes/tiny_sft.toml [section.key=value ...] [--nproc-per-node N]

It is built from the same pieces as the GRPO trainer (``fastebm.train.builders``): the run setup
(process group, seed, sample data), records (``data.cot``; a record without ``process`` is skipped
and recorded), profiles and the seeded sampler, the policy (FSDP2 on several ranks, activation
checkpointing), AdamW and the warmup + cosine / constant schedule, the checkpointer (``hf`` on one
process, sharded ``dcp`` on several, either resumes on any world size), the batch source
(``fastebm.train.batches``) and the loop (``fastebm.train.loop``: checkpoints, Ctrl-C). One step:

  1. batch    this rank's ``prompts_per_step / world_size`` CoT records, each clip decoded once and
              ahead of time; prompt ids exactly as the GRPO rollout sees them (system + user turn
              with the video, then ``<|im_start|>assistant\\n``)
  2. target   the assistant turn: ``sft_target(record)`` (process, blank line, solution) + ``<|im_end|>``
  3. loss     token-mean negative log-likelihood of the target tokens only, over the GLOBAL batch:
              each rank sums its target tokens' NLL and divides by the number of target tokens of
              all ranks (FSDP sums the gradients over ranks), so 2 ranks compute the 1-process
              gradient. Prompt and video tokens never enter the loss (they are the prefix of
              ``completion_hidden_states``, which returns hidden states for the target tokens
              alone); micro-batched, gradients accumulated
  4. update   clip by the global grad norm, AdamW, schedule; rank 0 writes metrics.jsonl

At the end ``run.output_dir/final`` is a Hugging Face model directory the GRPO recipes start from
(``model.path = <sft output_dir>/final``): a link to the last checkpoint on one process, the last
(sharded) checkpoint exported by rank 0 on several.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from fastebm.config import Config
from fastebm.data.prompts import load_templates, sft_target
from fastebm.model.forward import Prompt, completion_hidden_states, lm_head_weight
from fastebm.model.logprobs import training_logprobs
from fastebm.train.batches import BatchSource
from fastebm.train.builders import (Checkpointer, SkipRecorder, TrainingError, build_data, build_optimizer,
                                    build_policy, build_scheduler, epoch_progress, max_positions, setup_run,
                                    total_steps, video_geometry)
from fastebm.train.checkpoint import latest_checkpoint
from fastebm.train.loop import Progress, train_loop
from fastebm.train.metrics import MetricsWriter
from fastebm.train.parallel import clip_grad_norm

log = logging.getLogger("fastebm")


class SFTTrainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.templates = load_templates(cfg.prompt)  # the GRPO stage's templates: a bad one fails before any load
        env = setup_run(cfg, records="cot")  # run dir, device, process group, seed, sample data, config.toml
        self.run_dir, self.device, self.dist = env.run_dir, env.device, env.dist

        self.skips = SkipRecorder(self.run_dir, self.dist, lambda: getattr(self, "step", 0))
        # A record without `process` is skipped like a malformed one (sft_target raises ValueError).
        self.records, self.profiles, self.sampler = build_data(cfg.data.cot, cfg.data.profiles, cfg.run.seed,
                                                               self.skips, require=sft_target,
                                                               video_root=cfg.data.video_root,
                                                               allow_outside_root=cfg.data.allow_outside_root)
        self.total_steps = total_steps(cfg.train, len(self.records))  # train.steps, or train.epochs of the records
        resume_from = env.resume_from  # verified by setup_run (train.resume, run.start_over)
        self.policy = build_policy(cfg.model, cfg.parallel, env, resume_from)
        self.optimizer = build_optimizer(self.policy.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, self.total_steps)
        self.checkpointer = Checkpointer(self.run_dir, self.policy, self.optimizer, self.scheduler, self.sampler,
                                         self.skips, self.profiles, self.dist, keep=cfg.train.keep_checkpoints)
        self.step = self.checkpointer.restore(resume_from) if resume_from else 0
        self.metrics = MetricsWriter(self.run_dir, cfg.log.tensorboard, resume_step=self.step if resume_from else None,
                                     enabled=self.dist.is_main)
        self.batches = BatchSource(self.records, self.sampler, self.profiles, self.policy.tokenizer, self.skips,
                                   self.dist, prompts_per_step=cfg.train.prompts_per_step, data_cfg=cfg.data,
                                   video_cfg=cfg.video, geometry=video_geometry(self.policy.model),
                                   records_file=cfg.data.cot, templates=self.templates,
                                   max_positions=max_positions(self.policy.model))
        self.eos_id = self.policy.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def next_batch(self) -> tuple[list[Prompt], list[list[int]]]:
        """This rank's prompts (each clip decoded once) and the target ids of their CoT records."""
        batch = self.batches.next(prefetch_next=self.step + 1 < self.total_steps)
        tok = self.policy.tokenizer
        targets = [tok(sft_target(rec), add_special_tokens=False)["input_ids"] + [self.eos_id] for rec in batch.records]
        for rec, p, tgt in zip(batch.records, batch.prompts, targets):
            self.batches.check_positions(rec, len(p.ids) + len(tgt))
        return batch.prompts, targets

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        prompts, targets = self.next_batch()
        model, mb, d = self.policy.model, self.cfg.train.micro_batch_size, self.dist
        total = int(d.all_reduce_sum(sum(len(t) for t in targets)))  # target tokens of ALL ranks (host sync)
        loss_sum, prefix = 0.0, 0
        for s in range(0, len(targets), mb):
            idx = list(range(s, min(len(targets), s + mb)))
            cb = completion_hidden_states(model, prompts, [targets[i] for i in idx], idx)
            lp = training_logprobs(cb.hidden, lm_head_weight(model), cb.ids, kernel=self.cfg.grpo.kernel)  # (B, T) fp32
            # This micro-batch's summed target NLL / the global batch's target tokens: the gradients
            # accumulated here and summed over ranks are those of the global token-mean NLL.
            loss = -(lp * cb.mask).sum() / total
            loss.backward()
            loss_sum += float(loss.detach())
            prefix += cb.num_prompt_tokens
        loss_sum, prefix = d.all_reduce_sum(loss_sum, prefix)  # the same on every rank: all stop together
        if not torch.isfinite(torch.tensor(loss_sum)):
            raise TrainingError(f"non-finite SFT loss at step {self.step + 1}; the last good checkpoint is "
                                f"{latest_checkpoint(self.run_dir) or '(none yet)'}")
        gn = clip_grad_norm(list(model.parameters()), self.cfg.train.max_grad_norm)  # global norm (sharded grads)
        lr = self.scheduler.get_last_lr()[0]  # the rate this update uses
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        m = {"step": self.step, "loss": loss_sum, "grad_norm": float(gn), "lr": lr, "tokens/target": total,
             "tokens/prefix": int(prefix), "time/step_s": time.perf_counter() - t0,
             "samples_skipped": self.skips.count,
             "profiles_missing": int(d.all_reduce_sum(sum(self.profiles.missing.values()))),
             "epoch": epoch_progress(self.sampler)}
        self.metrics.write(m)
        return m

    def save(self) -> str:
        return self.checkpointer.save(self.step)

    def close(self) -> None:
        """Stop the video decode threads and close the metrics writers."""
        self.batches.close()
        self.metrics.close()

    def train(self) -> list[dict]:
        """``total_steps`` steps (``train.steps`` or ``train.epochs``; ``fastebm.train.loop.train_loop``),
        then ``run.output_dir/final``."""
        t = self.cfg.train
        history = train_loop(self, self.total_steps, t.checkpoint_every,
                             Progress(self.total_steps, self.step, self.cfg.log.progress, _describe))
        if self.dist.is_main:
            final = write_final(self.checkpointer.last_saved, self.run_dir)
            log.info("SFT checkpoint: %s (the model as %s)", self.checkpointer.last_saved, final)
        return history


def write_final(checkpoint: str, run_dir: str) -> str:
    """``run_dir/final``: a Hugging Face model directory of ``checkpoint`` (the GRPO stage's start).

    An ``hf`` checkpoint is that already: ``final`` is a relative link to it. A sharded ``dcp`` one
    is exported (consolidated on this process, ``fastebm export``'s code) into ``final``.
    """
    from fastebm.train.checkpoint import checkpoint_format

    final = os.path.join(run_dir, "final")
    if os.path.islink(final):
        os.remove(final)
    elif os.path.isdir(final):
        import shutil

        shutil.rmtree(final)
    if checkpoint_format(checkpoint) == "hf":
        os.symlink(os.path.relpath(checkpoint, run_dir), final)
    else:
        from fastebm.train.export import export_checkpoint

        export_checkpoint(checkpoint, final)
    return final


def _describe(m: dict) -> str:
    """The progress line of an SFT step."""
    return f"loss {m['loss']:.4f}  grad_norm {m['grad_norm']:.3f}  {m['time/step_s']:.2f}s/step"
