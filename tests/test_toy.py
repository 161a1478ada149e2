import pytest
import torch
from omegaconf import OmegaConf

from videotuna_dpo.toy.backend import ToyBackend
from videotuna_dpo.toy.model import tokenize
from videotuna_dpo.toy.scorer import ToyAlignment, alignment
from videotuna_dpo.toy.world import FLAWS, Spec, all_specs, parse_caption, render


def test_world_has_32_captions_that_parse_back():
    specs = all_specs()
    assert len(specs) == 32
    assert all(parse_caption(s.caption) == s for s in specs)
    with pytest.raises(ValueError, match="not a toy-world caption"):
        parse_caption("a cat playing piano")


@pytest.mark.parametrize("flaw, expected", [(None, (1.0, 1.0, 1.0)), ("wrong_color", (0.0, 1.0, 1.0)),
                                            ("static", (1.0, 1.0, 0.0)), ("flicker", (1.0, 1.0, 1.0))])
def test_alignment_checks_colour_shape_and_direction(flaw, expected):
    spec = Spec("red", "circle", "left")
    video = render(spec, flaw=flaw, seed=1).float() / 255
    assert alignment(video, spec.caption) == expected
    # The same clean square checked against another shape and direction.
    square = render(Spec("blue", "square", "up")).float() / 255
    assert alignment(square, "a blue circle moving down") == (1.0, 0.0, 0.0)


def test_toy_alignment_scorer_is_the_mean_of_the_three_checks():
    specs = all_specs()[:3]
    videos = torch.stack([render(s, flaw=f, seed=2) for s, f in zip(specs, [None, "wrong_color", "static"])]).float() / 255
    scores = ToyAlignment(device="cpu")(videos, [s.caption for s in specs])
    assert scores.tolist() == pytest.approx([1.0, 2 / 3, 2 / 3])


def test_flaws_are_what_the_quality_scorers_see():
    from videotuna_dpo.scoring.flickering import flickering_score

    spec = all_specs()[5]
    clean = flickering_score(render(spec, seed=0)[None].float())
    flicker = flickering_score(render(spec, flaw="flicker", seed=0)[None].float())
    assert clean.item() > flicker.item() + 0.03
    assert set(FLAWS) == {"flicker", "jitter", "wrong_color", "static"}


def test_empty_caption_encodes_to_zeros_without_nan():
    backend = ToyBackend.from_config(OmegaConf.create({"name": "toy"}))
    cond = backend.encode_prompt(["", "a red square moving left"])
    assert torch.isfinite(cond).all()
    assert cond[0].abs().sum() == 0 and cond[1].abs().sum() > 0
    assert tokenize(["a red zebra"]).tolist()[0][:3] == [2, 4, 1]  # unknown word -> <unk>


def test_shipped_base_generates_the_configured_shape_deterministically():
    backend = ToyBackend.from_config(OmegaConf.create({"name": "toy"}))
    a = backend.generate(["a red square moving left"], steps=4, guidance=3.0, seed=[7])
    b = backend.generate(["a red square moving left"], steps=4, guidance=3.0, seed=[7])
    assert a.shape == (1, 8, 3, 32, 32) and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
