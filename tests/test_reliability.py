"""Runs and run folders that survive what clusters do to them (issue 16, findings 3-9 and 12), in-process.

- preemption: SIGTERM (GRPO) and SIGUSR1 (SFT) finish the step, save it and stop (``Preempted``);
- one run per folder: a folder locked by a live process is refused naming it; a dead holder's lock
  is taken over with a warning;
- a fresh run in a folder with checkpoints refuses (``run.start_over`` deletes them); pruning never
  removes the checkpoint just written; a resume never mixes with newer checkpoints;
- non-finite weights are never saved (``train.lr=1e39`` stops at step 1);
- a damaged newest checkpoint (each file: truncated model, trainer state, meta.json; a garbled
  payload of the right size) is named and the previous good one resumed;
- a checkpoint that cannot be written (a file-size limit: the disk is "full") is a warning for a
  periodic save and an error naming the last good checkpoint otherwise; stale ``.tmp-*`` folders
  are removed at start;
- a torn last line of metrics.jsonl is dropped with a warning on resume;
- a ``video_path`` that leaves the video root is skipped, never opened.

The CLI and torchrun sides (exit codes, two real runs): tests/test_reliability_cli.py and
tests/distributed/test_preemption_distributed.py.
"""
import contextlib
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import tiny_checkpointer

from fastebm.config import ConfigError, load_config
from fastebm.tiny import ensure_tiny_model
from fastebm.train.checkpoint import CheckpointError, list_checkpoints, resolve_resume
from fastebm.train.metrics import read_metrics
from fastebm.train.sft import SFTTrainer
from fastebm.train.trainer import Trainer, TrainingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "recipes", "tiny.toml")
SFT = os.path.join(ROOT, "recipes", "tiny_sft.toml")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("reliability")
    return {"models": str(base / "models"), "data": str(base / "sample")}


@pytest.fixture(scope="module")
def tiny_path(env):
    return ensure_tiny_model("qwen2vl", env["models"])


def grpo_cfg(env, out, *overrides):
    """The tiny GRPO recipe, made cheap: 2 samples per prompt, 8 new tokens, format reward only."""
    return load_config(TINY, [f"run.output_dir={out}", f"model.tiny_cache_dir={env['models']}",
                              f"data.sample_dir={env['data']}", "log.progress=false", "rollout.group_size=2",
                              "rollout.max_new_tokens=8", "rewards.enabled=['format']", "rewards.weights={format=1.0}",
                              *overrides])


def sft_cfg(env, out, *overrides):
    return load_config(SFT, [f"run.output_dir={out}", f"model.tiny_cache_dir={env['models']}",
                             f"data.sample_dir={env['data']}", "log.progress=false", "train.prompts_per_step=2",
                             "train.micro_batch_size=2", *overrides])


# ----------------------------------------------------------------------------------------------
# 3. Preemption: SIGTERM / SIGUSR1 save at the end of the step
# ----------------------------------------------------------------------------------------------


class _NotHandled(Exception):
    pass


@pytest.fixture
def signal_guard():
    """While a test runs, a stop signal the training loop does not take raises _NotHandled (instead of
    killing pytest); the loop must put these handlers back when it ends."""
    def not_handled(signum, frame):
        raise _NotHandled(f"{signal.Signals(signum).name} reached the test's handler: the loop did not take it")

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    prev = {s: signal.signal(s, not_handled) for s in sigs}
    yield not_handled
    for s, h in prev.items():
        signal.signal(s, h)


def _signal_after(t, at_step, sig):
    """Wrap t.train_step: after step ``at_step`` is computed, the process signals itself (as a scheduler would)."""
    orig = t.train_step

    def step():
        m = orig()
        if t.step == at_step:
            os.kill(os.getpid(), sig)
        return m

    t.train_step = step


@pytest.mark.parametrize("kind,sig", [pytest.param("grpo", signal.SIGTERM, marks=pytest.mark.slow),
                                      ("sft", signal.SIGUSR1)], ids=["train-SIGTERM", "sft-SIGUSR1"])
def test_stop_signal_finishes_the_step_saves_and_stops(env, tmp_path, signal_guard, kind, sig):
    out = tmp_path / "run"

    def make(*overrides):
        return Trainer(grpo_cfg(env, out, *overrides)) if kind == "grpo" else SFTTrainer(sft_cfg(env, out, *overrides))

    t = make("train.steps=10", "train.checkpoint_every=0")
    _signal_after(t, at_step=2, sig=sig)
    with pytest.raises(Exception) as e:
        t.train()
    assert type(e.value).__name__ == "Preempted", repr(e.value)  # fastebm.train.stop.Preempted (CLI: exit 75)
    assert e.value.signal_name == sig.name and e.value.step == 2
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2]
    assert sorted(os.listdir(out / "checkpoints")) == ["2"] and e.value.checkpoint == str(out / "checkpoints" / "2")
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        assert signal.getsignal(s) is signal_guard  # the loop's handlers are gone
    resumed = make("train.steps=3", "train.resume=true")
    assert resumed.step == 2
    resumed.close()


