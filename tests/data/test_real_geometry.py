"""At the real 336-px geometry (llava-v1.6), image-token counts from file headers equal what the
LlavaNext processor inserts and the features the model produces, for many aspect ratios."""

import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    MistralConfig,
)

from llava_train.data.formats import Conversation
from llava_train.data.images import ImageGeometry, image_size, num_image_tokens

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# (width, height): square, 4:3, 3:4, panoramas, tall strips, tiny, odd, huge
SIZES = [(336, 336), (640, 480), (480, 640), (1000, 300), (200, 900), (1920, 1080), (1080, 1920), (50, 40),
         (13, 997), (2000, 150), (777, 555), (336, 1008), (1008, 336), (1600, 1200)]


@pytest.fixture(scope="module")
def real_geometry(tiny_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                   image_grid_pinpoints=PINPOINTS),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    # real vision geometry (336 px, patch 14), tiny widths: counts depend on geometry, not width
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=336, patch_size=14, projection_dim=16),
        text_config=MistralConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    return processor, model


@pytest.mark.parametrize("w,h", SIZES)
def test_header_count_equals_processor_and_model(real_geometry, tmp_path, w, h):
    processor, model = real_geometry
    path = tmp_path / "img.png"
    Image.new("RGB", (w, h), (10, 200, 30)).save(path)
    geo = ImageGeometry.from_processor(processor)
    assert geo.image_size == 336 and geo.patch_size == 14
    conv = Conversation("x", [], [str(path)])
    size = image_size(str(path), tmp_path, conv, 0)  # header only
    assert size == (h, w)
    expected = num_image_tokens(*size, geo)
    with Image.open(path) as img:
        inputs = processor(images=[img.convert("RGB")], text=["[INST] <image>\nWhat? [/INST]"], return_tensors="pt")
    assert int((inputs.input_ids == 32000).sum()) == expected
    with torch.no_grad():
        feats = model.model.get_image_features(
            inputs.pixel_values, inputs.image_sizes, vision_feature_layer=-1,
            vision_feature_select_strategy="default").pooler_output
    assert sum(f.shape[0] for f in feats) == expected
