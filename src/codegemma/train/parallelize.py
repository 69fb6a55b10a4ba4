"""Process group setup and data parallelism (DDP or FSDP2), applied from outside the model.

`init_world` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
joins the process group: nccl when each process has a GPU (cuda:LOCAL_RANK), gloo on CPU. With
one process nothing is initialised and the model is trained as is. `parallelize` then applies, in
torchtitan's order, activation checkpointing (the model's own flag), per-layer `torch.compile`,
and either DDP or FSDP2 (`fully_shard` on every DecoderLayer, then on the root, so each layer's
parameters are gathered just before it runs and freed after). FSDP2 casts to bf16 through its
MixedPrecisionPolicy (gradients reduced in fp32); DDP and single-process runs use autocast.

    torchrun --nproc-per-node 8 -m codegemma.train --config run.toml --parallel fsdp
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from codegemma.errors import TrainConfigError
from codegemma.model import GemmaForCausalLM


@dataclass(frozen=True, kw_only=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we initialised the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device: str = "auto") -> World:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError(
            'device = "cuda" but no GPU is visible to this process',
            fix='use device = "cpu" (or "auto"), or check CUDA_VISIBLE_DEVICES and the driver',
        )
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        owns = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return World(
        rank=rank, world_size=world_size, local_rank=local_rank, device=dev, owns_group=owns
    )


def close_world(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank (a picklable value; what the other ranks pass is ignored)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(t: Tensor, world: World) -> Tensor:
    """Sum of `t` over all ranks (in place; returned for chaining)."""
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def parallelize(
    model: GemmaForCausalLM,
    world: World,
    *,
    mode: str,
    param_dtype: torch.dtype | None,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    """The module to train: `model` itself (single process, FSDP2) or its DDP wrapper.

    `param_dtype` (FSDP2 only) is the dtype parameters are gathered in for compute."""
    model.gradient_checkpointing = activation_checkpointing
    if compile:
        for layer in model.model.layers:
            layer.compile()  # in place: parameter names stay those of transformers
    if not world.distributed:
        return model
    if mode == "ddp":
        ids = [world.device.index] if world.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if mode != "fsdp":
        raise TrainConfigError(f'parallel must be "ddp" or "fsdp", got {mode!r}')
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # embeddings (tied lm_head) and final norm
    return model


@contextlib.contextmanager
def grad_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if isinstance(module, nn.parallel.DistributedDataParallel) and not enabled:
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
        module.set_requires_gradient_sync(enabled)
    yield


def grad_norm_value(norm: Tensor) -> Tensor:
    """A plain tensor from clip_grad_norm_'s result (a DTensor under FSDP2)."""
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm
