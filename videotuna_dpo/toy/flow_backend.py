"""Backend ``toy_flow``: the toy world's model trained as flow matching (rectified flow), as Wan and HunyuanVideo are.

The same pixel-space network, text encoder and fine-tuning as ``toy``; what differs is the objective:
``x_t = (1 - s) x0 + s * noise``, the network predicts the velocity ``noise - x0`` at timestep
``t = s * 1000`` (``FlowMatchingTraining`` over the checkpoint's ``FlowMatchEulerDiscreteScheduler``
config, whose ``shift`` it shares), and ``generate`` integrates it with that scheduler's Euler steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from videotuna_dpo.models.flow_matching import FlowMatchingSchedule, FlowMatchingTraining
from videotuna_dpo.toy.backend import ToyBackend, ToySchema

FLOW_BUILTIN = Path(__file__).with_name("flow_base")  # python -m videotuna_dpo.toy.train_base --flow


@dataclass
class ToyFlowSchema(ToySchema):
    name: str = "toy_flow"
    pretrained: str = "builtin"  # "builtin" = the flow checkpoint shipped in the package (toy/flow_base)


def toy_flow_scheduler(shift: float = 1.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


class ToyFlowBackend(FlowMatchingTraining, ToyBackend):
    """The toy world's flow-matching model as a DPO backend (Flow-DPO: the DPO loss on velocity errors)."""

    family = "toy_flow"
    schema = ToyFlowSchema
    builtin = FLOW_BUILTIN
    train_flags = " --flow"

    def __init__(self, cfg: ToyFlowSchema | Any):
        super().__init__(cfg)
        self.flow_schedule = FlowMatchingSchedule.from_scheduler_config(self.scheduler.config)

    @staticmethod
    def scheduler_class() -> type:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler
