"""Parallelism: the process group, FSDP2 sharding, and the few collectives the trainer needs.

    fastebm train RECIPE --nproc-per-node 2              # one node, 2 processes (torch.distributed.run)
    torchrun --nproc-per-node 8 -m fastebm.cli train RECIPE   # the same, launched by hand

Everything distributed is PyTorch's own: ``torch.distributed.run`` starts the processes,
``fully_shard`` (FSDP2) shards the models, Distributed Checkpoint saves them
(``fastebm.train.checkpoint``). Nothing here talks to another process except through
``torch.distributed`` collectives.

``parallelize`` applies everything to a model in one place: a fixed sequence of named steps
(``apply_activation_checkpointing``, ``apply_fsdp``, ``apply_root_hooks``, ``apply_sum_reduction``,
``materialize_from_rank0``, ``init_root``), each small enough to read at once. The trainers see a
``Dist`` object: ``rank``, ``world_size``, ``is_main`` and sum / gather helpers that are identities
on one process, so the single-process path runs the same code.

Rollout under FSDP (``gathered_params``): the policy's parameters are all-gathered ONCE per step
before sampling and kept unsharded until the rollout ends, so decoding runs no collective per
token (and ranks may finish their samples at different times without waiting for one another).
This holds a full copy of the policy during the rollout (bf16 7B: 15.2 GiB), freed right after;
see docs/distributed.md for the memory plan.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("fastebm")


# ----------------------------------------------------------------------------------------------
# The process group
# ----------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in the job; every helper is an identity when ``world_size == 1``."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mesh: Any = None  # torch DeviceMesh over the data-parallel ranks (None on one process)
    fsdp_modules: dict = field(default_factory=dict)  # id(model) -> its FSDP modules (parallelize)
    reshard_after_forward: bool = True                # parallel.reshard_after_forward of the blocks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, *values: float) -> list[float] | float:
        """Sum numbers over ranks, in float64 (one collective for all of them)."""
        if not self.enabled:
            return values[0] if len(values) == 1 else list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out = t.tolist()
        return out[0] if len(out) == 1 else out

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order (small Python objects: metrics, skip entries)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def reshard(self, model) -> None:
        """Free every gathered unit of ``model`` (parameters back to their shards)."""
        for m in self.fsdp_modules.get(id(model), []):
            m.reshard()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (writes caches: sample data, tiny model), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def local_device(self, device: torch.device) -> torch.device:
        """This rank's GPU (cuda:LOCAL_RANK) when ``device`` is CUDA."""
        if device.type == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return device

    def gather_step(self, rewards: dict[str, list[float]], advantages: list[float], lengths: list[int],
                    truncated: list[bool], prefix_tokens: int):
        """Every rank's rewards, advantages, completion lengths, truncation flags and prefix tokens, in
        rank order: ``(rewards, advantages, lengths, truncated, prefix_tokens)``.

        Ranks hold whole groups, so concatenating in rank order is the 1-process batch and the
        metrics rank 0 computes from it are the 1-process metrics. One object all-gather per step
        (N floats per reward): cheap next to a rollout.
        """
        if not self.enabled:
            return rewards, advantages, lengths, truncated, prefix_tokens
        parts = self.all_gather_object({"rewards": rewards, "adv": advantages, "lengths": lengths,
                                        "truncated": truncated, "prefix": prefix_tokens})
        return ({n: [x for p in parts for x in p["rewards"][n]] for n in rewards},
                [x for p in parts for x in p["adv"]], [x for p in parts for x in p["lengths"]],
                [x for p in parts for x in p["truncated"]], sum(p["prefix"] for p in parts))


