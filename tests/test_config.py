"""Config: precedence, validation errors that name key, file and expectation; every recipe loads."""
import dataclasses
import re
import glob
import os

import pytest

from fastebm.config import Config, ConfigError, field_docs, load_config, parse_overrides, to_toml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.toml")))


def test_recipes_exist():
    names = {os.path.basename(p) for p in RECIPES}
    assert {"tiny.toml", "qwen2vl_7b.toml", "qwen25vl_7b.toml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_loads_and_opens_with_a_comment(path):
    cfg = load_config(path)
    with open(path) as f:
        head = f.read(2000)
    assert head.startswith("#")
    for word in ("Hardware:", "Launch:", "GRPO:"):
        assert word in head, f"{path} must say {word}"
    assert cfg.rollout.group_size >= 1


def test_flagship_matches_reference_run():
    cfg = load_config(os.path.join(ROOT, "recipes", "qwen2vl_7b.toml"))
    assert cfg.rollout.group_size == 8 and cfg.rollout.max_new_tokens == 1024
    assert cfg.train.lr == 5e-7 and cfg.train.lr_schedule == "cosine" and cfg.grpo.beta == 0.04
    assert cfg.rewards.weights == {"accuracy": 1.0, "format": 1.0, "clip": 0.8, "pcg": 0.8}
    assert (cfg.video.fps, cfg.video.min_frames, cfg.video.max_frames) == (2.0, 4, 16)
    assert cfg.video.max_pixels == 128 * 28 * 28


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[model]\ntiny = "qwen2vl"\n[train]\nsteps = 7\nlr = 0.5\n')
    cfg = load_config(str(p), ["train.steps=3", "run.output_dir=/tmp/x", "rollout.temperature=0"])
    assert cfg.train.steps == 3            # CLI beats TOML
    assert cfg.train.lr == 0.5             # TOML beats default
    assert cfg.train.warmup_steps == Config().train.warmup_steps  # default
    assert cfg.run.output_dir == "/tmp/x" and cfg.rollout.temperature == 0.0
    assert isinstance(cfg.rollout.temperature, float)


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[model]\ntiny = "qwen2vl"\n[train]\nstepz = 3\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "train.stepz" in str(e.value) and str(p) in str(e.value) and "steps" in str(e.value)


def test_unknown_section_and_wrong_type():
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_config(None, ["model.tiny=qwen2vl", "trian.steps=3"])
    with pytest.raises(ConfigError, match=r"command line: train.steps = 'three': expected an integer"):
        load_config(None, ["model.tiny=qwen2vl", "train.steps=three"])
    with pytest.raises(ConfigError, match="grpo.loss_type.*one of 'grpo', 'bnpo'"):
        load_config(None, ["model.tiny=qwen2vl", "grpo.loss_type=ppo"])
    with pytest.raises(ConfigError, match="rollout.group_size"):
        load_config(None, ["model.tiny=qwen2vl", "rollout.group_size=0"])
    with pytest.raises(ConfigError, match=r"grpo.kernel = 'reference' was renamed: use grpo.kernel = 'eager'"):
        load_config(None, ["model.tiny=qwen2vl", "grpo.kernel=reference"])


def test_unknown_reward_is_named():
    # Reward names are the registry's (plug-ins add to it), checked by the rewards layer before anything loads.
    from fastebm.rewards import check_rewards

    cfg = load_config(None, ["model.tiny=qwen2vl", "rewards.enabled=['clipp']", "rewards.weights={clipp=1.0}"])
    with pytest.raises(ConfigError, match="unknown reward 'clipp'"):
        check_rewards(cfg.rewards)
    with pytest.raises(ConfigError, match="rewards.plugins: plug-in file .*nope.py' not found"):
        cfg.rewards.plugins = ["/nope/nope.py"]
        check_rewards(cfg.rewards)


def test_required_names_exist():
    cfg = load_config(None, ["model.tiny=qwen2vl", "train.resume=true", "data.train=x.json",
                             "data.video_root=/v", "rollout.group_size=2"])
    assert (cfg.train.resume, cfg.data.train, cfg.data.video_root) == ("true", "x.json", "/v")


def test_overrides_parse_toml_values():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "a.d=hello", "a.e=true"]) == \
        {"a": {"b": 1, "c": [1, 2], "d": "hello", "e": True}}
    with pytest.raises(ConfigError):
        parse_overrides(["steps=3"])


