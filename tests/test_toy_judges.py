"""The toy world's judges (scorers its loop's training never uses): values on rendered videos."""

import pytest
import torch

from videotuna_dpo.registry import Registry
from videotuna_dpo.toy.judges import ToyShapeFidelity, ToyTravel, shape_fidelity, travel
from videotuna_dpo.toy.world import BACKGROUND, Spec, render

SQUARE_LEFT = Spec("red", "square", "left")


def _video(spec, flaw=None):
    return render(spec, flaw=flaw, seed=3).float() / 255  # [F, 3, H, W] in [0, 1]


def test_travel_is_the_share_of_the_worlds_path_along_the_captions_direction():
    clean = _video(SQUARE_LEFT)
    # The square's centroid moves 14 px (the world's 0.45 x 32 = 14.4 px path, rasterised) to the left.
    assert travel(clean, SQUARE_LEFT.caption) == pytest.approx(14.0 / 14.4)
    assert travel(clean, "a red square moving right") == 0.0  # the wrong direction travels nothing
    assert travel(clean, "a red square moving up") == 0.0  # nor does a perpendicular path
    assert travel(_video(SQUARE_LEFT, "static"), SQUARE_LEFT.caption) == 0.0
    empty = torch.tensor(BACKGROUND).view(1, 3, 1, 1).expand(8, 3, 32, 32) / 255
    assert travel(empty, SQUARE_LEFT.caption) == 0.0


def test_shape_fidelity_is_the_iou_with_the_captions_shape_at_the_worlds_size():
    circle = Spec("blue", "circle", "up")
    assert shape_fidelity(_video(SQUARE_LEFT), SQUARE_LEFT.caption) == pytest.approx(1.0)
    assert shape_fidelity(_video(circle), circle.caption) == pytest.approx(1.0)
    # A square judged as a circle of the same radius: the disc covers about pi/4 of the square, IoU < 0.9.
    assert 0.75 < shape_fidelity(_video(SQUARE_LEFT), "a red circle moving left") < 0.9
    empty = torch.tensor(BACKGROUND).view(1, 3, 1, 1).expand(8, 3, 32, 32) / 255
    assert shape_fidelity(empty, SQUARE_LEFT.caption) == 0.0


def test_the_judges_are_registered_scorers_outside_the_omniscore():
    registry = Registry.load()
    for name, cls in (("toy_travel", ToyTravel), ("toy_shape_fidelity", ToyShapeFidelity)):
        assert registry.get("scorer", name) is cls and cls.score_range is None
    videos = torch.stack([_video(SQUARE_LEFT), _video(SQUARE_LEFT, "static")])
    scores = ToyTravel(device="cpu")(videos, [SQUARE_LEFT.caption] * 2)
    assert scores.tolist() == pytest.approx([14.0 / 14.4, 0.0])
