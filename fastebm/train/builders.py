"""The pieces every trainer is built from (GRPO ``Trainer``, ``SFTTrainer``), one way each.

In dependency order, as both trainers call them::

    env = setup_run(cfg, records="train")       # run dir (locked), device, process group, seed, data, model
                                                #   path, the checkpoint to resume (env.resume_from)
    skips = SkipRecorder(env.run_dir, env.dist, lambda: trainer.step)
    data = build_data(cfg.data.train, cfg.data.profiles, cfg.run.seed, skips,  # records, profiles, sampler
                      video_root=cfg.data.video_root, allow_outside_root=cfg.data.allow_outside_root)
    resume_from = env.resume_from
    policy = build_policy(cfg.model, cfg.parallel, env, resume_from)           # FSDP2 on several ranks
    optimizer = build_optimizer(policy.model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, total_updates)
    checkpointer = Checkpointer(env.run_dir, policy, optimizer, scheduler, data.sampler, skips,
                                data.profiles, env.dist, keep=cfg.train.keep_checkpoints)
    step = checkpointer.restore(resume_from) if resume_from else 0

The batches come from ``fastebm.train.batches.BatchSource`` and the loop is
``fastebm.train.loop.train_loop``; what differs between the trainers is their ``train_step``.
"""
from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from fastebm.config import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig, write_config
from fastebm.data import DataError
from fastebm.data.records import Profiles, Record, RecordSampler, load_usable_records, resolve_video
from fastebm.model.loading import LoadedModel, resolve_model_path
from fastebm.train.checkpoint import (CheckpointWriteError, fingerprint, hf_weights_dir, latest_checkpoint,
                                      load_checkpoint, load_full_optimizer_state, load_sharded_weights, rank_rng_state,
                                      remove_stale_temporaries, resolve_resume, save_checkpoint,
                                      save_sharded_checkpoint, set_rng_state)
from fastebm.train.metrics import append_skipped
from fastebm.train.parallel import Dist, init_distributed, load_parallel_model
from fastebm.train.rundir import RunDirInUse, acquire_run_lock

log = logging.getLogger("fastebm")


class TrainingError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# The run environment
# ----------------------------------------------------------------------------------------------


@dataclass
class RunEnv:
    """Where this process runs: its run directory, device, place in the job, and the model to start from."""
    run_dir: str
    device: torch.device
    dist: Dist
    model_path: str  # model.path, or the tiny model built on first use
    resume_from: Optional[str] = None  # the verified checkpoint to resume (train.resume), or None


def setup_run(cfg: Config, records: str = "train") -> RunEnv:
    """Make the run directory, pick the device, join the process group (torchrun), claim the
    directory, find the checkpoint to resume, and seed.

    Before anything is written to the run directory, rank 0 locks it (``fastebm.train.rundir``:
    RunDirInUse when another run holds it), removes what interrupted saves left, and resolves
    ``train.resume`` (``resolve_resume``: verified checkpoints, no mixing with another run's; every
    rank gets rank 0's answer). Rank 0 then writes the sample data and builds the tiny model when the
    config asks for them, while the others wait and read them (``Dist.main_first``); rank 0 writes
    ``config.toml`` (the resolved config, data paths included). ``records`` names the records field
    the trainer reads (``train`` for GRPO, ``cot`` for SFT): an empty one is filled from
    ``data.sample_dir`` or is an error.
    """
    run_dir = os.path.expanduser(cfg.run.output_dir)
    os.makedirs(run_dir, exist_ok=True)
    device = pick_device(cfg.run.device)
    # One process, or one rank of a torchrun job: rank, world size, collectives (parallel.py).
    dist = init_distributed(cfg.parallel, device, cfg.train.prompts_per_step)
    device = dist.local_device(device)
    resume_from = claim_run_dir(run_dir, cfg.train.resume, cfg.run.start_over, dist)
    seed_everything(cfg.run.seed)
    with dist.main_first():  # rank 0 writes the sample data / tiny model, the others read them
        prepare_data(cfg.data, records)
        model_path = resolve_model_path(cfg.model)
    if dist.is_main:
        write_config(cfg, run_dir)
    return RunEnv(run_dir, device, dist, model_path, resume_from)


