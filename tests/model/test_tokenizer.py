"""The tiny checkpoint's tokenizer is the real Mistral-7B one, with <image> at 32000, stable across reloads."""

from transformers import AutoTokenizer

PROMPT = "[INST] <image>\nWhat is shown in this image? [/INST]"
# Mistral-7B sentencepiece ids (legacy=False: no space piece after the <image> special token).
PROMPT_IDS = [1, 733, 16289, 28793, 28705, 32000, 13, 3195, 349, 4894, 297, 456, 3469, 28804, 733, 28748, 16289, 28793]


def test_mistral_prompt_ids(processor):
    tok = processor.tokenizer
    assert len(tok) == 32001
    assert tok.convert_tokens_to_ids("<image>") == 32000
    assert tok(PROMPT).input_ids == PROMPT_IDS
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.pad_token_id == 0
    # a reply and the end-of-turn token
    assert tok("[/INST] red</s>", add_special_tokens=False).input_ids == [733, 28748, 16289, 28793, 2760, 2]


def test_reload_keeps_ids(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in [PROMPT, "[INST] <image>\n<image>\n 3 apples [/INST] 42.</s>", "\n\nhello  world"]:
        assert again(text).input_ids == tok(text).input_ids
    assert again(PROMPT).input_ids == PROMPT_IDS


def test_legacy_is_persisted(tiny_dir):
    import json

    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert cfg["legacy"] is False and cfg["add_bos_token"] is True