def test_a_preemption_signal_while_starting_is_acted_on_after_the_first_step(env, tmp_path, signal_guard):
    """SIGUSR1's default action kills the process: the CLI installs a handler before the models load
    (install_early_handlers) that remembers the signal for the loop."""
    from fastebm.train import stop

    t = SFTTrainer(sft_cfg(env, tmp_path / "run", "train.steps=10", "train.checkpoint_every=0"))
    try:
        stop.install_early_handlers()
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives "while starting": before the loop
        with pytest.raises(stop.Preempted) as e:
            t.train()
    finally:
        signal.signal(signal.SIGUSR1, signal_guard)
        stop._early_stop = None
    assert e.value.signal_name == "SIGUSR1" and e.value.step == 1
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1"]


# ----------------------------------------------------------------------------------------------
# 4. One run per folder
# ----------------------------------------------------------------------------------------------

HOLD = ("import sys, time\nfrom fastebm.train.rundir import acquire_run_lock\nacquire_run_lock(sys.argv[1])\n"
        "print('locked', flush=True)\ntime.sleep(300)\n")


def test_a_folder_held_by_a_live_run_is_refused_and_a_dead_ones_lock_taken_over(env, tmp_path, caplog):
    from fastebm.train.builders import setup_run
    from fastebm.train.rundir import RunDirInUse, lock_holder

    out = tmp_path / "run"
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUse, match=rf"in use by another fastebm run: pid {holder.pid} on host "):
            SFTTrainer(sft_cfg(env, out, "train.steps=1"))
        assert not (out / "config.toml").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(str(out))["pid"] == holder.pid  # killed: its lock file survives, unlocked
    with caplog.at_level(logging.WARNING, logger="fastebm"):
        setup_run(sft_cfg(env, out, "train.steps=1"), records="cot")
    assert f"taking over the lock of a run that is no longer running (pid {holder.pid}" in caplog.text
    assert lock_holder(str(out))["pid"] == os.getpid()


# ----------------------------------------------------------------------------------------------
# 5. A fresh run never mixes with (or prunes itself for) an earlier run's checkpoints
# ----------------------------------------------------------------------------------------------


def test_fresh_run_in_a_folder_with_checkpoints_refuses_unless_told_to_start_over(tiny_path, tmp_path):
    run = tmp_path / "run"
    old = tiny_checkpointer(run, tiny_path)
    for s in (1, 2, 3, 4):
        old.save(s)
    with pytest.raises(ConfigError, match=r"holds checkpoints of an earlier run .*run\.start_over=true"):
        resolve_resume("false", str(run))
    assert [s for s, _ in list_checkpoints(str(run))] == [1, 2, 3, 4]  # nothing deleted without being told
    assert resolve_resume("false", str(run), start_over=True) is None
    assert list_checkpoints(str(run)) == []
    new = tiny_checkpointer(run, tiny_path, keep=2)
    path = new.save(1)
    assert os.path.isdir(path) and resolve_resume("true", str(run)) == path


def test_pruning_never_removes_the_checkpoint_just_written(tiny_path, tmp_path):
    run = tmp_path / "run"
    ckp = tiny_checkpointer(run, tiny_path, keep=0)
    for s in (1, 2, 7):
        ckp.save(s)
    ckp.keep = 1
    path = ckp.save(3)  # e.g. resumed from 2 after a damaged 7 was skipped: 7 stays until this run rewrites it
    assert os.path.isdir(path)
    assert [s for s, _ in list_checkpoints(str(run))] == [3, 7]


def test_resuming_an_older_checkpoint_refuses_newer_ones(tiny_path, tmp_path):
    run = tmp_path / "run"
    ckp = tiny_checkpointer(run, tiny_path)
    two, _ = ckp.save(2), ckp.save(4)
    with pytest.raises(ConfigError, match=r"newer than the one this run resumes from .*checkpoints/4"):
        resolve_resume(two, str(run))
    assert resolve_resume(two, str(run), start_over=True) == two
    assert [s for s, _ in list_checkpoints(str(run))] == [2]


# ----------------------------------------------------------------------------------------------
# 6. Non-finite weights are never saved
# ----------------------------------------------------------------------------------------------


