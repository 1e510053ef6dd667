"""[grpo] backward, backward_chunk_mb and deterministic: defaults, the refusal of float atomics when
deterministic, and the path from the config through fastebm.grpo.loss to the fused kernel."""
import os

import pytest
import torch

from fastebm.config import Config, ConfigError, load_config
from fastebm.grpo.loss import backward_options, compute_grpo_loss, loss_options
from fastebm.kernels import BackwardOptions
from fastebm.kernels import fused_linear_logprobs as ll

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "recipes", "tiny.toml")


def test_defaults_are_the_deterministic_gemm_backward():
    g = Config().grpo
    assert (g.backward, g.deterministic, g.backward_chunk_mb) == ("gemm", False, 512.0)
    assert backward_options(g) == BackwardOptions()
    cfg = load_config(TINY, ["grpo.deterministic=true"])
    assert backward_options(cfg.grpo) == BackwardOptions(deterministic=True)


@pytest.mark.parametrize("strategy", ["atomic", "sparse"])
def test_deterministic_refuses_float_atomics_naming_file_and_fields(strategy):
    overrides = [f"grpo.backward={strategy}", "grpo.deterministic=true"]
    with pytest.raises(ConfigError, match=rf"command line: grpo.backward: '{strategy}' adds into the gradients with "
                                          r"float atomics.*grpo.deterministic = true needs grpo.backward = \"gemm\""):
        load_config(TINY, overrides)
    cfg = load_config(TINY, [f"grpo.backward={strategy}"])     # allowed when not deterministic
    assert backward_options(cfg.grpo).strategy == strategy
    with pytest.raises(ConfigError, match="grpo.backward.*one of"):
        load_config(TINY, ["grpo.backward=fast"])
    with pytest.raises(ConfigError, match=r"command line: grpo.backward_chunk_mb = 0(\.0)?: must be > 0"):
        load_config(TINY, ["grpo.backward_chunk_mb=0"])


def test_compute_grpo_loss_passes_the_strategy_to_the_kernel(monkeypatch):
    seen = []
    real = ll.linear_logprob_bwd_torch
    monkeypatch.setattr(ll, "linear_logprob_bwd_torch", lambda *a, **k: seen.append(k["backward"]) or real(*a, **k))
    cfg = load_config(TINY, ["grpo.backward=sparse", "grpo.backward_chunk_mb=64"])
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g) * 0.25
    ids = torch.randint(0, 50, (2, 5), generator=g)
    out = compute_grpo_loss(h, w, ids, torch.ones(2, 5), torch.randn(2, generator=g), None, None,
                            loss_options(cfg.grpo.__class__(beta=0.0), 1.0, 5), kernel="fused",
                            backward=backward_options(cfg.grpo))
    out.loss.backward()
    assert seen == [BackwardOptions(strategy="sparse", chunk_mb=64.0)]
    assert h.grad is not None and torch.isfinite(h.grad).all()