def _comm_device() -> torch.device:
    """Where small collective tensors live: the current GPU under NCCL, else the CPU (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_distributed() -> bool:
    """Running under torch.distributed.run (torchrun) with more than one process?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(pcfg, device: torch.device, prompts_per_step: Optional[int] = None) -> Dist:
    """Join the process group torchrun set up (env:// rendezvous), or return the 1-process ``Dist``.

    The timeout bounds every collective: a rank that hangs (rather than dies) ends the job with a
    timeout error on the others after ``parallel.timeout_s`` instead of blocking forever. A rank that
    dies is handled by torchrun, which stops the other workers with SIGTERM: outside the training
    steps ``_on_sigterm`` exits at once; during them the rank's next collective with the dead one
    fails (``is_peer_failure``), since a SIGTERM there means "finish the step and save"
    (``fastebm.train.stop``).
    """
    from fastebm.config import check_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_parallel(pcfg, world, prompts_per_step)
    if world == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"  # NCCL for tensors, gloo for DCP's and our object collectives
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=pcfg.timeout_s))
    replicate, shard = parallel_degrees(pcfg, world)
    from torch.distributed.device_mesh import init_device_mesh

    if replicate > 1:  # HSDP: shard within a group of `shard` ranks, replicate across groups
        mesh = init_device_mesh(device.type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    else:
        mesh = init_device_mesh(device.type, (shard,), mesh_dim_names=("dp_shard",))
    signal.signal(signal.SIGTERM, _on_sigterm)
    d = Dist(rank=rank, world_size=world, local_rank=local_rank, mesh=mesh,
             reshard_after_forward=pcfg.reshard_after_forward)
    log.info("rank %d of %d (local %d), backend %s, mesh %s", rank, world, local_rank, backend, mesh)
    return d


def _on_sigterm(signum, frame):
    # Outside the training loop (start-up, shutdown): nothing to save, exit at once. Inside it the
    # loop's StopSignals handler replaces this one: a SIGTERM there finishes the step and saves
    # (fastebm.train.stop), and after a peer's death the next collective fails instead.
    from fastebm.train.stop import EXIT_KILLED

    rank = os.environ.get("RANK", "?")
    print(f"fastebm: rank {rank}: stopped by SIGTERM outside the training steps (start-up or shutdown: the "
          f"launcher stopping the job after another rank failed, or the job was cancelled); the launcher's summary "
          f"names a failed rank. The newest complete checkpoint under run.output_dir/checkpoints/ is intact "
          f"(resume with train.resume=true).", file=sys.stderr, flush=True)
    os._exit(EXIT_KILLED)


def is_peer_failure(e: BaseException) -> bool:
    """Did a collective fail because another rank went away or hung (not a bug on this rank)?"""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return any(w in text for w in ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out",
                                   "Timed out", "Broken pipe"))