def test_every_field_has_a_docstring():
    sections = [(sec.name, sec.default_factory().__class__) for sec in dataclasses.fields(Config)]
    seen = 0
    while sections:  # nested sub-sections ([rewards.clip] ...) too
        name, cls = sections.pop()
        seen += 1
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"[{name}] fields without a docstring: {missing}"
        sections += [(f"{name}.{f.name}", f.default_factory().__class__) for f in dataclasses.fields(cls)
                     if f.default_factory is not dataclasses.MISSING
                     and dataclasses.is_dataclass(f.default_factory())]
    assert seen > len(dataclasses.fields(Config))  # the nested sections were visited


def test_nested_sections_load_and_print(tmp_path):
    from fastebm.config import to_commented_toml

    p = tmp_path / "r.toml"
    p.write_text('[model]\ntiny = "qwen2vl"\n[rewards.clip]\nmode = "sentence_topk"\n')
    cfg = load_config(str(p), ["rewards.pcg.tau=0.5"])
    assert cfg.rewards.clip.mode == "sentence_topk" and cfg.rewards.pcg.tau == 0.5
    text = to_commented_toml(cfg)
    assert "[rewards.clip]" in text and "[rewards.pcg]" in text
    q = tmp_path / "printed.toml"
    q.write_text(text)
    assert load_config(str(q)) == cfg
    with pytest.raises(ConfigError, match="rewards.clip.mode"):
        load_config(str(p), ["rewards.clip.mode=mean"])
    with pytest.raises(ConfigError, match="rewards.clip.pretrained"):
        load_config(str(p), ["rewards.enabled=['clip']"])


def test_round_trip_through_written_toml(tmp_path):
    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.toml"), ["train.steps=5"])
    p = tmp_path / "config.toml"
    p.write_text(to_toml(cfg))
    assert load_config(str(p)) == cfg


def test_reproduction_settings_are_checked_and_the_renamed_key_named():
    base = ["model.tiny=qwen2vl"]
    with pytest.raises(ConfigError, match=r"'rewards.eps' was renamed: use rewards.std_eps = 1e-06"):
        load_config(None, base + ["rewards.eps=1e-6"])
    assert load_config(None, base + ["rewards.std_eps=1e-6"]).rewards.std_eps == 1e-6
    for override, key in (("data.max_prompt_tokens=-1", "data.max_prompt_tokens"), ("train.epochs=-1", "train.epochs"),
                          ("grpo.kl_clamp=0.0", "grpo.kl_clamp"), ("rewards.std_eps=-1e-6", "rewards.std_eps"),
                          ("video.second_per_grid=-1.0", "video.second_per_grid"), ("rollout.top_k=-5", "rollout.top_k"),
                          ("rewards.pcg.max_tokens=-3", "rewards.pcg.max_tokens"),
                          ("train.warmup_ratio=1.0", "train.warmup_ratio")):
        with pytest.raises(ConfigError, match=rf"command line: {re.escape(key)} = \S+: must be"):
            load_config(None, base + [override])
    cfg = load_config(None, base + ["grpo.kl_clamp=10", "train.epochs=1", "prompt.system_file=/x/s.txt"])
    assert cfg.grpo.kl_clamp == 10.0 and cfg.train.epochs == 1.0 and cfg.prompt.system_file == "/x/s.txt"


def test_epochs_and_warmup_ratio_set_the_schedule():
    import torch

    from fastebm.config import TrainConfig
    from fastebm.train.builders import build_scheduler, lr_lambda, total_steps

    assert total_steps(TrainConfig(steps=100), 37) == 100                          # epochs unset: train.steps
    assert total_steps(TrainConfig(steps=100, epochs=1.0, prompts_per_step=7), 37) == 6   # ceil(37 / 7)
    assert total_steps(TrainConfig(epochs=4.0, prompts_per_step=8), 37) == 19              # ceil(148 / 8)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, TrainConfig(lr=1.0, warmup_ratio=0.1, warmup_steps=99), 25)  # warmup ceil(2.5) = 3
    lrs = []
    for _ in range(25):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([lr_lambda(s, 25, 3, "cosine", 0.0) for s in range(25)])
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])


# ----------------------------------------------------------------------------------------------
# Issue 16, finding 10: the holes in validation
# ----------------------------------------------------------------------------------------------

BASE = ["model.tiny=qwen2vl"]


