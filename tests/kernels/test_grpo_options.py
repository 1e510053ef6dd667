"""GRPOLossOptions: one object carries the loss settings. It checks itself (errors name the field),
keywords given to the public functions override its fields, every entry point gives the same
result for the same settings, and the trainer's ``[grpo]`` section maps onto it."""
from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from fastebm.config import GRPOConfig
from fastebm.grpo.loss import compute_grpo_loss, loss_options
from fastebm.kernels import (FusedLinearGRPOLoss, GRPOLossOptions, fused_linear_grpo_loss, fused_linear_grpo_loss_ref,
                             grpo_loss, grpo_loss_ref)
from fastebm.kernels.grpo_semantics import IS_LEVELS, LOSS_TYPES

from kernel_helpers import make_batch

BAD = [
    ("beta", -0.1), ("beta", float("nan")), ("beta", "0.04"), ("epsilon_low", -0.2), ("epsilon_high", float("inf")),
    ("temperature", 0.0), ("temperature", True), ("loss_type", "ppo"), ("importance_sampling_level", "seq"),
    ("delta", 0.0), ("delta", -1.0), ("max_completion_length", 0), ("max_completion_length", 8.0),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_option_names_its_field(field, value):
    with pytest.raises(ValueError, match=rf"GRPOLossOptions\.{field} must be"):
        GRPOLossOptions(**{field: value})


def test_dr_grpo_needs_max_completion_length():
    with pytest.raises(ValueError, match=r"GRPOLossOptions\.max_completion_length must be set .*dr_grpo"):
        GRPOLossOptions(loss_type="dr_grpo")
    assert GRPOLossOptions(loss_type="dr_grpo", max_completion_length=16).max_completion_length == 16
    # built once in the module's constructor: the error comes before any forward
    with pytest.raises(ValueError, match="max_completion_length"):
        FusedLinearGRPOLoss(loss_type="dr_grpo")


def test_options_are_frozen_and_replace_checks_again():
    o = GRPOLossOptions(beta=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.beta = 0.2
    assert dataclasses.replace(o, beta=0.0).beta == 0.0 and o.beta == 0.1
    with pytest.raises(ValueError, match="GRPOLossOptions.epsilon_high"):
        dataclasses.replace(o, epsilon_high=-1.0)
    with pytest.raises(TypeError):
        GRPOLossOptions(0.04)  # keyword-only: adding fields can never shift a positional meaning


def _fused(fn, b, *args, **kw):
    h = b["hidden"].clone().requires_grad_()
    w = b["weight"].clone().requires_grad_()
    loss, m = fn(h, w, b["ids"], b["mask"], b["adv"], b["old"], b["ref"], *args, **kw)
    loss.backward()
    return [loss.detach(), h.grad, w.grad, m["per_token_logps"], m["kl"], m["clip_ratio"]]


def _logits(fn, b, *args, **kw):
    x = (b["hidden"] @ b["weight"].t()).requires_grad_()
    loss, m = fn(x, b["ids"], b["mask"], b["adv"], b["old"], b["ref"], *args, **kw)
    loss.backward()
    return [loss.detach(), x.grad, m["per_token_logps"], m["kl"], m["clip_ratio"]]


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("fn,run,extra", [(fused_linear_grpo_loss, _fused, dict(backend="torch")),
                                          (fused_linear_grpo_loss_ref, _fused, {}),
                                          (grpo_loss, _logits, dict(backend="torch")),
                                          (grpo_loss_ref, _logits, {})],
                         ids=["fused", "fused_ref", "logits", "logits_ref"])
def test_options_and_keywords_are_one_setting(fn, run, extra):
    b = make_batch(2, 5, 16, 97, seed=4)
    kw = dict(beta=0.05, epsilon_low=0.1, epsilon_high=0.3, temperature=0.7, loss_type="bnpo",
              importance_sampling_level="sequence", delta=1.4)
    opts = GRPOLossOptions(**kw)
    by_options = run(fn, b, opts, **extra)
    assert _equal(by_options, run(fn, b, options=opts, **extra))
    assert _equal(by_options, run(fn, b, **kw, **extra))                      # keywords only (as before)
    # keywords override fields of options; the override takes effect
    over = run(fn, b, dataclasses.replace(opts, temperature=1.0), temperature=0.7, **extra)
    assert _equal(by_options, over)
    assert not torch.equal(run(fn, b, opts, temperature=1.0, **extra)[0], by_options[0])
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['epsilon'\]"):
        run(fn, b, opts, epsilon=0.2, **extra)
    with pytest.raises(TypeError, match="options must be a GRPOLossOptions"):
        run(fn, b, kw, **extra)
    with pytest.raises(ValueError, match="GRPOLossOptions.loss_type"):
        run(fn, b, opts, loss_type="ppo", **extra)


def test_loss_options_from_the_grpo_section():
    cfg = GRPOConfig(beta=0.1, epsilon_low=0.15, epsilon_high=0.25, delta=1.8, loss_type="dr_grpo",
                     importance_sampling_level="sequence", mu=2, kernel="eager")
    assert loss_options(cfg, 0.7, 64) == GRPOLossOptions(
        beta=0.1, epsilon_low=0.15, epsilon_high=0.25, temperature=0.7, loss_type="dr_grpo",
        importance_sampling_level="sequence", delta=1.8, max_completion_length=64)
    with pytest.raises(ValueError, match="GRPOLossOptions.epsilon_low"):
        loss_options(GRPOConfig(epsilon_low=-0.1), 1.0, 64)


def test_config_choices_are_kernel_choices():
    # Every loss type / IS level the [grpo] section offers must be one the kernels implement.
    hints = typing.get_type_hints(GRPOConfig)
    assert set(typing.get_args(hints["loss_type"])) <= set(LOSS_TYPES)
    assert set(typing.get_args(hints["importance_sampling_level"])) <= set(IS_LEVELS)
    # ... and since issue 15 the section offers all of them (TRL 1.16's eight loss types)
    assert set(typing.get_args(hints["loss_type"])) == set(LOSS_TYPES)


def test_every_loss_option_is_in_the_grpo_section_and_mapped():
    # Each GRPOLossOptions field but the two the trainer derives (temperature from the rollout,
    # max_completion_length from rollout.max_new_tokens) is a [grpo] field of the same name, and
    # loss_options carries a non-default value of it through.
    derived = {"temperature", "max_completion_length"}
    names = [f.name for f in dataclasses.fields(GRPOLossOptions) if f.name not in derived]
    grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(names) <= grpo_fields, sorted(set(names) - grpo_fields)
    odd = dict(beta=0.07, epsilon_low=0.11, epsilon_high=0.33, loss_type="vespo", importance_sampling_level="sequence",
               delta=1.7, use_bias_correction_kl=True, sapo_temperature_pos=0.6, sapo_temperature_neg=1.6,
               vespo_k_pos=1.1, vespo_lambda_pos=2.2, vespo_k_neg=3.3, vespo_lambda_neg=4.4, top_entropy_quantile=0.25,
               off_policy_mask_threshold=0.5, kl_clamp=7.5)
    assert set(odd) == set(names)
    opts = loss_options(GRPOConfig(**odd), 0.9, 32)
    for name, value in odd.items():
        assert getattr(opts, name) == value != getattr(GRPOLossOptions(), name), name
    assert (opts.temperature, opts.max_completion_length) == (0.9, 32)
    # the defaults stay EBM-RL's recipe setting (grpo, token level, no bias correction, every token)
    d = loss_options(GRPOConfig(), 1.0, 8)
    assert (d.loss_type, d.importance_sampling_level, d.use_bias_correction_kl, d.top_entropy_quantile,
            d.off_policy_mask_threshold) == ("grpo", "token", False, 1.0, None)


@pytest.mark.parametrize("key,value,msg", [("grpo.top_entropy_quantile", "1.5", "must be in"),
                                           ("grpo.sapo_temperature_neg", "0.0", "must be > 0"),
                                           ("grpo.loss_type", "ppo", "one of"),
                                           ("grpo.delta", "-1.0", "must be > 0")])
def test_bad_grpo_option_names_the_key(key, value, msg, tmp_path):
    from fastebm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"{key}.*{msg}"):
        load_config(None, [f"{key}={value}", "model.tiny=qwen2vl"])


def test_compute_grpo_loss_takes_options_only():
    b = make_batch(2, 4, 8, 50, seed=1)
    opts = GRPOLossOptions(beta=0.0)
    out = compute_grpo_loss(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], b["old"], None, opts,
                            kernel="eager")
    assert out.loss.ndim == 0 and out.kl.item() == 0.0
    with pytest.raises(TypeError, match="GRPOLossOptions"):
        compute_grpo_loss(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], b["old"], None, None)
    with pytest.raises(TypeError):
        compute_grpo_loss(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], b["old"], None, opts, beta=0.1)
    with pytest.raises(ValueError, match="grpo.kernel"):
        compute_grpo_loss(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], b["old"], None, opts,
                          kernel="reference")


def test_module_builds_its_options_once():
    mod = FusedLinearGRPOLoss(beta=0.0, epsilon_high=0.28, loss_type="bnpo", temperature=0.9, backend="torch")
    assert mod.options == GRPOLossOptions(beta=0.0, epsilon_high=0.28, loss_type="bnpo", temperature=0.9)
    # cispo is supported since issue 15; an unknown loss type is still refused, naming the keyword
    with pytest.raises(ValueError, match="FusedLinearGRPOLoss: loss_type must be one of"):
        FusedLinearGRPOLoss(loss_type="ppo")
    with pytest.raises(ValueError, match="GRPOLossOptions.delta"):
        FusedLinearGRPOLoss(delta=-1.0)
