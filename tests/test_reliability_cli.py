"""The process side of issue 16 (findings 3, 4 and 8), through the real CLI: exit codes and messages.

- SIGTERM to ``fastebm train`` and SIGUSR1 to ``fastebm sft``: the step finishes, a checkpoint of it
  is saved, exit 75; Ctrl-C in ``fastebm sft`` saves and exits 130 without a traceback;
- two runs on one folder: the second exits 3 at once naming the first (pid, host); the first is
  untouched (its metrics in order) and still stops cleanly;
- a full disk: the periodic save is a warning, the final one exits 1 naming the last good
  checkpoint, no traceback and no half-written folder.

Single process; the same on two ranks: tests/distributed/test_preemption_distributed.py.
"""
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from fastebm.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # each test runs the CLI end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "recipes", "tiny.toml")
SFT = os.path.join(ROOT, "recipes", "tiny_sft.toml")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from fastebm.data.sample import write_sample_dataset
    from fastebm.tiny import ensure_tiny_model

    base = tmp_path_factory.mktemp("reliability_cli")
    env = {"models": str(base / "models"), "data": str(base / "sample")}
    ensure_tiny_model("qwen2vl", env["models"])  # built once here, not inside a run under test
    write_sample_dataset(env["data"])
    return env


def command(env, kind, out, *overrides):
    recipe = TINY if kind == "train" else SFT
    cheap = (["rollout.group_size=2", "rollout.max_new_tokens=8", "rewards.enabled=['format']",
              "rewards.weights={format=1.0}"] if kind == "train" else ["train.prompts_per_step=2"])
    return [sys.executable, "-m", "fastebm.cli", kind, recipe, f"run.output_dir={out}",
            f"model.tiny_cache_dir={env['models']}", f"data.sample_dir={env['data']}", "log.progress=false",
            *cheap, *overrides]


def wait_for_steps(out, n, proc, timeout=240):
    """Block until ``out/metrics.jsonl`` holds ``n`` steps (the run is training)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if len(read_metrics(str(out))) >= n:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps in {out} after {timeout} s")


@pytest.mark.parametrize("kind,sig,code", [("train", signal.SIGTERM, 75), ("sft", signal.SIGUSR1, 75),
                                           ("sft", signal.SIGINT, 130)],
                         ids=["train-SIGTERM", "sft-SIGUSR1", "sft-Ctrl-C"])
def test_a_stop_signal_saves_the_step_and_exits_with_its_code(env, tmp_path, kind, sig, code):
    out = tmp_path / "run"
    p = subprocess.Popen(command(env, kind, out, "train.steps=500", "train.checkpoint_every=0"), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 1, p)
    p.send_signal(sig)
    log, err = p.communicate(timeout=240)
    err = log + err  # the log goes to stdout, errors to stderr
    assert p.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    steps = [r["step"] for r in read_metrics(str(out))]
    assert 1 <= steps[-1] < 500 and steps == list(range(1, steps[-1] + 1))
    assert sorted(os.listdir(out / "checkpoints")) == [str(steps[-1])]  # the last step finished and was saved
    if code == 75:
        assert f"preempted ({sig.name})" in err and "train.resume=true" in err, err[-3000:]


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(env, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(command(env, "sft", out, "train.steps=500", "train.checkpoint_every=0"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(out, 1, first)
        t0 = time.time()
        second = subprocess.run(command(env, "sft", out, "train.steps=1", "run.seed=7"), cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 3, second.stderr[-3000:]
        assert f"in use by another fastebm run: pid {first.pid} on host" in second.stderr, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert time.time() - t0 < 60  # refused at start-up, no model loaded
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGTERM)
        log, err = first.communicate(timeout=240)
    assert first.returncode == 75, (log + err)[-3000:]
    steps = [r["step"] for r in read_metrics(str(out))]
    assert steps == list(range(1, steps[-1] + 1))  # one run's steps, in order
    assert not os.path.exists(out / "metrics.jsonl.old")  # the second run moved nothing


def _full_disk():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_full_disk_keeps_the_run_until_the_final_save_which_names_the_last_good_checkpoint(env, tmp_path):
    """Every file over 256 KiB fails to write (the model's safetensors is ~0.9 MB): the periodic save of
    step 1 is a warning and training goes on; the final save exits 1 naming '(none yet)'."""
    out = tmp_path / "run"
    res = subprocess.run(command(env, "sft", out, "train.steps=2", "train.checkpoint_every=1"), cwd=ROOT,
                         capture_output=True, text=True, timeout=300, preexec_fn=_full_disk)
    assert res.returncode == 1, res.stderr[-3000:]
    log = open(out / "train.log").read()  # the run's log, unwrapped
    assert "the checkpoint of step 1 could not be written" in log and "training goes on" in log, log[-3000:]
    assert "the checkpoint of step 2 could not be written" in res.stderr and "File too large" in res.stderr
    assert "The last good checkpoint is (none yet)" in res.stderr and "Traceback" not in res.stderr
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2]
    assert os.listdir(out / "checkpoints") == []  # no half-written .tmp folder
