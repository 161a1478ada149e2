"""This package's own contributions to the ``videotuna`` host (entry point ``dpo``).

Factories are ``"module:attribute"`` references, imported on first use, so that building the
registry (and ``videotuna plugins``) never imports torch.
"""

from __future__ import annotations

from videotuna_dpo.hookspecs import hookimpl
from videotuna_dpo.scoring import SCORERS


@hookimpl
def videotuna_strategies():
    return {"dpo": "videotuna_dpo.strategy:DPOStrategy"}


@hookimpl
def videotuna_scorers():
    return {**SCORERS, "toy_alignment": "videotuna_dpo.toy.scorer:ToyAlignment",
            "toy_travel": "videotuna_dpo.toy.judges:ToyTravel",
            "toy_shape_fidelity": "videotuna_dpo.toy.judges:ToyShapeFidelity"}


@hookimpl
def videotuna_datamodules():
    return {"preference": "videotuna_dpo.data.datamodule:PreferenceDataModule"}


@hookimpl
def videotuna_models():
    return {
        "cogvideox": "videotuna_dpo.models.cogvideox:CogVideoXBackend",
        "videocrafter2": "videotuna_dpo.models.videocrafter:VideoCrafter2Backend",
        "t2v_turbo": "videotuna_dpo.models.t2v_turbo:T2VTurboBackend",
        "wan_videotuna": "videotuna_dpo.models.wan_videotuna:WanVideoTunaBackend",
        "toy": "videotuna_dpo.toy.backend:ToyBackend",
        "wan": "videotuna_dpo.models.wan:WanBackend",
        "hunyuanvideo": "videotuna_dpo.models.hunyuan_video:HunyuanVideoBackend",
        "toy_flow": "videotuna_dpo.toy.flow_backend:ToyFlowBackend",
    }
