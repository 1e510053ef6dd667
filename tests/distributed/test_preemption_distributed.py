"""Preemption on two ranks (issue 16, finding 3): real torchrun processes on gloo, the tiny recipes.

- SIGTERM to ``fastebm train --nproc-per-node 2`` (a scheduler or ``kill`` signalling the command):
  it forwards the signal to both ranks, which finish the step, save a sharded checkpoint of it
  together and exit; the command exits 75.
- SIGUSR1 straight to both ranks of ``fastebm sft --nproc-per-node 2`` (a scheduler that signals every
  process of the job): the same, exit 75.

A dead rank (torchrun's SIGTERM to the others) stays tests/distributed/test_distributed.py's
test_a_dead_rank_ends_the_job_and_the_last_checkpoint_loads.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastebm.train.metrics import read_metrics

from distributed.cli_runs import ROOT, clean_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
RECIPES = {"train": os.path.join(ROOT, "recipes", "tiny.toml"), "sft": os.path.join(ROOT, "recipes", "tiny_sft.toml")}


def _children(pid):
    """Pids of ``pid``'s child processes (Linux /proc)."""
    out = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{name}/stat").read()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2:].split()[1] == str(pid):
            out.append(int(name))
    return out


@pytest.mark.parametrize("kind,sig,to", [("train", signal.SIGTERM, "launcher"), ("sft", signal.SIGUSR1, "ranks")],
                         ids=["train-SIGTERM-to-the-command", "sft-SIGUSR1-to-every-rank"])
def test_two_ranks_save_the_step_together_and_exit_75(tmp_path, kind, sig, to):
    out = tmp_path / "run"
    cheap = (["rollout.group_size=2", "rollout.max_new_tokens=8", "rewards.enabled=['format']",
              "rewards.weights={format=1.0}"] if kind == "train" else ["train.prompts_per_step=2"])
    cmd = [sys.executable, "-m", "fastebm.cli", kind, RECIPES[kind], "--nproc-per-node", "2", f"run.output_dir={out}",
           f"model.tiny_cache_dir={tmp_path / 'models'}", f"data.sample_dir={tmp_path / 'sample'}",
           "log.progress=false", "train.steps=500", "train.checkpoint_every=0", *cheap]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or not read_metrics(str(out)):
        assert p.poll() is None and time.time() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.2)
    if to == "launcher":
        p.send_signal(sig)
    else:
        ranks = [r for t in _children(p.pid) for r in _children(t)]  # launcher -> torchrun -> the ranks
        assert len(ranks) == 2
        for r in ranks:
            os.kill(r, sig)
    log, err = p.communicate(timeout=300)
    assert p.returncode == 75, (log + err)[-4000:]
    steps = [r["step"] for r in read_metrics(str(out))]
    assert 1 <= steps[-1] < 500 and steps == list(range(1, steps[-1] + 1))
    ck = out / "checkpoints" / str(steps[-1])
    assert sorted(os.listdir(out / "checkpoints")) == [str(steps[-1])]
    from fastebm.train.checkpoint import verify_checkpoint

    meta = verify_checkpoint(str(ck))
    assert meta["format"] == "dcp" and meta["world_size"] == 2
    assert sorted(os.listdir(ck / "rng")) == ["0.json", "0.safetensors", "1.json", "1.safetensors"]
    for r in (0, 1):
        name = "train.log" if r == 0 else "train.rank1.log"
        assert f"{sig.name}: saving a checkpoint of step {steps[-1]}" in open(out / name).read()
    assert "ChildFailedError" not in err  # torchrun saw the ranks end cleanly
    assert json.load(open(ck / "meta.json"))["step"] == steps[-1]