def claim_run_dir(run_dir: str, resume: str, start_over: bool, dist: Dist) -> Optional[str]:
    """Rank 0: lock ``run_dir``, clear stale temporary folders, resolve ``resume``; every rank returns
    the checkpoint to resume or raises rank 0's error (one object broadcast)."""
    from fastebm.config import ConfigError
    from fastebm.train.checkpoint import CheckpointError

    answer: tuple = ("ok", None)
    if dist.is_main:
        try:
            acquire_run_lock(run_dir)
            remove_stale_temporaries(run_dir)
            answer = ("ok", resolve_resume(resume, run_dir, start_over))
        except (RunDirInUse, ConfigError, CheckpointError) as e:
            answer = (type(e).__name__, str(e))
            if not dist.enabled:
                raise
    kind, value = dist.broadcast_object(answer)
    errors = {"RunDirInUse": RunDirInUse, "ConfigError": ConfigError}
    if kind != "ok":
        raise errors.get(kind, CheckpointError)(value)
    return value


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("run.device = 'cuda' but CUDA is not available on this machine")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_NO_RECORDS = {
    "train": "data.train: no records file given (set data.train, or data.sample_dir for the sample data)",
    "cot": "data.cot: no CoT records file given (the SFT stage trains on its process + solution; set data.cot, "
           "or data.sample_dir for the sample data)",
}


def prepare_data(d: DataConfig, records: str = "train") -> None:
    """Fill the empty data paths from the bundled sample dataset when ``data.<records>`` is empty and
    ``data.sample_dir`` is set (written there on first use); still empty is a DataError."""
    if not getattr(d, records) and d.sample_dir:
        from fastebm.data.sample import write_sample_dataset

        paths = write_sample_dataset(os.path.expanduser(d.sample_dir))
        d.train = d.train or paths["train"]
        d.cot = d.cot or paths["cot"]
        d.profiles = d.profiles or paths["profiles"]
        d.video_root = d.video_root or paths["video_root"]
    if not getattr(d, records):
        raise DataError(_NO_RECORDS[records])


# ----------------------------------------------------------------------------------------------
# Data: skipped samples, records, profiles, the sampler
# ----------------------------------------------------------------------------------------------


class SkipRecorder:
    """Skipped samples: counted on every rank, written by rank 0 to ``run_dir/skipped.jsonl``.

    Callers pass every rank's skips to every rank (the batch source exchanges them), so ``count``
    is the same on every rank; it is the metrics' and the checkpoint's ``samples_skipped``.
    ``current_step()`` is the trainer's step (the skip is recorded for the step after it).
    """

    def __init__(self, run_dir: str, dist: Dist, current_step: Callable[[], int]):
        self.path = os.path.join(run_dir, "skipped.jsonl")
        self.dist = dist
        self.current_step = current_step
        self.count = 0

    def __call__(self, **entry) -> None:
        self.count += 1
        if not self.dist.is_main:
            return
        log.warning("skipped sample: %s", entry.get("reason"))
        append_skipped(self.path, self.current_step() + 1, entry)


class TrainingData(NamedTuple):
    records: list[Record]
    profiles: Profiles
    sampler: RecordSampler


def build_data(records_file: str, profiles_file: str, seed: int, skips: SkipRecorder,
               require: Optional[Callable[[Record], object]] = None, *, video_root: str = "",
               allow_outside_root: bool = False) -> TrainingData:
    """The usable records of ``records_file`` (a malformed one, one whose ``video_path`` leaves
    ``video_root`` (``resolve_video``), or one that ``require`` rejects with a ValueError, is skipped
    and recorded, never fatal alone), the character profiles, and the seeded sampler over the
    records: the same order on every rank, resumable mid-epoch."""
    def usable(rec: Record) -> None:
        resolve_video(rec, video_root, allow_outside_root)
        if require is not None:
            require(rec)

    recs = load_usable_records(records_file, skips, require=usable)
    return TrainingData(recs, Profiles.load(profiles_file), RecordSampler(len(recs), seed))


# ----------------------------------------------------------------------------------------------
# Models, optimizer, schedule
# ----------------------------------------------------------------------------------------------


def build_policy(mcfg: ModelConfig, pcfg: ParallelConfig, env: RunEnv, resume_from: Optional[str]) -> LoadedModel:
    """The trained model: sharded with FSDP2 on several ranks (only rank 0 reads the weights),
    activation checkpointing per ``model.gradient_checkpointing``. Resuming from an ``hf`` checkpoint
    loads its weights here; a ``dcp`` checkpoint has no ``from_pretrained`` weights: the model starts
    from ``env.model_path`` and ``Checkpointer.restore`` loads the shards."""
    return load_parallel_model(hf_weights_dir(resume_from) or env.model_path, env.device, mcfg.dtype,
                               mcfg.attn_implementation, pcfg, env.dist, trainable=True,
                               activation_checkpointing=mcfg.gradient_checkpointing)


def build_reference(mcfg: ModelConfig, pcfg: ParallelConfig, env: RunEnv) -> LoadedModel:
    """The frozen reference (the KL target, and the teacher of rewards that use the teacher protocol):
    always the *initial* weights (or ``model.reference_path``), also when resuming. Sharded like the
    policy, eval mode, no grads."""
    return load_parallel_model(os.path.expanduser(mcfg.reference_path) or env.model_path, env.device, mcfg.dtype,
                               mcfg.attn_implementation, pcfg, env.dist, trainable=False)


def max_positions(model) -> int:
    """The text model's ``max_position_embeddings`` (0 when the config does not say)."""
    c = model.config
    return int(getattr(getattr(c, "text_config", None), "max_position_embeddings", None)
               or getattr(c, "max_position_embeddings", 0) or 0)


def video_geometry(model) -> dict:
    """The vision tower's patch geometry, which the video sampler needs (``load_video_sample`` kwargs)."""
    v = model.config.vision_config
    return dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size)


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (the sharded ones under FSDP: each rank steps its shards).
    The parameters' order is the index order of an ``hf`` checkpoint's optimizer state."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)


def total_steps(t: TrainConfig, num_records: int) -> int:
    """The run's length in steps: ``train.steps``, or with ``train.epochs`` set
    ceil(epochs x records / prompts_per_step) (records: the usable ones)."""
    if t.epochs > 0:
        return max(1, math.ceil(t.epochs * num_records / t.prompts_per_step))
    return t.steps


def epoch_progress(sampler: RecordSampler) -> float:
    """Passes over the records so far (records drawn / records, skipped draws included): the ``epoch`` metric."""
    return sampler.epoch + sampler.pos / sampler.n


