"""The per-row gather steer op as Triton kernels for CUDA (Punica SGMV style, segmented by steer):
the kernels (gather_kernels.py), their launch configurations (configs.py) and the op that plans and
launches them (gather_op.py). The design, its costs and limits: docs/kernel.md."""

from . import gather_kernels
from .configs import TARGETS, Config, Target, device_target, pick_config
from .gather_op import (
    Launch,
    col_align,
    default_config,
    interpreting,
    plan_launches,
    steer_hidden_gather_triton,
    target_for,
    variant_keys,
    warm_up,
)

__all__ = ["TARGETS", "Config", "Launch", "Target", "col_align", "default_config", "device_target", "gather_kernels",
           "interpreting", "pick_config", "plan_launches", "steer_hidden_gather_triton", "target_for", "variant_keys",
           "warm_up"]
