import torch


class Redness:
    """Mean red minus mean green and blue, in [-1, 1]; a quality dimension of the OmniScore."""

    kind = "quality"
    needs_weights = False
    weights_hint = ""
    version = "acme-redness-1"
    score_range = (-1.0, 1.0)

    def __init__(self, device="cpu"):
        self.device = device

    def __call__(self, videos, prompts):
        red = videos[:, :, 0].mean(dim=(1, 2, 3))
        others = videos[:, :, 1:].mean(dim=(1, 2, 3, 4))
        return red - others