def lr_lambda(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr after ``step`` optimiser steps: linear warmup, then cosine or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig,
                    total_updates: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then cosine / constant (``lr_lambda``) over ``total_updates`` optimiser steps; the warmup is
    ``train.warmup_steps``, or ``ceil(train.warmup_ratio x total_updates)`` when the ratio is set."""
    warmup = math.ceil(t.warmup_ratio * total_updates) if t.warmup_ratio > 0 else t.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_updates, warmup, t.lr_schedule, t.min_lr_ratio))


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


class Checkpointer:
    """Everything a checkpoint holds, saved and restored in one place.

    A checkpoint of step S holds the policy's weights and the optimizer state (``hf`` on one process:
    whole; ``dcp`` on several: every rank's shards), the LR schedule, the sampler's position, the
    counters (samples skipped; profiles missing, merged over ranks) and the RNG states (rank 0's; under
    ``dcp`` each rank's too). Either format resumes on any world size. The file formats are
    ``fastebm.train.checkpoint``'s; this object decides what goes in and where it comes back to.
    """

    def __init__(self, run_dir: str, policy: LoadedModel, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, sampler: RecordSampler, skips: SkipRecorder,
                 profiles: Profiles, dist: Dist, keep: int = 0):
        self.run_dir, self.policy, self.optimizer, self.scheduler = run_dir, policy, optimizer, scheduler
        self.sampler, self.skips, self.profiles, self.dist, self.keep = sampler, skips, profiles, dist, keep
        # What must match for a checkpoint to belong to this run: the architecture and the data size.
        self.fingerprint = fingerprint(policy.model.config.to_dict(), sampler.n)
        self.last_saved: Optional[str] = None

    def state_dict(self) -> dict:
        """The trainer state but the optimizer and the RNG (collective: gathers the profiles' misses)."""
        return {"scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state(),
                "samples_skipped": self.skips.count, "profiles_missing": self._merged_profiles_missing()}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state(state["sampler"])
        self.skips.count = state.get("samples_skipped", self.skips.count)
        # Every rank's misses were merged into rank 0's at save; the others count afresh (merged again at save).
        self.profiles.missing = dict(state.get("profiles_missing", {})) if self.dist.is_main else {}

    def save(self, step: int) -> str:
        """A checkpoint of ``step``: ``hf`` on one process, sharded ``dcp`` on several (collective).

        Never of non-finite weights (``check_finite``). CheckpointWriteError, naming the last good
        checkpoint, when it cannot be written (the temporary folder is removed; the loop decides
        whether the run goes on).
        """
        self.check_finite(step)
        state = self.state_dict()
        model, tok = self.policy.model, self.policy.tokenizer
        try:
            if self.dist.enabled:
                path = save_sharded_checkpoint(self.run_dir, step, model, self.optimizer, tok, state,
                                               self.fingerprint, self.dist, keep=self.keep)
            else:
                state["optimizer"] = self.optimizer.state_dict()
                path = save_checkpoint(self.run_dir, step, model, tok, state, self.fingerprint, keep=self.keep)
        except CheckpointWriteError as e:
            raise CheckpointWriteError(f"{e}. The last good checkpoint is "
                                       f"{latest_checkpoint(self.run_dir) or '(none yet)'}") from e
        log.info("checkpoint: %s", path)
        self.last_saved = path
        return path

    def check_finite(self, step: int) -> None:
        """TrainingError when a weight of the policy is NaN or infinite after ``step`` (a diverged
        update): the step and the last good checkpoint are named and nothing is saved.

        One pass over this rank's parameters (its shards), one host sync and, on several ranks, one
        all-reduce. Called after every step (the loop) and before every save.
        """
        named = list(self.policy.model.named_parameters())
        # Each rank checks its own shards (DTensor.to_local: no collective); one flag per parameter.
        flags = [torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for _, p in named]
        ok = torch.stack(flags).cpu().tolist() if flags else []  # host sync
        first = next((n for (n, _), good in zip(named, ok) if not good), None)
        if not self.dist.any(first is not None):
            return
        names = [x for x in self.dist.all_gather_object(first) if x]
        raise TrainingError(f"step {step}: the weights are not finite after the update ({names[0]} first): not "
                            f"saving them; the run stops. The last good checkpoint is "
                            f"{latest_checkpoint(self.run_dir) or '(none yet)'} (a lower train.lr or "
                            f"train.max_grad_norm may help)")

    def restore(self, path: str) -> int:
        """Load checkpoint ``path`` into the run's pieces; returns its step. ``hf`` weights were read
        when the policy was built (``build_policy``); ``dcp`` shards are resharded to this world size."""
        state = load_checkpoint(path, self.fingerprint)
        model = self.policy.model
        if state["format"] == "dcp":  # sharded weights + optimizer, resharded to this world size
            load_sharded_weights(path, model, self.optimizer)
            state["rng"] = rank_rng_state(path, self.dist.rank, self.dist.world_size) or state["rng"]
        elif self.dist.enabled:  # a 1-process checkpoint on many ranks: shard its optimizer state
            load_full_optimizer_state(model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.load_state_dict(state)
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", path, state["step"])
        return state["step"]

    def _merged_profiles_missing(self) -> dict:
        merged: dict = {}
        for part in self.dist.all_gather_object(dict(self.profiles.missing)):
            for k, v in part.items():
                merged[k] = merged.get(k, 0) + v
        return merged
