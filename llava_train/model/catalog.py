"""The released LLaVA-NeXT checkpoints' configs, tabled so that `llava plan` and the up-front checks
build the model on the meta device without the hub (offline machines, CI).

Sources: the llava-hf `config.json` files on the hub (https://huggingface.co/llava-hf/<name>/blob/main/
config.json: image_grid_pinpoints, image_token_index, padded vocab_size, vision_config) and, for the text
sizes those files leave to defaults, the base LLM's own config.json (named per entry). All seven use
CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336) with features from layer -2, the "default"
select strategy (CLS dropped) and the llava-v1.6 pinpoints. A local folder or a reachable hub id is always
read from its own config.json first (`llava_train.model.load.checkpoint_config`); this table is the
fallback for the known hub ids only.
"""

from __future__ import annotations

from llava_train.data.images import ImageGeometry, num_image_tokens

# (height, width) of each anyres grid (llava-v1.6; the same in all seven llava-hf configs)
PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
              "projection_dim": 768, "vocab_size": 32000}


def _llama(hidden, layers, heads, kv, inter, vocab, model_type="llama", **extra):
    return {"model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter,
            "vocab_size": vocab, **extra}


# hub id -> (text_config, image_token_index, source of the text sizes)
KNOWN = {
    "llava-hf/llava-v1.6-mistral-7b-hf": (
        _llama(4096, 32, 32, 8, 14336, 32064, model_type="mistral", sliding_window=None), 32000,
        "mistralai/Mistral-7B-Instruct-v0.2"),
    "llava-hf/llava-v1.6-vicuna-7b-hf": (_llama(4096, 32, 32, 32, 11008, 32064), 32000, "lmsys/vicuna-7b-v1.5"),
    "llava-hf/llava-v1.6-vicuna-13b-hf": (_llama(5120, 40, 40, 40, 13824, 32064), 32000, "lmsys/vicuna-13b-v1.5"),
    "llava-hf/llava-v1.6-34b-hf": (_llama(7168, 60, 56, 8, 20480, 64064), 64000, "NousResearch/Nous-Hermes-2-Yi-34B"),
    "llava-hf/llama3-llava-next-8b-hf": (_llama(4096, 32, 32, 8, 14336, 128320), 128256,
                                         "meta-llama/Meta-Llama-3-8B-Instruct"),
    "llava-hf/llava-next-72b-hf": (_llama(8192, 80, 64, 64, 24576, 152128, model_type="qwen2"), 151646,
                                   "Qwen/Qwen1.5-72B-Chat"),
    "llava-hf/llava-next-110b-hf": (_llama(8192, 80, 64, 8, 49152, 152128, model_type="qwen2"), 151646,
                                    "Qwen/Qwen1.5-110B-Chat"),
}


def known_config(checkpoint: str):
    """The `LlavaNextConfig` of a released checkpoint from the table (None for anything else)."""
    entry = KNOWN.get(checkpoint.rstrip("/"))
    if entry is None:
        return None
    from transformers import LlavaNextConfig

    text, image_token, _ = entry
    return LlavaNextConfig(text_config=dict(text), vision_config=dict(CLIP_L_336), image_token_index=image_token,
                           image_grid_pinpoints=[list(p) for p in PINPOINTS], vision_feature_layer=-2,
                           vision_feature_select_strategy="default", use_image_newline_parameter=True,
                           tie_word_embeddings=False, dtype="float16")


def geometry(config) -> ImageGeometry:
    """The image geometry a `LlavaNextConfig` implies (what its processor uses: CLIP's base size and patch,
    the grid pinpoints; CLIP adds one CLS feature)."""
    v = config.vision_config
    return ImageGeometry(image_size=int(v.image_size), patch_size=int(v.patch_size),
                         grid_pinpoints=tuple(tuple(int(x) for x in p) for p in config.image_grid_pinpoints),
                         num_additional_image_tokens=1,
                         vision_feature_select_strategy=config.vision_feature_select_strategy)


def largest_image_tokens(geo: ImageGeometry) -> int:
    """`<image>` tokens of the largest image: one exactly filling the biggest grid pinpoint (any image maps
    to a pinpoint and fills at most all of it)."""
    return max(num_image_tokens(h, w, geo) for h, w in geo.grid_pinpoints)
