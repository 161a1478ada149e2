"""Example `videotuna` scorer plugin: scores a video by its mean brightness.

The contract (see videotuna_dpo/hookspecs.py, hook `videotuna_scorers`): a scorer class with
`kind`, `needs_weights`, `weights_hint`, `version`, and `__call__(videos, prompts) -> [B]` where
`videos` is a float tensor [B, F, C, H, W] in [0, 1].

It declares no `score_range`, so it is no OmniScore dimension: `videotuna score --scorers example_brightness`
records its raw score (the OmniScore is left out), and `videotuna pairs --by example_brightness` pairs by it.
"""

import pluggy
import torch

hookimpl = pluggy.HookimplMarker("videotuna")


class MeanBrightnessScorer:
    """Mean pixel value over frames, channels and pixels, in [0, 1]."""

    kind = "quality"
    needs_weights = False
    weights_hint = ""
    version = "example-brightness-1"

    def __init__(self, device: str = "cpu"):
        self.device = device

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if videos.ndim != 5:
            raise ValueError(f"videos must be [B, F, C, H, W], got shape {tuple(videos.shape)}")
        if len(prompts) != videos.shape[0]:
            raise ValueError(f"{videos.shape[0]} videos but {len(prompts)} prompts")
        return videos.float().mean(dim=(1, 2, 3, 4))


@hookimpl
def videotuna_scorers():
    return {"example_brightness": MeanBrightnessScorer}
