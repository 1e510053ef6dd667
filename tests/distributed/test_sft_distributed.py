"""Distributed SFT: real torchrun processes on the gloo backend (CPU), the tiny SFT recipe.

- 2 ranks give the 1-process per-step loss, grad norm, lr and token counts: each rank takes half of
  a step's records and divides its NLL by the GLOBAL number of target tokens, FSDP sums the gradients;
- a 2-rank (sharded, DCP) checkpoint of step 2 resumes on 1 process and on 2 ranks, and step 3 is
  the uninterrupted run's;
- ``final`` of a 2-rank run is a Hugging Face directory holding the last sharded checkpoint's weights.

Each run is a subprocess (``python -m fastebm.cli sft ... [--nproc-per-node 2]``).
"""
import json
import os
import shutil

import pytest
import torch

from distributed.cli_runs import ROOT, STEPS, run_cli  # noqa: E402
from distributed.cli_runs import assert_same_step as assert_same  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # real torchrun processes: the full suite only

SFT = os.path.join(ROOT, "recipes", "tiny_sft.toml")
COMPARED = ["loss", "grad_norm", "lr", "tokens/target", "tokens/prefix", "samples_skipped", "profiles_missing"]


def sft(cache, out, *overrides, nproc=1, timeout=400):
    # 4 prompts per step: 2 per rank; micro-batches of 1, so a rank accumulates over two backward passes.
    return run_cli("sft", SFT, cache, out, "train.prompts_per_step=4", "train.micro_batch_size=1", *overrides,
                   nproc=nproc, timeout=timeout)


def assert_same_step(a, b):
    assert_same(a, b, COMPARED)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sft_dist")
    cache = {"models": str(base / "models"), "data": str(base / "sample")}
    one = sft(cache, base / "one")
    two = sft(cache, base / "two", nproc=2)
    return {"base": base, "cache": cache, "one": one, "two": two}


def test_two_ranks_give_the_one_rank_steps(runs):
    one, two = runs["one"], runs["two"]
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert_same_step(a, b)
    assert two[-1]["loss"] < two[0]["loss"]  # not vacuous: the model learns
    assert len({m["tokens/target"] for m in two}) > 1  # each step a different batch
    meta = json.load(open(runs["base"] / "two" / "checkpoints" / "2" / "meta.json"))
    assert meta["format"] == "dcp" and meta["world_size"] == 2
    assert json.load(open(runs["base"] / "one" / "checkpoints" / "2" / "meta.json"))["format"] == "hf"


@pytest.mark.parametrize("nproc", [1, 2], ids=["on-1-process", "on-2-ranks"])
def test_sharded_checkpoint_resumes_exactly(runs, nproc):
    base = runs["base"]
    out = base / f"two_resumed_on_{nproc}"
    os.makedirs(out / "checkpoints")
    shutil.copytree(base / "two" / "checkpoints" / "2", out / "checkpoints" / "2")
    resumed = sft(runs["cache"], out, "train.resume=true", nproc=nproc)
    assert [m["step"] for m in resumed] == [STEPS]
    assert_same_step(resumed[0], runs["two"][STEPS - 1])
    if nproc == 2:  # the same world size: the same arithmetic, bit for bit
        for k in COMPARED:
            assert resumed[0][k] == runs["two"][STEPS - 1][k], k


def test_final_of_a_sharded_run_is_a_hugging_face_model_of_the_last_checkpoint(runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForImageTextToText

    base = runs["base"]
    final = base / "two" / "final"
    assert final.is_dir() and not final.is_symlink() and (final / "model.safetensors").is_file()
    model = AutoModelForImageTextToText.from_pretrained(str(final))
    dcp_to_torch_save(str(base / "two" / "checkpoints" / str(STEPS)), str(tmp_path / "raw.pt"))
    raw = torch.load(tmp_path / "raw.pt", weights_only=False)["model"]
    sd = model.state_dict()
    assert set(raw) == set(sd), set(raw) ^ set(sd)
    for k, v in raw.items():
        assert torch.equal(sd[k], v), k
    # ... the 1-process run's final weights (a link to its last hf checkpoint), to fp32 tolerance
    assert os.path.realpath(base / "one" / "final") == os.path.realpath(base / "one" / "checkpoints" / str(STEPS))
    one = AutoModelForImageTextToText.from_pretrained(str(base / "one" / "final")).state_dict()
    for k, v in one.items():
        torch.testing.assert_close(sd[k], v, rtol=1e-4, atol=1e-5, msg=k)
