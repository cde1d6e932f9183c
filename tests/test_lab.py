"""The quality lab: the procedural world (tiled_diffusion/lab/world.py)."""
import pytest
import torch

from tiled_diffusion.lab import world


@pytest.mark.parametrize("family", list(world.FAMILIES))
def test_world_is_deterministic(family):
    a = world.render(family, 11, -70, 33, 53, 47)
    b = world.render(family, 11, -70, 33, 53, 47)
    assert a.shape == (3, 47, 53) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert -1 <= a.min() and a.max() <= 1 and a.std() > 0.01  # not blank
    assert not torch.equal(a, world.render(family, 12, -70, 33, 53, 47))  # the seed matters


@pytest.mark.parametrize("family", list(world.FAMILIES))
def test_crop_of_a_larger_canvas_equals_the_smaller_canvas(family):
    """Every pixel is a function of its world coordinate: an odd crop at a negative offset inside a bigger canvas is
    bitwise the canvas rendered at that offset (primitives crossing the crop border included)."""
    big = world.render(family, 5, -150, -90, 301, 203)
    small = world.render(family, 5, -150 + 77, -90 + 41, 131, 97)
    assert torch.equal(big[:, 41:41 + 97, 77:77 + 131], small)


def test_families_by_name_index_or_caption():
    assert world.family_of(1) == world.family_of("sunset") == world.family_of(world.FAMILIES["sunset"]) == "sunset"
    with pytest.raises(ValueError, match="unknown scene family"):
        world.render("desert", 0, 0, 0, 8, 8)
    with pytest.raises(ValueError, match="positive int"):
        world.render("ocean", 0, 0, 0, 0, 8)


def test_captions_use_only_known_words():
    """The tiny tokenizer maps unknown words to <unk>: every caption word must be in its vocabulary."""
    from tiled_diffusion.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    for caption in world.CAPTIONS:
        assert tok.unk_token_id not in tok(caption).input_ids, caption
