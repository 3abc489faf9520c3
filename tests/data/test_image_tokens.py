"""<image> expands to exactly the features LlavaNext produces, computed from the header size alone."""

import pytest
import torch
from PIL import Image

from llava_train.data.images import ImageGeometry, num_image_tokens

# (width, height): square, wide, tall, extreme, odd sizes
SIZES = [(28, 28), (40, 30), (30, 40), (56, 28), (28, 56), (100, 30), (30, 90), (63, 21), (17, 13), (200, 150),
         (35, 49), (84, 28)]


@pytest.mark.parametrize("w,h", SIZES)
def test_count_equals_processor_and_model(processor, tiny_model, w, h):
    geo = ImageGeometry.from_processor(processor)
    expected = num_image_tokens(h, w, geo)
    img = Image.new("RGB", (w, h), (200, 30, 30))
    inputs = processor(images=[img], text=["[INST] <image>\nWhat? [/INST]"], return_tensors="pt")
    assert int((inputs.input_ids == 32000).sum()) == expected  # the processor agrees
    with torch.no_grad():
        feats = tiny_model.model.get_image_features(
            inputs.pixel_values, inputs.image_sizes,
            vision_feature_layer=tiny_model.config.vision_feature_layer,
            vision_feature_select_strategy=tiny_model.config.vision_feature_select_strategy,
        ).pooler_output
    assert sum(f.shape[0] for f in feats) == expected  # and so does the model


def test_real_geometry_counts():
    """At llava-v1.6's 336-px geometry the counts are the well-known ones."""
    geo = ImageGeometry(image_size=336, patch_size=14,
                        grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)))
    assert num_image_tokens(480, 640, geo) == 2340
    assert num_image_tokens(336, 336, geo) == 1176
    assert num_image_tokens(300, 1000, geo) == 2182
    assert num_image_tokens(900, 200, geo) == 1800
