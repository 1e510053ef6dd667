"""``fastebm train|sft RECIPE [overrides] --check [--nproc-per-node N] [--nnodes M]``: everything about a
launch that needs no files and no GPU, before the job is started.

Checked (a failure exits 2 naming the key, the file and what to change): the recipe's types and
ranges (``load_config``), the batch and sharding layout for world size N x M (``check_parallel``:
``prompts_per_step`` whole groups per rank, ``dp_shard x dp_replicate``), the records field the
command reads (``data.train`` / ``data.cot``, or ``data.sample_dir``), reward names (GRPO; when the
plug-in files are here), the prompt templates and the profiles file when they are here. Listed,
each ``found`` or ``not found here``: every local path the run will read (model, reference, records,
profiles, video root, templates, reward models, plug-ins, the checkpoint to resume) — a path that is
not on this machine is not a failure (recipes are checked where they are written, not where they
run). When the records are here: how many are usable and the number of steps (``train.epochs``).
"""
from __future__ import annotations

import os
import sys


def _paths(cfg, command: str) -> list[tuple[str, str, str]]:
    """(key, path, kind) of every local path the run reads; kind: dir | file | any."""
    m, d, r = cfg.model, cfg.data, cfg.rewards
    out = []
    if not m.tiny:
        out.append(("model.path", m.path, "dir"))
    if m.reference_path and command == "train":
        out.append(("model.reference_path", m.reference_path, "dir"))
    records = d.cot if command == "sft" else d.train
    if records:
        out.append((f"data.{'cot' if command == 'sft' else 'train'}", records, "file"))
    elif d.sample_dir:  # the bundled sample dataset, written there on first use
        out.append(("data.sample_dir", d.sample_dir, "dir"))
    for key in ("profiles", "video_root"):
        if getattr(d, key):
            out.append((f"data.{key}", getattr(d, key), "file" if key == "profiles" else "dir"))
    for key in ("system_file", "user_file"):
        if getattr(cfg.prompt, key):
            out.append((f"prompt.{key}", getattr(cfg.prompt, key), "file"))
    if command == "train":
        if "accuracy" in r.enabled and r.accuracy.model_path:
            out.append(("rewards.accuracy.model_path", r.accuracy.model_path, "dir"))
        if "clip" in r.enabled and not r.clip.tiny:
            out.append(("rewards.clip.pretrained", r.clip.pretrained, "file"))
            if r.clip.model.endswith(".json"):
                out.append(("rewards.clip.model", r.clip.model, "file"))
        if "pcg" in r.enabled and r.pcg.safeguard and r.pcg.embedder_path:
            out.append(("rewards.pcg.embedder_path", r.pcg.embedder_path, "dir"))
        for i, plugin in enumerate(r.plugins):
            if plugin.endswith(".py") or os.sep in plugin:
                out.append((f"rewards.plugins[{i}]", plugin, "file"))
    resume = cfg.train.resume
    if resume.lower() == "true":
        out.append(("train.resume", os.path.join(cfg.run.output_dir, "checkpoints"), "dir"))
    elif resume.lower() != "false":
        out.append(("train.resume", resume, "dir"))
    return out


def _found(path: str, kind: str) -> bool:
    p = os.path.expanduser(path)
    return os.path.isdir(p) if kind == "dir" else os.path.isfile(p) if kind == "file" else os.path.exists(p)


def run_check(cfg, args, command: str) -> int:
    """Check ``cfg`` for ``command`` (``train`` | ``sft``) at the world size of ``args``; print what was
    checked and the paths; 0 when valid (ConfigError / DataError otherwise, naming the key)."""
    from fastebm.config import ConfigError, check_parallel
    from fastebm.data.profiles import Profiles
    from fastebm.data.prompts import load_templates, sft_target
    from fastebm.data.records import load_usable_records
    from fastebm.train.builders import total_steps

    source = args.recipe
    world = (args.nproc_per_node or 1) * args.nnodes
    check_parallel(cfg.parallel, world, cfg.train.prompts_per_step, source=source)
    field = "cot" if command == "sft" else "train"
    if not getattr(cfg.data, field) and not cfg.data.sample_dir:
        raise ConfigError(f"{source}: data.{field}: no records file for `fastebm {command}` (set data.{field}, "
                          f"or data.sample_dir for the sample data)")
    paths = _paths(cfg, command)
    status = {key: _found(p, kind) for key, p, kind in paths}
    checked = [f"config: types and ranges ({source})",
               f"layout: world size {world}: {cfg.train.prompts_per_step // world} prompt(s) per rank"
               + (f" x {cfg.rollout.group_size} completions" if command == "train" else "")]
    if command == "train":
        plugins_here = all(status.get(f"rewards.plugins[{i}]", True) for i in range(len(cfg.rewards.plugins)))
        if plugins_here:
            from fastebm.rewards import check_rewards

            check_rewards(cfg.rewards, source)
            checked.append(f"rewards: {', '.join(cfg.rewards.enabled)}")
        else:
            checked.append("rewards: names not checked (a plug-in file is not here)")
    templates_here = all(status.get(f"prompt.{k}", True) for k in ("system_file", "user_file"))
    if templates_here:
        load_templates(cfg.prompt)  # unknown placeholders fail here, naming the file
        checked.append("prompt templates: placeholders")
    else:
        checked.append("prompt templates: not checked (a template file is not here)")
    if status.get("data.profiles"):
        Profiles.load(cfg.data.profiles)
        checked.append("profiles file")
    records_file = getattr(cfg.data, field)
    if not records_file and status.get("data.sample_dir"):
        records_file = os.path.join(os.path.expanduser(cfg.data.sample_dir), f"{field}.json")
        status[f"data.{field}"] = os.path.isfile(records_file)
    if records_file and status.get(f"data.{field}"):
        bad = []
        # as the trainer reads them: SFT also skips a record without `process` (none usable: DataError)
        recs = load_usable_records(records_file, lambda **e: bad.append(e),
                                   require=sft_target if command == "sft" else None)
        steps = total_steps(cfg.train, len(recs))
        checked.append(f"records: {len(recs)} usable, {len(bad)} malformed (skipped in the run); {steps} steps"
                       + (f" (train.epochs = {cfg.train.epochs:g})" if cfg.train.epochs else ""))
    elif cfg.train.epochs:
        checked.append(f"steps: from train.epochs = {cfg.train.epochs:g} once the records are there")
    print(f"fastebm {command} {source} --check (world size {world})")
    for line in checked:
        print(f"  ok     {line}")
    for key, p, kind in paths:
        print(f"  {'found' if status[key] else 'not found here':<15} {key} = {p}")
    if cfg.run.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("  note   run.device = 'cuda': no GPU on this machine (the run needs one)")
    missing = sum(not v for v in status.values())
    print(f"check passed: {len(paths) - missing} of {len(paths)} paths found here"
          + (f"; {missing} to provide where the job runs" if missing else ""))
    sys.stdout.flush()
    return 0