def test_diverged_weights_stop_the_run_naming_the_step_and_the_last_good_checkpoint(env, tmp_path):
    """The issue's train.lr=inf no longer starts (a config error); a divergence that the loss does not
    show (here: an update that leaves a NaN in the weights after step 2) stops the run at that step,
    naming it and the last good checkpoint, and saves nothing of it."""
    with pytest.raises(ConfigError, match=r"command line: train.lr = inf: must be a finite number"):
        sft_cfg(env, tmp_path / "inf", "train.lr=inf")
    out = tmp_path / "run"
    t = SFTTrainer(sft_cfg(env, out, "train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=0"))
    orig = t.train_step

    def step():
        m = orig()
        if t.step == 2:
            with torch.no_grad():
                next(t.policy.model.parameters()).view(-1)[0] = float("nan")
        return m

    t.train_step = step
    with pytest.raises(TrainingError, match=r"step 2: the weights are not finite .*good checkpoint is .*checkpoints/1"):
        t.train()
    assert [s for s, _ in list_checkpoints(str(out))] == [1]


def test_a_checkpoint_of_non_finite_weights_is_refused_naming_the_last_good_one(tiny_path, tmp_path):
    ckp = tiny_checkpointer(tmp_path / "run", tiny_path)
    first = ckp.save(1)
    with torch.no_grad():
        next(ckp.policy.model.parameters())[0].fill_(float("nan"))
    with pytest.raises(TrainingError, match=rf"step 2: the weights are not finite .*{re.escape(first)}"):
        ckp.save(2)
    assert [s for s, _ in list_checkpoints(str(tmp_path / "run"))] == [1]


# ----------------------------------------------------------------------------------------------
# 7. A damaged checkpoint is named and the previous good one is used
# ----------------------------------------------------------------------------------------------


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garble(path):  # same size, different bytes in the middle of the tensor data
    n = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(n // 2)
        data = f.read(64)
        f.seek(n // 2)
        f.write(bytes(b ^ 0xFF for b in data))


DAMAGE = {
    "model-truncated": (lambda ck: _truncate(os.path.join(ck, "model.safetensors")), "model.safetensors"),
    "trainer-state-truncated": (lambda ck: [_truncate(os.path.join(ck, n)) for n in os.listdir(ck)
                                            if n.startswith("trainer_state")], "trainer_state"),
    "meta-truncated": (lambda ck: _truncate(os.path.join(ck, "meta.json")), "meta.json"),
    "model-garbled": (lambda ck: _garble(os.path.join(ck, "model.safetensors")), "model.safetensors"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(tiny_path, tmp_path, caplog, damage):
    run = tmp_path / "run"
    ckp = tiny_checkpointer(run, tiny_path)
    good, bad = ckp.save(1), ckp.save(2)
    spoil, file = DAMAGE[damage]
    spoil(bad)
    with caplog.at_level(logging.WARNING, logger="fastebm"):
        chosen = resolve_resume("true", str(run))
    assert chosen == good
    warning = next(r.getMessage() for r in caplog.records if "unusable" in r.getMessage())
    assert bad in warning and file in warning
    assert any(why in warning for why in ("bytes, but meta.json says", "SHA-256 differs", "not valid JSON")), warning
    assert tiny_checkpointer(run, tiny_path).restore(chosen) == 1
    with pytest.raises(CheckpointError, match=file):
        resolve_resume(bad, str(run))  # named explicitly: an error, no fallback


# ----------------------------------------------------------------------------------------------
# 8. A checkpoint that cannot be written
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def disk_full(limit=1 << 18):
    """Writes that grow a file past ``limit`` bytes fail (EFBIG), as on a full disk: RLIMIT_FSIZE, with
    SIGXFSZ ignored so that the write returns the error instead of killing the process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    prev = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, prev)


def test_a_failed_save_leaves_nothing_and_names_the_last_good_checkpoint(tiny_path, tmp_path):
    run = tmp_path / "run"
    ckp = tiny_checkpointer(run, tiny_path)
    good = ckp.save(1)
    with disk_full(), pytest.raises(CheckpointError, match=rf"step 2 could not be written .*File too large.*"
                                                          rf"last good checkpoint is {re.escape(good)}") as e:
        ckp.save(2)
    assert type(e.value).__name__ == "CheckpointWriteError"  # what the loop survives for a periodic save
    assert sorted(os.listdir(run / "checkpoints")) == ["1"]  # no half-written .tmp folder
    from fastebm.train.checkpoint import verify_checkpoint

    verify_checkpoint(good)


def test_a_failed_periodic_save_is_survived_and_the_next_one_written(env, tmp_path, caplog):
    out = tmp_path / "run"
    t = SFTTrainer(sft_cfg(env, out, "train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=0"))
    orig = t.save

    def save():
        if t.step == 1:
            with disk_full():
                return orig()
        return orig()

    t.save = save
    with caplog.at_level(logging.WARNING, logger="fastebm"):
        hist = t.train()
    assert [m["step"] for m in hist] == [1, 2, 3]
    assert [s for s, _ in list_checkpoints(str(out))] == [2, 3]
    assert "the checkpoint of step 1 could not be written" in caplog.text and "training goes on" in caplog.text


def test_stale_temporary_folders_are_removed_at_start(env, tmp_path, caplog):
    from fastebm.train.builders import setup_run

    out = tmp_path / "run"
    for junk in (".tmp-9-4242", "3.old-77"):
        os.makedirs(out / "checkpoints" / junk)
        (out / "checkpoints" / junk / "model.safetensors").write_bytes(b"\0" * 1000)
    with caplog.at_level(logging.WARNING, logger="fastebm"):
        setup_run(sft_cfg(env, out, "train.steps=1"), records="cot")
    assert os.listdir(out / "checkpoints") == []
    assert ".tmp-9-4242" in caplog.text and "3.old-77" in caplog.text


# ----------------------------------------------------------------------------------------------
# 9. A torn last line of metrics.jsonl
# ----------------------------------------------------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    from fastebm.train.metrics import MetricsWriter

    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="fastebm"):
        w = MetricsWriter(str(tmp_path), resume_step=2)
    assert "metrics.jsonl: line 3 is incomplete (the run stopped while writing it): dropped" in caplog.text
    w.write({"step": 3, "loss": 0.125})
    assert read_metrics(str(tmp_path)) == rows + [{"step": 3, "loss": 0.125}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1\n' + json.dumps(rows[1]) + "\n")
    from fastebm.data import DataError

    with pytest.raises(DataError, match=r"metrics.jsonl: line 1: not a JSON object"):
        MetricsWriter(str(tmp_path), resume_step=2)  # damage before the last line is not a torn write


@pytest.mark.slow
def test_torn_last_metrics_line_is_dropped_on_resume(env, tmp_path, caplog):
    out = tmp_path / "run"
    SFTTrainer(sft_cfg(env, out, "train.steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=0")).train()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.12')  # the run died mid-write of step 3's line
    with caplog.at_level(logging.WARNING, logger="fastebm"):
        t = SFTTrainer(sft_cfg(env, out, "train.steps=3", "train.resume=true"))
    assert "metrics.jsonl: line 3 is incomplete" in caplog.text
    t.train()
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2, 3]
    assert all(json.loads(ln) for ln in open(out / "metrics.jsonl"))  # every line whole again


# ----------------------------------------------------------------------------------------------
# 12. video_path stays inside the video root
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_video_paths_outside_the_root_are_skipped_never_opened(env, tmp_path):
    from fastebm.data.sample import write_sample_dataset
    from fastebm.data.video import decode_stats, reset_decode_stats

    src = write_sample_dataset(env["data"])
    d = tmp_path / "data"
    shutil.copytree(env["data"], d)
    recs = json.loads(open(src["cot"]).read())[:4]
    shutil.copy(d / recs[0]["video_path"], tmp_path / "outside.webm")  # a real clip, one level above the root
    recs[0]["video_path"] = "../outside.webm"
    recs[1]["video_path"] = "/etc/passwd"
    (d / "cot.json").write_text(json.dumps(recs))
    out = tmp_path / "run"
    reset_decode_stats()
    SFTTrainer(sft_cfg(env, out, "train.steps=2", f"data.cot={d / 'cot.json'}", f"data.video_root={d}",
                       "train.checkpoint_every=0")).train()
    skipped = [json.loads(ln) for ln in open(out / "skipped.jsonl")]
    outside = [s for s in skipped if "leads outside the video root" in s["reason"]]
    assert sorted(s["record"] for s in outside) == [0, 1]
    opened = set(decode_stats()["by_path"])
    assert str(tmp_path / "outside.webm") not in opened and "/etc/passwd" not in opened
    assert opened  # the other records' clips were decoded

    allowed = tmp_path / "allowed"
    reset_decode_stats()
    SFTTrainer(sft_cfg(env, allowed, "train.steps=2", f"data.cot={d / 'cot.json'}", f"data.video_root={d}",
                       "train.checkpoint_every=0", "data.allow_outside_root=true")).train()
    assert str(tmp_path / "outside.webm") in decode_stats()["by_path"]
