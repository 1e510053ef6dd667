"""Distributed tier: real torchrun processes on the gloo backend (CPU), the tiny recipe.

- 2 ranks give the 1-process per-step loss, KL, grad norm and rewards for the same global batch
  (rollouts are seeded per prompt, so both sample the same completions);
- a 2-rank (sharded, DCP) checkpoint resumes on 1 process and a 1-process checkpoint on 2 ranks,
  both continuing exactly as the uninterrupted runs;
- ``fastebm export`` of a sharded checkpoint loads with from_pretrained and holds the trained weights;
- a rank that dies ends the job on every rank (no hang) and the last checkpoint stays loadable.

Each run is a subprocess (``python -m fastebm.cli train ... [--nproc-per-node 2]``).
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from distributed.cli_runs import ROOT, STEPS, clean_env, run_cli  # noqa: E402
from distributed.cli_runs import assert_same_step as assert_same  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # real torchrun processes: the full suite only

TINY = os.path.join(ROOT, "recipes", "tiny.toml")
COMPARED = ["loss", "kl", "grad_norm", "reward/total", "reward/format", "reward/accuracy", "adv/std",
            "tokens/completion", "tokens/prefix", "completion/truncated_frac", "lr", "samples_skipped"]


def train(cache, out, *overrides, nproc=1, timeout=400):
    return run_cli("train", TINY, cache, out, "rollout.max_new_tokens=16", *overrides, nproc=nproc, timeout=timeout)


def assert_same_step(a, b):
    assert_same(a, b, COMPARED)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    cache = {"models": str(base / "models"), "data": str(base / "sample")}
    one = train(cache, base / "one")
    two = train(cache, base / "two", nproc=2)
    return {"base": base, "cache": cache, "one": one, "two": two}


def test_two_ranks_give_the_one_rank_losses(runs):
    one, two = runs["one"], runs["two"]
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert_same_step(a, b)
    assert any(abs(m["loss"]) > 1e-6 for m in two)  # not vacuous: the policy moved
    meta = json.load(open(runs["base"] / "two" / "checkpoints" / "2" / "meta.json"))
    assert meta["format"] == "dcp" and meta["world_size"] == 2
    assert not os.path.exists(runs["base"] / "two" / "metrics.jsonl.old")


def test_two_rank_checkpoint_resumes_on_one_rank(runs):
    base = runs["base"]
    out = base / "two_to_one"
    os.makedirs(out / "checkpoints")
    shutil.copytree(base / "two" / "checkpoints" / "2", out / "checkpoints" / "2")
    resumed = train(runs["cache"], out, "train.resume=true")
    assert [m["step"] for m in resumed] == [3]
    assert_same_step(resumed[0], runs["two"][2])
    assert json.load(open(out / "checkpoints" / "3" / "meta.json"))["format"] == "hf"


def test_one_rank_checkpoint_resumes_on_two_ranks(runs):
    base = runs["base"]
    out = base / "one_to_two"
    os.makedirs(out / "checkpoints")
    shutil.copytree(base / "one" / "checkpoints" / "2", out / "checkpoints" / "2")
    resumed = train(runs["cache"], out, "train.resume=true", nproc=2)
    assert [m["step"] for m in resumed] == [3]
    assert_same_step(resumed[0], runs["one"][2])


def test_export_loads_with_from_pretrained_and_holds_the_trained_weights(runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForImageTextToText

    ck = runs["base"] / "two" / "checkpoints" / str(STEPS)
    res = subprocess.run([sys.executable, "-m", "fastebm.cli", "export", str(ck), str(tmp_path / "hf")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "hf"))
    dcp_to_torch_save(str(ck), str(tmp_path / "raw.pt"))
    raw = torch.load(tmp_path / "raw.pt", weights_only=False)["model"]
    sd = model.state_dict()
    assert set(raw) == set(sd), set(raw) ^ set(sd)
    for k, v in raw.items():
        assert torch.equal(sd[k], v), k  # exactly the sharded checkpoint's weights
    # ... which are the 1-process run's weights after the same steps, to fp32 tolerance
    one = AutoModelForImageTextToText.from_pretrained(str(runs["base"] / "one" / "checkpoints" / str(STEPS)))
    init = AutoModelForImageTextToText.from_pretrained(
        os.path.join(runs["cache"]["models"], "tiny-qwen2vl-v1-seed0"))
    moved = 0
    for k, v in one.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=1e-4, atol=1e-5, msg=k)
        moved += not torch.equal(v, init.state_dict()[k])
    assert moved > 0


DIE = textwrap.dedent("""
    import os, sys
    from fastebm.rewards import register

    @register("die_on_rank1")
    def _die(cfg, ctx):
        calls = {"n": 0}
        def fn(completions, inputs):
            calls["n"] += 1
            if calls["n"] == 2 and os.environ.get("RANK") == "1":
                print("rank 1: simulated crash", file=sys.stderr, flush=True)
                os._exit(3)
            return [0.0 for _ in completions]
        return fn

    from fastebm.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_dead_rank_ends_the_job_and_the_last_checkpoint_loads(runs, tmp_path):
    script = tmp_path / "die.py"
    script.write_text(DIE)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           "train", TINY, f"run.output_dir={out}", f"model.tiny_cache_dir={runs['cache']['models']}",
           f"data.sample_dir={runs['cache']['data']}", "log.progress=false", "train.steps=4",
           "train.checkpoint_every=1", "rollout.max_new_tokens=8", "rewards.enabled=['format','die_on_rank1']",
           "rewards.weights={format=1.0,die_on_rank1=1.0}", "parallel.timeout_s=120"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=clean_env())
    err = res.stdout + res.stderr
    assert res.returncode != 0, err[-3000:]
    assert "rank 1: simulated crash" in err
    assert "rank      : 1" in err and "exitcode  : 3" in err  # torchrun's summary names the dead rank
    # rank 0 says why it stops: its collective failed (gloo sees the dead peer's closed socket), or the
    # launcher's SIGTERM reached it first
    assert ("fastebm: error: rank 0: a collective with the other ranks failed" in err
            or "fastebm: rank 0: stopped by the launcher" in err), err[-3000:]
    assert "Newest complete checkpoint" in err or "stopped by the launcher" in err
    steps = sorted(int(n) for n in os.listdir(out / "checkpoints") if n.isdigit())
    assert steps == [1]
    res = subprocess.run([sys.executable, "-m", "fastebm.cli", "export", str(out / "checkpoints" / "1"),
                          str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True, timeout=300, env=clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(str(tmp_path / "hf"))


def test_degrees_are_checked_against_the_world_size(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fastebm.cli", "train", TINY, "--nproc-per-node", "2",
                          "train.prompts_per_step=3"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=clean_env())
    assert res.returncode == 2 and "not divisible by the world size 2" in res.stderr, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "fastebm.cli", "train", TINY, "--nproc-per-node", "2",
                          "parallel.dp_shard=4"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=clean_env())
    assert res.returncode == 2 and "the world size is 2" in res.stderr, res.stderr[-2000:]


LOAD = textwrap.dedent("""
    import json, sys
    import torch
    import transformers
    from fastebm.config import ParallelConfig
    from fastebm.train.parallel import destroy_distributed, init_distributed, load_parallel_model

    path = sys.argv[1]
    reads = []
    plain = transformers.AutoModelForImageTextToText.from_pretrained  # bound to the class

    def counting(cls, *a, **k):
        reads.append(a[0] if a else k.get("pretrained_model_name_or_path"))
        return plain(*a, **k)

    transformers.AutoModelForImageTextToText.from_pretrained = classmethod(counting)
    pcfg = ParallelConfig()
    d = init_distributed(pcfg, torch.device("cpu"))
    lm = load_parallel_model(path, torch.device("cpu"), "float32", "auto", pcfg, d, trainable=True)
    n_reads = len(reads)
    ref = plain(path, dtype=torch.float32)  # the check only: every rank reads here
    ref_params, ref_bufs = dict(ref.named_parameters()), dict(ref.named_buffers())
    worst = max((p.full_tensor() - ref_params[n]).abs().max().item() for n, p in lm.model.named_parameters())
    bufs = sorted(n for n, b in lm.model.named_buffers() if not torch.equal(b, ref_bufs[n]))
    result = dict(rank=d.rank, reads=n_reads, worst=worst, bufs_differ=bufs, n_bufs=len(ref_bufs),
                  local=sum(p.to_local().numel() for p in lm.model.parameters()),
                  total=sum(p.numel() for p in ref.parameters()),
                  eos=lm.model.generation_config.eos_token_id, training=lm.model.training)
    with open(f"{sys.argv[2]}/rank{d.rank}.json", "w") as f:  # one file per rank: stdout lines interleave
        json.dump(result, f)
    destroy_distributed(d)  # as the CLI does: a live gloo group can abort the process at exit
""")


def test_only_rank0_reads_the_weights_the_others_get_their_shards(runs, tmp_path):
    """Meta-device loading under FSDP: rank 1 never reads the checkpoint; every rank ends up with
    exactly the checkpoint's parameters (as shards), its buffers (the rotary inv_freq is in no state
    dict) and its generation config."""
    src = os.path.join(runs["cache"]["models"], "tiny-qwen2vl-v1-seed0")
    model_dir = tmp_path / "model"
    shutil.copytree(src, model_dir)
    gen_path = model_dir / "generation_config.json"
    gen = json.load(open(gen_path)) if gen_path.exists() else {}
    gen["eos_token_id"] = [int(ids) for ids in ([gen["eos_token_id"]] if isinstance(gen.get("eos_token_id"), int)
                                                 else gen.get("eos_token_id", [0]))] + [7]
    json.dump(gen, open(gen_path, "w"))
    script = tmp_path / "load.py"
    script.write_text(LOAD)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script), str(model_dir), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=clean_env())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-5000:]
    out = {r["rank"]: r for r in (json.load(open(tmp_path / f"rank{i}.json")) for i in range(2))}
    assert sorted(out) == [0, 1]
    assert out[0]["reads"] == 1 and out[1]["reads"] == 0
    for r in out.values():
        assert r["worst"] == 0.0 and r["bufs_differ"] == [] and r["n_bufs"] > 0
        assert r["eos"] == gen["eos_token_id"] and r["training"]
        assert r["local"] < 0.75 * r["total"]  # each rank holds about half the parameters
