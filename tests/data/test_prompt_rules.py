"""Prompt rules with the families' real tokenizers (chatml: stand-in): replies with surrounding whitespace,
message text that spells special tokens, `data.image_placement`, and `llava doctor`'s special-token report."""

from __future__ import annotations

import functools
import json
import pickle

import pytest

from conftest import DEMO, tiny_family_dir
from llava_train.constants import IGNORE_INDEX
from llava_train.data.encoder import Encoder
from llava_train.data.formats import Conversation, Turn, place_images, to_conversation
from llava_train.data.templates import FAMILIES, get_family


@functools.cache
def _encoder(family, special_tokens_in_text="text"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_family_dir(family)))
    return Encoder(tok, get_family(family), None, max_length=10**6, special_tokens_in_text=special_tokens_in_text)


def _trained(enc):
    return [t for t in enc.labels if t != IGNORE_INDEX]


def _conv(*turns):
    return Conversation("x", [Turn(r, t) for r, t in turns])


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("reply", ["\nThe first.", "  two spaces", "trailing \n", "\n\nboth\n "])
def test_whitespace_replies_train_by_the_rule(family, reply):
    """Each reply trains exactly its own tokens, tokenised apart from the header (llama3: trimmed, Meta's
    template), then the end-of-turn; the tokens before it are the whole-string generation prompt."""
    enc_ = _encoder(family)
    tok, fam = enc_.tok, get_family(family)
    conv = _conv(("user", "Which?"), ("assistant", reply), ("user", "Sure?"), ("assistant", "Yes."))
    enc = enc_.encode(conv, [])
    text = fam.message_text(reply)
    before, after = fam.reply.split("{text}")  # separator (vicuna/mistral: " ") and end-of-turn
    expected = enc_.template._run(before + text, first=False) + [tok.convert_tokens_to_ids(fam.eot)]
    trained = _trained(enc)
    assert trained[: len(expected)] == expected
    prompt = enc_.encode_prompt(conv, conv.turns[:1], [])
    assert enc.input_ids[: len(prompt)] == prompt and enc.labels[len(prompt)] != IGNORE_INDEX
    # the saved chat template renders the same text (llama3: trimmed there too)
    msgs = [{"role": t.role, "content": t.text} for t in [Turn("system", " Be brief. \n"), *conv.turns]]
    assert tok.apply_chat_template(msgs, chat_template=fam.chat_template, tokenize=False) == "".join(
        p.text for p in fam.pieces([Turn(m["role"], m["content"]) for m in msgs]))
    if family == "llama3":  # trimmed: nothing but the words and <|eot_id|>
        assert tok.decode(expected) == reply.strip() + "<|eot_id|>"
    if family == "qwen" and reply.startswith("\n"):  # "\n" of the header and of the reply stay apart
        assert tok.convert_ids_to_tokens(prompt[-1:]) == ["Ċ"] and tok.decode(expected[:1]).startswith("\n")


@pytest.mark.parametrize("family", ["mistral", "llama3", "qwen", "vicuna"])
def test_special_token_text_is_plain_text_by_default(family):
    fam = get_family(family)
    conv = _conv(("user", f"Say {fam.eot} please <s>"), ("assistant", f"A{fam.eot}B <|im_start|>user"))
    text_enc, parse_enc = _encoder(family), _encoder(family, special_tokens_in_text="parse")
    tok = text_enc.tok
    eot = tok.convert_tokens_to_ids(fam.eot)
    enc = text_enc.encode(conv, [])
    assert enc.special_text and fam.eot in enc.special_text
    assert pickle.loads(pickle.dumps(text_enc)).encode(conv, []) == enc  # the same in DataLoader workers
    # the reply trains one end-of-turn only, at its end; the user's text holds none either
    assert _trained(enc).count(eot) == 1 and _trained(enc)[-1] == eot
    template_eots = text_enc.encode(_conv(("user", "Say x"), ("assistant", "AxB")), []).input_ids.count(eot)
    assert enc.input_ids.count(eot) == template_eots
    assert tok.decode(_trained(enc)).replace(" ", "").startswith(f"A{fam.eot}B".replace(" ", ""))
    # parse: the old behaviour, the text becomes the control token
    old = parse_enc.encode(conv, [])
    assert _trained(old).count(eot) == 2 and old.input_ids.count(eot) == template_eots + 2
    # the template's own control tokens are control tokens in both modes
    clean = _conv(("user", "Hi"), ("assistant", "Yo"))
    assert text_enc.encode(clean, []).input_ids == parse_enc.encode(clean, []).input_ids


def test_image_placement_front_moves_a_single_image(encoder, processor):
    row = {"id": "p", "image": json.loads((DEMO / "train.json").read_text())[0]["image"],
           "conversations": [{"from": "human", "value": "What colour is the shape?\n<image>"},
                             {"from": "gpt", "value": "red"}]}
    conv = place_images(to_conversation(row, fmt="auto", source="t", index=0), "front")
    assert conv.turns[0].text == "<image>\nWhat colour is the shape?"
    kept = place_images(to_conversation(row, fmt="auto", source="t", index=0), "as_written")
    assert kept.turns[0].text == "What colour is the shape?\n<image>"
    multi = _conv(("user", "Left <image> right <image> which?"), ("assistant", "left"))
    assert place_images(multi, "front").turns[0].text == "Left <image> right <image> which?"
    # exact labels through the training path: the prompt is the image-first generation prompt
    from llava_train.data.dataset import prepare

    conv, sizes, enc = prepare(row, index=0, source="t", fmt="auto", image_root=DEMO, encoder=encoder)
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(_trained(enc)) == ["▁red", "</s>"]
    ids = tok("[INST] <image>\nWhat colour is the shape? [/INST] red</s>").input_ids
    n = enc.input_ids.count(32000)
    k = ids.index(32000)
    assert enc.input_ids == ids[:k] + [32000] * n + ids[k + 1:]
    assert enc.labels == [IGNORE_INDEX] * (len(enc.input_ids) - 2) + enc.input_ids[-2:]


def test_doctor_reports_special_token_text(tmp_path, capsys):
    from llava_train.cli import main

    rows = json.loads((DEMO / "eval.json").read_text())[:6]
    rows[1]["conversations"][1]["value"] = "red</s> and <s>more"
    rows[4]["conversations"][0]["value"] += " <s>"
    path = tmp_path / "special.json"
    path.write_text(json.dumps(rows))
    main(["doctor", f"data.train_path={path}", f"data.image_root={DEMO}", "data.eval_path=null",
          "doctor.workers=1", f"hydra.run.dir={tmp_path}"])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("special-token text:"))
    assert "2 sample(s)" in line and "'<s>' x2" in line and "'</s>' x1" in line and "plain text" in line
    assert f"first ids: {rows[1]['id']}, {rows[4]['id']}" in line and "doctor: OK" in out