@pytest.mark.parametrize("override,message", [
    ("train.lr=nan", r"command line: train.lr = nan: must be a finite number"),
    ("train.lr=inf", r"command line: train.lr = inf: must be a finite number"),
    ("train.lr=-1", r"command line: train.lr = -1.0: must be in \(0, 1\]"),
    ("rollout.top_k=-5", r"command line: rollout.top_k = -5: must be >= 0"),
    ("train.checkpoint_every=-1", r"train.checkpoint_every = -1: must be >= 0"),
    ("train.keep_checkpoints=-2", r"train.keep_checkpoints = -2: must be >= 0"),
    ("train.warmup_steps=-3", r"train.warmup_steps = -3: must be >= 0"),
    ("video.fps=0", r"video.fps = 0.0: must be > 0"),
    ("train.adam_betas=[0.9, 1.5]", r"train.adam_betas\[1\] = 1.5: must be in \[0, 1\)"),
    ("rewards.weights.format=nan", r"rewards.weights.format = nan: must be a finite number"),
    ("parallel.dp_shard=0", r"parallel.dp_shard = 0: must be -1 or >= 1"),
])
def test_numeric_values_out_of_range_are_refused_naming_key_value_and_source(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, BASE + [override])


def test_every_numeric_field_has_a_range():
    from fastebm.config import RANGES, numeric_fields

    fields = numeric_fields()
    assert {"train.lr", "rollout.top_k", "video.fps", "rewards.weights", "train.adam_betas"} <= set(fields)
    assert sorted(set(fields) - set(RANGES)) == [], "add a line to config.RANGES for each new numeric field"
    assert sorted(set(RANGES) - set(fields)) == [], "RANGES names a field that does not exist"


def test_the_source_of_a_bad_value_is_named(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[model]\ntiny = "qwen2vl"\n[train]\nlr = -0.5\n[video]\nmax_frames = 2\n')
    with pytest.raises(ConfigError, match=rf"^{p}: train.lr = -0.5"):
        load_config(str(p))  # from the file: the file is named
    with pytest.raises(ConfigError, match=r"^command line: rollout.top_k = -5"):
        load_config(str(p), ["train.lr=0.1", "rollout.top_k=-5"])  # from the command line: not the recipe
    with pytest.raises(ConfigError, match=rf"^defaults and {p}: video.min_frames: must be >= 1 and <= video.max"):
        load_config(str(p), ["train.lr=0.1"])  # a cross-field check names where each side came from
    q = tmp_path / "ok.toml"
    q.write_text('[model]\ntiny = "qwen2vl"\n')
    with pytest.raises(ConfigError, match=r"^command line: rewards.weights: no weight for enabled reward 'clip'"):
        load_config(str(q), ["rewards.enabled=['clip']", "rewards.weights={format=1.0}", "rewards.clip.tiny=true"])


def test_a_recipe_path_that_is_a_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=rf"{tmp_path}: is a directory, not a recipe file"):
        load_config(str(tmp_path))


def test_a_nested_override_changes_one_key_not_the_table():
    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.toml"), ["rewards.weights.format=2"])
    assert cfg.rewards.weights == {"accuracy": 1.0, "format": 2.0, "clip": 0.8, "pcg": 0.8}
    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.toml"),
                      ["rewards.enabled=['format']", "rewards.weights={format=3.0}"])
    assert cfg.rewards.weights == {"format": 3.0}  # an inline table replaces the table


def test_a_weight_for_a_reward_that_is_not_enabled_is_refused():
    with pytest.raises(ConfigError, match=r"command line: rewards.weights.clip: reward 'clip' is not in rewards.enab"):
        load_config(None, BASE + ["rewards.weights.clip=0.5"])
    with pytest.raises(ConfigError, match=r"rewards.weights.pcg: reward 'pcg' is not in rewards.enabled"):
        load_config(None, BASE + ["rewards.weights={format=1.0,accuracy=1.0,pcg=0.3}"])
    # a recipe's table may list more rewards than a command line enables (tiny.toml has four)
    cfg = load_config(os.path.join(ROOT, "recipes", "tiny.toml"), ["rewards.enabled=['format','accuracy']"])
    assert cfg.rewards.enabled == ["format", "accuracy"]


def test_grpo_refuses_groups_of_one(tmp_path):
    from fastebm.train.trainer import Trainer

    cfg = load_config(None, BASE + ["rollout.group_size=1", f"run.output_dir={tmp_path}"])  # fine for SFT
    with pytest.raises(ConfigError, match=r"command line: rollout.group_size = 1: GRPO needs at least 2"):
        Trainer(cfg)  # before anything is built
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_cli_group_size_one_and_a_directory_recipe_exit_2(tmp_path):
    import subprocess
    import sys

    for args, text in ([os.path.join(ROOT, "recipes", "tiny.toml"), "rollout.group_size=1"], "GRPO needs at least 2"), \
                      ([str(tmp_path)], "is a directory"):
        res = subprocess.run([sys.executable, "-m", "fastebm.cli", "train", *args, f"run.output_dir={tmp_path / 'r'}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and text in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