def destroy_distributed(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def parallel_degrees(pcfg, world_size: int) -> tuple[int, int]:
    """(dp_replicate, dp_shard) with ``dp_shard = -1`` resolved to fill the world size."""
    shard = pcfg.dp_shard if pcfg.dp_shard != -1 else world_size // max(1, pcfg.dp_replicate)
    return pcfg.dp_replicate, shard


# ----------------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------------


def _dtype(name: str, default: torch.dtype) -> torch.dtype:
    return {"auto": default, "float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def load_parallel_model(path: str, device: torch.device, dtype, attn_implementation: str, pcfg, d: Dist, *,
                        trainable: bool, activation_checkpointing: bool = False):
    """``load_model`` + ``parallelize``. Under FSDP only rank 0 reads the weights (into host memory,
    once); every rank builds the model on the meta device, shards it, and receives its shards from
    rank 0 — host memory is one model, not one per rank."""
    from fastebm.model.loading import load_model, resolve_dtype

    if not d.enabled:
        lm = load_model(path, device, dtype, attn_implementation, trainable=trainable)
        parallelize(lm.model, pcfg, d, activation_checkpointing=activation_checkpointing)
        return lm
    dt = resolve_dtype(dtype, device)  # the same on every rank, whatever device rank 0 reads onto
    source = load_model(path, torch.device("cpu"), dt, attn_implementation, trainable=trainable) if d.is_main else None
    lm = load_model(path, device, dt, attn_implementation, trainable=trainable, on_meta=True)
    parallelize(lm.model, pcfg, d, activation_checkpointing=activation_checkpointing,
                weights_from=source.model if source is not None else None)
    return lm


def parallelize(model: torch.nn.Module, pcfg, d: Dist, *, activation_checkpointing: bool = False,
                weights_from: Optional[torch.nn.Module] = None) -> None:
    """Apply activation checkpointing and FSDP2 to a Qwen2-VL / Qwen2.5-VL model, in place.

    The order is fixed (torchtitan's): each step wraps what the next one shards. On one process
    only activation checkpointing applies (the model stays a plain module). A model built on the
    meta device (``load_parallel_model``) gets its storage and rank 0's weights (``weights_from``,
    on rank 0 only) once it is sharded.
    """
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if not d.enabled:
        return
    blocks = apply_fsdp(model, pcfg, d.mesh)  # the blocks, then the root
    apply_root_hooks(model)
    apply_sum_reduction([model] + blocks)
    if any(p.is_meta for p in model.parameters()):
        materialize_from_rank0(model, weights_from, pcfg, d)
    init_root(model)
    d.fsdp_modules[id(model)] = [model] + blocks
    # The root stays gathered after init_root's forward: shard it again, so that model.parameters()
    # (the optimizer's and the state dict's view) are the sharded parameters.
    d.reshard(model)


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer and vision block in the backward (transformers' own wrapper).

    Non-reentrant, so it composes with FSDP2's hooks; applied before sharding, so FSDP's unshard
    happens inside the recomputation, as in torchtitan.
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def apply_fsdp(model: torch.nn.Module, pcfg, mesh) -> list[torch.nn.Module]:
    """``fully_shard`` each vision block and decoder layer, then the root; returns the blocks.

    Mixed precision: parameters are stored (and the optimizer steps) in the loaded dtype — float32
    master weights for the flagship — all-gathered in ``param_dtype`` for compute, and gradients
    reduce-scattered in ``reduce_dtype``. A block is all-gathered just before it runs and freed after
    (``reshard_after_forward``), so at most ~2 blocks are ever unsharded. The root goes last: the
    embeddings, final norm, vision patch embedding and merger, and the lm_head (tied or not) form the
    root unit, which FSDP does not reshard after forward (the backward needs it at once), which is
    also what lets the loss read ``lm_head.weight`` outside ``lm_head.forward``.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    stored = next(model.parameters()).dtype
    mp = MixedPrecisionPolicy(param_dtype=_dtype(pcfg.param_dtype, stored),
                              reduce_dtype=_dtype(pcfg.reduce_dtype, stored))
    offload = CPUOffloadPolicy() if pcfg.cpu_offload else OffloadPolicy()
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    inner = model.model
    blocks = list(inner.visual.blocks) + list(inner.language_model.layers)
    for block in blocks:
        fully_shard(block, reshard_after_forward=pcfg.reshard_after_forward, **kw)
    fully_shard(model, **kw)
    return blocks


def apply_root_hooks(model: torch.nn.Module) -> None:
    """Unshard the root unit when ``model.model(...)`` is called directly.

    The trainer's passes call ``model.model(...)`` (hidden states, no logits), which skips the root's
    forward hook: a pre-hook there unshards the root unit too (a no-op when the root's own forward
    already did, as in generate). Its gradients are reduce-scattered by FSDP's end-of-backward
    callback, which completes every unit the backward did not reach.
    """
    model.model.register_forward_pre_hook(lambda mod, args: model.unshard())


def apply_sum_reduction(units: list[torch.nn.Module]) -> None:
    """Gradients are SUMMED over ranks, not averaged.

    The trainers divide their loss by the GLOBAL number of sequences / target tokens, so the sum is
    the global gradient. Sum-type collectives only (gloo has no PREMUL_SUM); with a factor of 1
    nothing is rescaled.
    """
    for m in units:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)


def materialize_from_rank0(model: torch.nn.Module, weights_from: Optional[torch.nn.Module], pcfg, d: Dist) -> None:
    """Give a sharded meta-device model its storage and rank 0's weights.

    Parameters and persistent buffers: ``set_model_state_dict`` with ``broadcast_from_rank0`` (each
    rank keeps only its shards). Buffers that no state dict holds (the rotary ``inv_freq``, computed
    at construction) are copied from rank 0's model and broadcast.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if d.is_main and weights_from is None:
        raise ValueError("rank 0 must pass the loaded model (weights_from) to shard a meta-device model")
    dev = d.mesh.device_type
    init = torch.device("cpu") if pcfg.cpu_offload or dev == "cpu" else torch.device(dev, torch.cuda.current_device())
    model.to_empty(device=init)
    set_model_state_dict(model, weights_from.state_dict() if d.is_main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    source = dict(weights_from.named_buffers()) if d.is_main else {}
    for name, buf in model.named_buffers():
        comm = buf if dev == "cpu" or buf.device.type == dev else buf.to(dev)
        if d.is_main:
            comm.copy_(source[name])
        dist.broadcast(comm, src=0)
        if comm is not buf:
            buf.copy_(comm)


def init_root(model: torch.nn.Module) -> None:
    """Fix the FSDP root with a one-token forward through it (every rank, collectively).

    FSDP initialises lazily: the first sharded module whose forward runs becomes the root. The
    trainers' passes call ``model.model(...)`` directly, which would run a block first and elect it.
    """
    with torch.no_grad():
        tok = torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device)
        model(input_ids=tok, attention_mask=torch.ones_like(tok), use_cache=False)


@contextlib.contextmanager
def gathered_params(model: torch.nn.Module, d: Dist):
    """Keep ``model``'s full parameters on every rank for the duration (the rollout strategy).

    One all-gather per unit on entry, none per token; on exit every unit is resharded and the
    normal reshard-after-forward behaviour restored. Collective: every rank enters together.
    """
    mods = d.fsdp_modules.get(id(model))
    if not mods:
        yield
        return
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
        for m in mods[1:]:  # the root keeps FSDP's own choice (no reshard after forward)
            m.set_reshard_after_forward(d.reshard_after_forward, recurse=False)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global gradient norm over all ranks (clipped in place when ``max_norm > 0``)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(norm, "full_tensor"):  # DTensor (sharded grads): reduce the partial norms
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
