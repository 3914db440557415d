"""Method-specific input rules give clear errors naming the concept; heat maps appear with every run."""

import pytest
from PIL import Image

from personalize.errors import ConceptError
from personalize.loop import run_method
from personalize.models import load_components
from personalize.run_context import prepare_run


@pytest.mark.parametrize("method", ["attndreambooth", "core", "disendiff"])
def test_a_multi_token_super_category_is_rejected_where_a_class_token_is_located(method, spec_for, pair_dir):
    concept = {"id": "plush", "images": str(pair_dir), "super_category": "stuffed animal"}
    if method == "disendiff":
        concept = {"id": "plush", "images": str(pair_dir), "subjects": [{"super_category": "stuffed animal"}, {"super_category": "dog"}]}
    with pytest.raises(ConceptError, match=r"concept 'plush': super-category 'stuffed animal' is 2 CLIP tokens") as err:
        prepare_run(spec_for(method, concept=concept), progress=False)
    assert "one-token word" in err.value.fix


def test_methods_that_do_not_locate_the_class_accept_multi_token_words(spec_for, pair_dir, tiny_model):
    spec = spec_for("dreambooth", concept={"id": "plush", "images": str(pair_dir), "super_category": "stuffed animal"})
    ctx = prepare_run(spec, load_components(str(tiny_model)), progress=False)
    assert ctx.subject == "sks stuffed animal"


def test_disendiff_needs_a_class_word_after_each_modifier(spec_for):
    spec = spec_for("disendiff")
    method = spec.method.model_copy(update={"prompt": "photo of {placeholder} and friends"})
    with pytest.raises(ConceptError, match=r"concept 'pair': training prompt 'photo of <pair-1> and friends' has no class "
                                           r"word right after \['<pair-1>', '<pair-2>'\]"):
        prepare_run(spec.model_copy(update={"method": method}), progress=False)


def test_every_stage_leaves_an_attention_heat_map(spec_for):
    result = run_method(spec_for("attndreambooth"), progress=False)
    maps = sorted(p.name for p in (result.run_dir / "attention").iterdir())
    assert maps == ["stage-00-embedding_alignment.png", "stage-01-attention_refinement.png", "stage-02-subject_identity.png"]
    with Image.open(result.run_dir / "attention" / maps[0]) as im:
        assert im.size == (3 * 128, 128 + 28)  # sample, [V] map, class map at 2x of 64 px


def test_disendiff_heat_maps_show_both_subjects(spec_for):
    result = run_method(spec_for("disendiff"), progress=False)
    with Image.open(result.run_dir / "attention" / "stage-00-calibrate.png") as im:
        assert im.size == (5 * 128, 128 + 28)  # sample + two modifiers + two classes
