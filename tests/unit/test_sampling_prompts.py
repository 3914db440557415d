"""A placeholder of several vectors is sampled with the tokens training saw: the pipelines encode our prompts
as written, without diffusers' textual-inversion expansion adding the vectors again."""

import pytest
import torch

from personalize.image_editing import build_edit_pipeline
from personalize.method_spec import PlaceholderSpec
from personalize.models import load_components
from personalize.run_settings import ConceptSpec
from personalize.sampling import build_pipeline
from personalize.text_conditioning import encode_prompts
from personalize.tokens import add_subject_tokens


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_a_three_vector_placeholder_is_encoded_as_training_encodes_it(tiny_models, arch):
    components = load_components(str(tiny_models[arch]))
    placeholders = add_subject_tokens(components, PlaceholderSpec(string="<{concept}>", vectors=3),
                                      ConceptSpec(id="cat-toy", images="photos", super_category="toy"))
    prompt = placeholders.fill("a photo of a {placeholder} toy")
    assert prompt == "a photo of a <cat-toy> <cat-toy>_1 <cat-toy>_2 toy"
    trained = encode_prompts(components, [prompt], torch.device("cpu"))
    for pipe in (build_pipeline(components), build_edit_pipeline(components), build_edit_pipeline(components, inpaint=True)):
        assert pipe.maybe_convert_prompt(prompt, pipe.tokenizer) == prompt
        sampled = pipe.encode_prompt(prompt, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
        assert torch.equal(sampled, trained.hidden)
