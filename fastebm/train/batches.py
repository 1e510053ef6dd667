"""The batch source shared by the trainers: each step, this rank's share of whole prompts.

    batches = BatchSource(data.records, data.sampler, data.profiles, policy.tokenizer, skips, env.dist,
                          prompts_per_step=cfg.train.prompts_per_step, data_cfg=cfg.data, video_cfg=cfg.video,
                          geometry=video_geometry(policy.model), records_file=cfg.data.train)
    batch = batches.next(prefetch_next=step + 1 < steps)   # Batch(records, prompts)

GRPO rolls the prompts out; SFT appends each record's target. Clips come from the one video
prefetcher (``fastebm.data.video.VideoPrefetcher``): ``prefetch(paths)`` starts decoding these,
``get(path)`` gives this path's sample (the per-file time limit included). Prompts come from the one
prompt path, ``fastebm.data.prompts.fit_prompt`` (the ``[prompt]`` templates, ``data.max_prompt_tokens``):
a record too long even without dialogue history is skipped and recorded like a bad video.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

from fastebm.data import DataError
from fastebm.data.prompts import PromptTemplates, PromptTooLong, fit_prompt
from fastebm.data.records import Profiles, Record, RecordSampler, resolve_video
from fastebm.data.video import VideoError, VideoPrefetcher
from fastebm.model.forward import Prompt
from fastebm.train.builders import SkipRecorder
from fastebm.train.parallel import Dist

log = logging.getLogger("fastebm")


@dataclass
class Batch:
    records: list[Record]
    prompts: list[Prompt]


class BatchSource:
    """This rank's ``prompts_per_step / world_size`` prompts per step (whole groups), each clip decoded once.

    Every rank holds the same seeded RecordSampler and draws the same candidates; rank r takes
    its slice. A bad video is skipped and replaced: the ranks exchange their skips (one object
    all-gather per round), every rank draws the replacements of all ranks in rank order, so the
    sampler stays identical everywhere (resume continues mid-epoch on every rank) and the global
    batch is the 1-process batch. Rank 0 writes every rank's skips to skipped.jsonl.

    Clips are decoded ahead of use on the ``video.num_workers`` decode workers (threads unless
    ``video.worker_type = "process"``: PyAV and DALI decode outside the GIL, and DALI on a GPU keeps
    its frames there): this batch's, then (when asked) the next batch's while the step runs. A guess
    that turns out wrong (a skipped video changes the draw) costs one wasted decode, never a wrong
    sample: results are looked up by path.
    """

    def __init__(self, records: list[Record], sampler: RecordSampler, profiles: Profiles, tokenizer,
                 skips: SkipRecorder, dist: Dist, *, prompts_per_step: int, data_cfg, video_cfg, geometry: dict,
                 records_file: str, templates: Optional[PromptTemplates] = None, max_positions: int = 0,
                 new_tokens: int = 0):
        self.records, self.sampler, self.profiles, self.tokenizer = records, sampler, profiles, tokenizer
        self.skips, self.dist, self.data_cfg, self.records_file = skips, dist, data_cfg, records_file
        self.templates, self.video_cfg = templates, video_cfg
        # The model's position limit and the tokens that follow a prompt (GRPO: rollout.max_new_tokens):
        # a longer sequence is warned about once per record (positions past the limit are extrapolated).
        self.max_positions, self.new_tokens, self._warned = max_positions, new_tokens, set()
        self.per_rank = prompts_per_step // dist.world_size
        kind = "thread" if video_cfg.worker_type == "auto" else video_cfg.worker_type
        self.video = VideoPrefetcher(video_cfg, worker_type=kind, **geometry)

    def next(self, prefetch_next: bool = True) -> Batch:
        """The next batch; with ``prefetch_next`` the following batch's clips start decoding now."""
        d = self.dist
        records, prompts, failures = [], [], 0
        need = [self.per_rank] * d.world_size  # prompts still missing, per rank
        while sum(need):
            candidates = [self.records[self.sampler.next()] for _ in range(sum(need))]
            start = sum(need[:d.rank])
            mine = candidates[start:start + need[d.rank]]
            self.video.prefetch([self._path(rec) for rec in mine])
            skips = []
            for rec in mine:
                path = self._path(rec)
                try:
                    prompt = self._prompt(rec, self.video.get(path))
                except (VideoError, PromptTooLong) as e:
                    skips.append(dict(file=path if isinstance(e, VideoError) else rec.source_file, record=rec.index,
                                      problem_id=rec.problem_id, reason=str(e)))
                    continue
                records.append(rec)
                prompts.append(prompt)
            need = []
            for rank_skips in d.all_gather_object(skips):
                for entry in rank_skips:
                    self.skips(**entry)
                need.append(len(rank_skips))
            failures += sum(need)
            if failures >= len(self.records):
                raise DataError(f"{self.records_file}: {failures} samples failed in one batch (bad videos or "
                                f"prompts over data.max_prompt_tokens); see {self.skips.path}")
        if prefetch_next:  # the next batch's clips decode while this step runs
            upcoming = self.sampler.peek(self.per_rank * d.world_size)[d.rank * self.per_rank:
                                                                      (d.rank + 1) * self.per_rank]
            self.video.prefetch([self._path(self.records[i]) for i in upcoming])
        return Batch(records, prompts)

    def close(self) -> None:
        self.video.close()

    def _path(self, rec: Record) -> str:
        return resolve_video(rec, self.data_cfg.video_root, self.data_cfg.allow_outside_root)

    def _prompt(self, rec: Record, video) -> Prompt:
        """The prompt ids exactly as the rollout sees them: system + user turn with the video, within
        ``data.max_prompt_tokens`` (PromptTooLong when even no history fits)."""
        d = self.data_cfg
        spacing = getattr(self.video_cfg, "second_per_grid", 0.0)
        if spacing > 0:  # the released run's fixed M-RoPE time spacing instead of the measured one (Qwen2.5-VL)
            video = dataclasses.replace(video, second_per_grid_ts=float(spacing))
        fitted = fit_prompt(self.tokenizer, rec, self.profiles, self.templates, d.tags, video.num_video_tokens,
                            max_history_turns=d.max_history_turns, max_prompt_tokens=d.max_prompt_tokens)
        self.check_positions(rec, len(fitted.ids) + self.new_tokens)
        return Prompt(fitted.ids, video)

    def check_positions(self, rec: Record, length: int) -> None:
        """Warn (once per record) when a sequence of ``length`` tokens passes the model's position limit."""
        if self.max_positions and length > self.max_positions and rec.index not in self._warned:
            self._warned.add(rec.index)
            log.warning("%s: %d tokens (prompt and what follows it) exceed the model's max_position_embeddings = "
                        "%d; set data.max_prompt_tokens (the dialogue history is then cut from the left)",
                        rec.where, length, self.max_positions)
