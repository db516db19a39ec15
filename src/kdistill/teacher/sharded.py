"""A teacher too large for one process: its parameters sharded across the torchrun
processes with FSDP2 (``torch.distributed.fsdp.fully_shard``), for inference only.

Each of the N processes keeps about 1/N of the teacher's parameters at rest. On every
call, each process runs the teacher on its own data-parallel share of the batch (the
student trains with DDP as usual); FSDP2 all-gathers one transformer block's parameters
at a time for the forward and frees them again after the block (``reshard_after_forward``).
The teacher is frozen: ``requires_grad=False``, eval mode, forward under
``torch.inference_mode()``; it never has gradients or optimizer state.

Every process must call the teacher as often as the others (the all-gathers are
collectives): the Distiller does, since every process takes the same number of steps.

Tested on 2 CPU processes with Gloo (``tests/distributed/test_sharded_teacher.py``); the
measured memory is in ``docs/sharded_teacher.md``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from .. import distributed
from ..distributed import DistributedError
from ..outputs import Batch, Outputs
from .base import Teacher
from .live import LiveTeacher


def _not_in_a_group() -> DistributedError:
    return DistributedError(
        "ShardedTeacher shards the teacher across the processes of a torch.distributed process group, and this "
        "process is in none. Start the script with torchrun, one process per shard: "
        "torchrun --nproc-per-node N my_script.py (or call torch.distributed.init_process_group before "
        "building the teacher). For a single process, use LiveTeacher(module), or a TeacherCache")


def find_blocks(module: nn.Module) -> list[str]:
    """The paths of a model's repeated blocks (the transformer layers), to shard one by one.

    The blocks are the children of the ``nn.ModuleList`` holding ``config.num_hidden_layers``
    modules (Hugging Face models: ``model.layers``, ``transformer.h``, ...), or, without a
    config, of the ``nn.ModuleList`` holding the most parameters.

    Raises:
        ValueError: no such ``nn.ModuleList`` (pass ``blocks=`` paths, or ``blocks=()``).
    """
    n_layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
    lists = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n_layers is not None:
        lists = [(name, m) for name, m in lists if len(m) == n_layers]
    if not lists:
        wanted = f" of {n_layers} modules (config.num_hidden_layers)" if n_layers is not None else ""
        raise ValueError(
            f"found no nn.ModuleList{wanted} in {type(module).__name__} to shard block by block; pass "
            "blocks=[paths of the blocks] (e.g. blocks=['encoder.0', 'encoder.1'] or the path of their "
            "ModuleList), or blocks=() to shard the whole network as one unit")
    name, blocks = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    return [f"{name}.{i}" if name else str(i) for i in range(len(blocks))]


def _embedding_units(module: nn.Module) -> list[str]:
    """The paths of a Hugging Face model's input and output embeddings when their weights
    are not tied (tied, they stay in the root's unit): with a large vocabulary they are the
    largest tensors, and as units of their own they are gathered only around their forward."""
    get_in, get_out = getattr(module, "get_input_embeddings", None), getattr(module, "get_output_embeddings", None)
    if not (callable(get_in) and callable(get_out)):
        return []
    try:
        found = [get_in(), get_out()]
    except (NotImplementedError, AttributeError):
        return []
    found = [m for m in found if isinstance(m, nn.Module)]
    weights = [getattr(m, "weight", None) for m in found]
    if len(found) == 2 and weights[0] is not None and weights[0] is weights[1]:
        return []
    names = {id(m): name for name, m in module.named_modules()}
    return [names[id(m)] for m in found if names.get(id(m))]


def _resolve_blocks(module: nn.Module, blocks: Sequence[str] | None) -> list[str]:
    if blocks is None:
        return find_blocks(module) + _embedding_units(module)
    if isinstance(blocks, str):
        blocks = [blocks]
    names = dict(module.named_modules())
    out: list[str] = []
    for path in blocks:
        if path not in names or path == "":
            known = [n for n in names if n][:20]
            raise ValueError(f"blocks: the teacher ({type(module).__name__}) has no module {path!r}; "
                             f"its modules include {known}")
        sub = names[path]
        out.extend(f"{path}.{i}" for i in range(len(sub))) if isinstance(sub, nn.ModuleList) else out.append(path)
    return out


class ShardedTeacher(Teacher):
    """A frozen teacher whose parameters are sharded across the processes (FSDP2).

    Build it in every process of a torchrun launch, from the same weights, and pass it to
    the Distiller like any teacher:

    ```python
    teacher = ShardedTeacher(AutoModelForCausalLM.from_pretrained(path))
    distiller = Distiller(student, teacher=teacher)
    ```

    ``fully_shard`` is applied to each block (see :func:`find_blocks`), to a Hugging Face
    model's input and output embeddings when their weights are not tied, and then to the
    root (what remains: the final norm, tied embeddings). Module paths
    are unchanged by sharding, so feature taps (``set_taps``) name layers as in the
    unsharded network.

    Args:
        module: the trained teacher network, with the same weights in every process
            (on the CPU, or on this process's device; sharding moves each shard to the
            mesh's device).
        mesh: a 1-D ``DeviceMesh`` to shard over (default: all processes of the group, on
            this process's device type: ``cuda`` with NCCL, ``cpu`` with Gloo).
        reshard_after_forward: free each block's gathered parameters after its forward
            (default; the memory at rest is the shard). ``False`` keeps them gathered after
            the first call: whole-teacher memory, no all-gathers on later calls.
        blocks: paths of the modules to shard one by one (a ``nn.ModuleList``'s path
            stands for its children); default :func:`find_blocks` and the untied
            embeddings; ``()`` shards the whole network as one unit.

    Raises:
        DistributedError: no process group (start with ``torchrun --nproc-per-node N``).
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: ``blocks`` not found.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        mesh=None,
        reshard_after_forward: bool = True,
        blocks: Sequence[str] | None = None,
    ):
        if not isinstance(module, nn.Module):
            raise TypeError(f"the teacher must be a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(reshard_after_forward, bool):
            raise ValueError(f"reshard_after_forward must be True or False, got {reshard_after_forward!r}")
        # 1. the process group torchrun describes (the Distiller would join it later anyway)
        if mesh is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                if not distributed.launched():
                    raise _not_in_a_group()
                distributed.init()
            from torch.distributed.device_mesh import init_device_mesh

            device_type = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
        self.mesh = mesh
        self.reshard_after_forward = reshard_after_forward

        # 2. frozen, then sharded block by block and at the root
        from torch.distributed.fsdp import fully_shard

        module.requires_grad_(False)
        module.eval()
        self.full_parameter_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        self.blocks = _resolve_blocks(module, blocks)
        for path in self.blocks:
            fully_shard(module.get_submodule(path), mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
        self.module = module

        # 3. the forward, taps and exports of a live teacher, on the sharded network
        self._live = LiveTeacher(module, channels_last=False)

    # ------------------------------------------------------------------ protocol
    def __call__(self, batch: Batch) -> Outputs:
        """This process's share of the batch through the sharded teacher (a collective:
        every process calls it)."""
        return self._live(batch)

    def set_taps(self, paths: Iterable[str]) -> None:
        """Serve these layers (paths as in the unsharded network) in ``Outputs.features``."""
        self._live.set_taps(paths)

    def parameters(self):
        """The teacher's frozen parameters (sharded: ``DTensor``; this process holds its shard)."""
        return self.module.parameters()

    # ------------------------------------------------------------------ memory
    def local_parameter_bytes(self) -> int:
        """Bytes of teacher parameters this process holds now (its shards; whole tensors
        where parameters are gathered)."""
        total = 0
        for p in self.module.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.numel() * local.element_size()
        return total

    def __repr__(self) -> str:
        return (f"ShardedTeacher({type(self.module).__name__}, shards={self.mesh.size()}, "
                f"blocks={len(self.blocks)}, reshard_after_forward={self.reshard_after_forward})")
