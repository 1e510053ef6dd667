"""Nothing read from a checkpoint runs code (issue 16, findings 1 and 2).

A planted pickle in trainer_state.pt (the old format), in a DCP ``.metadata`` or in a DCP non-tensor
item would run ``os.system``: each test plants one that creates a marker file and checks that the
marker never appears and the error names the file. The trainer state round-trips exactly through
JSON + safetensors, and ``fastebm convert-checkpoint --trusted`` turns a trusted old checkpoint into
one that resumes. Checkpoints come from the real ``Checkpointer`` on the tiny model, in-process.
"""
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import tiny_checkpointer as checkpointer

from fastebm.config import TrainConfig
from fastebm.model.loading import load_model
from fastebm.tiny import ensure_tiny_model
from fastebm.train.builders import build_optimizer
from fastebm.train.checkpoint import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return ensure_tiny_model("qwen2vl", str(tmp_path_factory.mktemp("models")))


class Planted:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_legacy(ck, payload, fingerprint=None) -> None:
    """Rewrite checkpoint ``ck`` as fastebm <= 0.1 wrote it: a pickled trainer_state.pt, meta.json without
    version or checksums (with ``fingerprint`` when given: the run that will resume it)."""
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        if os.path.exists(os.path.join(ck, name)):
            os.remove(os.path.join(ck, name))
    torch.save(payload, os.path.join(ck, "trainer_state.pt"))
    meta = json.load(open(os.path.join(ck, "meta.json")))
    json.dump({"step": meta["step"], "fingerprint": fingerprint or meta["fingerprint"], "format": "hf"},
              open(os.path.join(ck, "meta.json"), "w"))


def attempt(fn):
    """``fn()``'s exception (None if it returned): the planted marker is checked before the error."""
    try:
        fn()
    except (Exception, BaseException) as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, KeyboardInterrupt):
            raise
        return e
    return None


def test_planted_trainer_state_never_runs_on_resume(tiny_path, tmp_path):
    from fastebm.train.checkpoint import resolve_resume

    ck = checkpointer(tmp_path / "run", tiny_path).save(1)
    marker = tmp_path / "PLANTED_RAN"
    make_legacy(ck, {"scheduler": Planted(marker)})
    ckp = checkpointer(tmp_path / "run", tiny_path)
    err = attempt(lambda: ckp.restore(resolve_resume("true", str(tmp_path / "run"))))
    assert not marker.exists(), "the planted command ran"
    assert isinstance(err, CheckpointError), repr(err)
    assert re.search(r"trainer_state.pt.*pickles.*fastebm convert-checkpoint .* --trusted", str(err)), err
    err = attempt(lambda: ckp.restore(ck))  # an explicit path is refused the same way
    assert isinstance(err, CheckpointError) and "convert-checkpoint" in str(err)
    assert not marker.exists(), "the planted command ran"


@pytest.mark.slow
def test_cli_resume_of_a_planted_checkpoint_stops_and_runs_nothing(tiny_path, tmp_path):
    """The issue's scenario end to end: `fastebm train ... train.resume=true` on a folder whose checkpoint
    holds a planted trainer_state.pt exits 1 naming the file; the command never runs."""
    from fastebm.data.records import load_records
    from fastebm.data.sample import write_sample_dataset
    from fastebm.train.checkpoint import fingerprint

    out = tmp_path / "run"
    ckp = checkpointer(out, tiny_path)
    ck = ckp.save(1)
    marker = tmp_path / "PLANTED_RAN"
    records = load_records(write_sample_dataset(str(tmp_path / "sample"))["train"])
    # the fingerprint of the run that resumes it (copied, as anyone can): it is no defence
    make_legacy(ck, {"scheduler": Planted(marker)}, fingerprint(ckp.policy.model.config.to_dict(), len(records)))
    res = subprocess.run([sys.executable, "-m", "fastebm.cli", "train", os.path.join(ROOT, "recipes", "tiny.toml"),
                          f"run.output_dir={out}", f"model.tiny_cache_dir={os.path.dirname(tiny_path)}",
                          f"data.sample_dir={tmp_path / 'sample'}", "train.steps=2", "train.resume=true",
                          "log.progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert not marker.exists(), "the planted command ran"
    assert res.returncode == 1, res.stderr[-3000:]
    assert "trainer_state.pt" in res.stderr and "convert-checkpoint" in res.stderr, res.stderr[-3000:]


def _dcp_dir(tmp_path, tiny_path, state) -> str:
    """A sharded-format checkpoint folder: DCP files of ``state`` (saved on one process), the tiny
    model's config.json and a fastebm meta.json."""
    import torch.distributed.checkpoint as dcp

    d = tmp_path / "dcp"
    dcp.save(state, checkpoint_id=str(d), no_dist=True)
    shutil.copy(os.path.join(tiny_path, "config.json"), d / "config.json")
    json.dump({"step": 1, "format": "dcp", "dtype": "float32", "world_size": 2, "fingerprint": {}},
              open(d / "meta.json", "w"))
    return str(d)


def test_planted_dcp_metadata_never_runs_on_export_or_resume(tiny_path, tmp_path):
    from fastebm.train.checkpoint import load_sharded_weights
    from fastebm.train.export import export_checkpoint

    lm = load_model(tiny_path, torch.device("cpu"), "float32")
    ck = _dcp_dir(tmp_path, tiny_path, {"model": lm.model.state_dict()})
    marker = tmp_path / "PLANTED_RAN"
    with open(os.path.join(ck, ".metadata"), "wb") as f:
        pickle.dump(Planted(marker), f)
    err = attempt(lambda: export_checkpoint(ck, str(tmp_path / "hf")))
    assert not marker.exists(), "the planted command ran"
    assert isinstance(err, CheckpointError), repr(err)
    assert re.search(r"\.metadata: refusing to load it: it refers to posix\.system", str(err)), err
    err = attempt(lambda: load_sharded_weights(ck, lm.model))
    assert not marker.exists(), "the planted command ran"
    assert isinstance(err, CheckpointError) and ".metadata: refusing" in str(err), repr(err)


def test_planted_dcp_item_never_runs(tiny_path, tmp_path):
    """A non-tensor DCP item (how the optimizer's hyper-parameters are stored) holding a planted pickle,
    loaded the way a sharded resume loads it (``load_sharded_weights`` with the optimizer)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from fastebm.train.checkpoint import load_sharded_weights

    lm = load_model(tiny_path, torch.device("cpu"), "float32")
    opt = build_optimizer(lm.model, TrainConfig())
    msd, osd = get_state_dict(lm.model, opt)
    marker = tmp_path / "PLANTED_RAN"
    osd["param_groups"][0]["lr"] = Planted(marker)
    ck = _dcp_dir(tmp_path, tiny_path, {"model": msd, "optimizer": osd})
    assert not marker.exists()  # saving pickles it without running it
    err = attempt(lambda: load_sharded_weights(ck, lm.model, opt))
    assert not marker.exists(), "the planted command ran"
    assert isinstance(err, CheckpointError) and "param_groups.0.lr': refusing to load it" in str(err), repr(err)
    load_sharded_weights(ck, lm.model)  # the weights of the same checkpoint (tensors only) still load


def test_dcp_metadata_reader_accepts_real_metadata(tiny_path, tmp_path):
    """The allow-list covers what DCP writes (model and optimizer state, a non-tensor item)."""
    from fastebm.train.safe_io import read_dcp_metadata

    lm = load_model(tiny_path, torch.device("cpu"), "float32")
    opt = build_optimizer(lm.model, TrainConfig())
    ck = _dcp_dir(tmp_path, tiny_path, {"model": lm.model.state_dict(), "optimizer": opt.state_dict()})
    md = read_dcp_metadata(os.path.join(ck, ".metadata"))
    keys = set(md.state_dict_metadata)
    assert {f"model.{k}" for k in lm.model.state_dict()} <= keys
    assert "optimizer.param_groups.0.lr" in keys


def test_trainer_state_round_trips_exactly_without_pickle(tiny_path, tmp_path):
    ckp = checkpointer(tmp_path / "run", tiny_path)
    ckp.sampler.next(), ckp.sampler.next()
    ckp.skips.count, ckp.profiles.missing = 3, {"src/Ann": 2}
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    ck = ckp.save(4)
    assert not os.path.exists(os.path.join(ck, "trainer_state.pt"))
    assert os.path.isfile(os.path.join(ck, "trainer_state.json"))
    expect = (random.random(), np.random.rand(), torch.rand(1))
    opt_before = ckp.optimizer.state_dict()

    other = checkpointer(tmp_path / "run", tiny_path, lr=0.5)  # different lr: restored from the checkpoint
    assert other.restore(ck) == 4
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(1), expect[2])
    assert other.sampler.state() == ckp.sampler.state()
    assert other.skips.count == 3 and other.profiles.missing == {"src/Ann": 2}
    after = other.optimizer.state_dict()
    assert after["param_groups"] == opt_before["param_groups"]
    assert isinstance(after["param_groups"][0]["betas"], tuple)
    for i, s in opt_before["state"].items():
        for k, v in s.items():
            assert torch.equal(after["state"][i][k], v), (i, k)
    assert other.scheduler.state_dict() == ckp.scheduler.state_dict()


def test_convert_checkpoint_needs_trusted_and_then_resumes(tiny_path, tmp_path, capsys):
    from fastebm.cli import main
    from fastebm.train.checkpoint import verify_checkpoint
    from fastebm.train.safe_io import load_tree

    ckp = checkpointer(tmp_path / "run", tiny_path)
    ck = ckp.save(2)
    state = load_tree(os.path.join(ck, "trainer_state"))
    make_legacy(ck, state)  # an honest old checkpoint
    assert main(["convert-checkpoint", ck]) == 1
    assert "only for a checkpoint you trust (your own run); then add --trusted" in capsys.readouterr().err
    assert os.path.exists(os.path.join(ck, "trainer_state.pt"))  # untouched without --trusted
    assert main(["convert-checkpoint", ck, "--trusted"]) == 0
    assert "trainer_state.pt rewritten as JSON + safetensors" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(ck, "trainer_state.pt"))
    verify_checkpoint(ck)
    assert checkpointer(tmp_path / "run", tiny_path).restore(ck) == 2
    assert main(["convert-checkpoint", ck, "--trusted"]) == 1
    assert "already in the current checkpoint format" in capsys.readouterr().err


def test_tree_rejects_what_it_does_not_know(tmp_path):
    from fastebm.train.safe_io import load_tree, save_tree

    save_tree(str(tmp_path / "s"), {"a": (1, 2.5, None), 3: "int key", "$x": torch.arange(3)})
    assert load_tree(str(tmp_path / "s"))["a"] == (1, 2.5, None)
    (tmp_path / "s.json").write_text(json.dumps({"a": {"$tensor": "nope"}}))
    with pytest.raises(ValueError, match=r"s\.json: refers to tensor 'nope'"):
        load_tree(str(tmp_path / "s"))
    (tmp_path / "s.json").write_text(json.dumps({"a": {"$code": "os.system"}}))
    with pytest.raises(ValueError, match="unknown entry"):
        load_tree(str(tmp_path / "s"))
    with pytest.raises(TypeError, match="cannot store a Planted"):
        save_tree(str(tmp_path / "t"), {"x": Planted(tmp_path / "m")})
