"""The device mesh: dims (dp, pp, cp, tp), outermost first; world size = dp*pp*cp*tp.

`check_layout` refuses layouts that cannot divide before any process group work, with the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

DIMS = ("dp", "pp", "cp", "tp")


class LayoutError(ValueError):
    """A parallel layout that does not divide the model, the data or the world."""


@dataclass(frozen=True)
class Coords:
    """This rank's position in the mesh."""

    dp: int
    pp: int
    cp: int
    tp: int


def check_layout(pcfg, world_size: int | None = None, model_cfg=None, data_cfg=None, launched: bool = True) -> None:
    """The one layout check: the world (when given), the model's shapes and the data's lengths must divide.

    launched: the process was started by torchrun/slurm; a layout of several ranks without it is refused."""
    sizes = {d: getattr(pcfg, d) for d in DIMS}
    product = sizes["dp"] * sizes["pp"] * sizes["cp"] * sizes["tp"]
    if world_size is not None and product > 1 and not launched:
        raise LayoutError(f"the layout dp*pp*cp*tp = {product} needs {product} processes, but this is one process "
                          f"started without torchrun: run `torchrun --nproc_per_node={product} -m pretrain ...` "
                          f"(or launch/torchrun.sh), or drop the --parallel.* sizes")
    if world_size is not None and product != world_size:
        raise LayoutError(f"parallel dp*pp*cp*tp = {sizes['dp']}*{sizes['pp']}*{sizes['cp']}*{sizes['tp']} = {product} "
                          f"but the world size is {world_size}: set --parallel.dp so the product matches")
    if model_cfg is not None:
        if model_cfg.heads % sizes["tp"]:
            raise LayoutError(f"model.heads ({model_cfg.heads}) not divisible by parallel.tp ({sizes['tp']})")
        if model_cfg.glu_dim % sizes["tp"]:
            raise LayoutError(f"model.glu_dim ({model_cfg.glu_dim}) not divisible by parallel.tp ({sizes['tp']})")
        if model_cfg.vocab_size % sizes["tp"]:
            raise LayoutError(f"model.vocab_size ({model_cfg.vocab_size}) not divisible by parallel.tp ({sizes['tp']}): "
                              f"pad the vocabulary to a multiple of tp")
        if model_cfg.layers % sizes["pp"]:
            raise LayoutError(f"model.layers ({model_cfg.layers}) not divisible by parallel.pp ({sizes['pp']})")
        if sizes["pp"] > 1 and pcfg.pp_schedule == "interleaved" and model_cfg.layers < 2 * sizes["pp"]:
            raise LayoutError(f"parallel.pp_schedule=interleaved runs 2 stages per pp rank: model.layers "
                              f"({model_cfg.layers}) must be at least 2 x parallel.pp ({2 * sizes['pp']}); use 1f1b "
                              f"or fewer ranks")
    if data_cfg is not None:
        shortest = data_cfg.seq_len if data_cfg.loader == "concat" else 2**data_cfg.min_log2
        if shortest % sizes["cp"]:
            raise LayoutError(f"the shortest sequence ({shortest}) is not divisible by parallel.cp ({sizes['cp']})")
        longest = data_cfg.seq_len if data_cfg.loader == "concat" else 2**data_cfg.max_log2
        per_step = data_cfg.tokens_per_step // longest
        if per_step % sizes["dp"]:
            raise LayoutError(f"a step of the longest sequences holds {per_step} sequences "
                              f"(data.tokens_per_step {data_cfg.tokens_per_step} / {longest}), "
                              f"not divisible by parallel.dp ({sizes['dp']})")


def build_mesh(pcfg, device_type: str = "cpu"):
    """A 4-D DeviceMesh named (dp, pp, cp, tp) over the default process group."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, tuple(getattr(pcfg, d) for d in DIMS), mesh_dim_names=DIMS)


def coords(mesh) -> Coords:
    return Coords(*(mesh.get_local_rank(d) for d in DIMS))
