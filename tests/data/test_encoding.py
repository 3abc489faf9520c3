"""Encoding: the windowed prefix check gives exactly the labels of the full-prefix definition (every
reply's generation prompt tokenised from the start), and the work is linear in the number of turns."""

import pytest

from llava_train.constants import IGNORE_INDEX
from llava_train.data.encoder import Encoder
from llava_train.data.formats import Conversation, DataError, Turn
from llava_train.data.images import ImageGeometry
from llava_train.data.templates import FAMILIES, get_family

GEO = ImageGeometry(image_size=336, patch_size=14, grid_pinpoints=((336, 672), (672, 336), (672, 672)))


def reference_labels(tok, family, turns):
    """The definition: reply k's labels start where the ids of the text before it end, and stop where the
    ids of the text up to its end-of-turn end, each tokenised from the start (quadratic, exact)."""
    bos = [tok.convert_tokens_to_ids(family.bos)] if family.bos else []
    pieces = family.pieces(turns)
    text = "".join(p.text for p in pieces)
    ids = bos + tok(text, add_special_tokens=False)["input_ids"]
    labels, pos = [IGNORE_INDEX] * len(ids), 0
    for piece in pieces:
        start, pos = pos, pos + len(piece.text)
        if piece.trained:
            before = bos + tok(text[:start], add_special_tokens=False)["input_ids"]
            upto = bos + tok(text[:pos], add_special_tokens=False)["input_ids"]
            assert ids[: len(upto)] == upto and ids[: len(before)] == before
            labels[len(before): len(upto)] = ids[len(before): len(upto)]
    return ids, labels


TRICKY = [
    [Turn("user", "<image>\n  Leading spaces and\ttabs?"), Turn("assistant", " 3 apples"),
     Turn("user", "Émoji 🍎 and ünïcode?"), Turn("assistant", "\nnew line first"),
     Turn("user", "x" * 50), Turn("assistant", ".hidden")],
    [Turn("system", "Terse."), Turn("user", "a<image>b"), Turn("assistant", "ok  "), Turn("user", "  "),
     Turn("assistant", "end.")],
]


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("case", range(len(TRICKY)))
def test_windowed_check_equals_the_full_prefix_definition(name, case, tokenizers):
    tok, family, turns = tokenizers[name], get_family(name), TRICKY[case]
    ids, labels = reference_labels(tok, family, turns)
    enc = Encoder(tok, family, None, max_length=10**6)
    enc.geometry = GEO
    conv = Conversation("x", turns, ["img"] * sum(t.text.count("<image>") for t in turns))
    # compare before image expansion: one <image> id each
    got_ids, anchors = enc._tokenise("".join(p.text for p in family.pieces(turns)))
    assert got_ids == ids and len(anchors) > 1
    out = enc.encode(conv, [(336, 336)] * len(conv.images))
    image_id = tok.convert_tokens_to_ids("<image>")
    assert [lab for t, lab in zip(out.input_ids, out.labels) if t != image_id] == \
        [lab for t, lab in zip(ids, labels) if t != image_id]


def test_stray_special_token_in_a_reply(tokenizers):
    tok = tokenizers["chatml"]
    conv = Conversation("bad", [Turn("user", "Hi"), Turn("assistant", "ok<|im_end|>")])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # default: data text spelling a special token is plain text (data/templates.py), never a control token
    out = Encoder(tok, get_family("chatml"), None, max_length=10**6).encode(conv, [])
    trained = [t for t, lab in zip(out.input_ids, out.labels) if lab != IGNORE_INDEX]
    assert trained.count(im_end) == 1 and trained[-1] == im_end  # only the template's own end-of-turn
    # data.special_tokens_in_text=parse: the control token is parsed, and then caught or exactly defined
    enc = Encoder(tok, get_family("chatml"), None, max_length=10**6, special_tokens_in_text="parse")
    try:
        enc.encode(conv, [])
    except DataError as err:  # either the template check or the empty-reply check names it
        assert err.kind in ("template_mismatch", "empty_reply")
    else:
        ids, labels = reference_labels(enc.tok, enc.family, conv.turns)
        assert enc.encode(conv, []).labels == labels


class Counting:
    """The tokenizer, counting the characters it is asked to tokenise."""

    def __init__(self, tok):
        self._tok, self.chars = tok, 0

    def __call__(self, text, **kw):
        self.chars += len(text)
        return self._tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.parametrize("name", ["mistral", "chatml", "llama3"])
def test_encoding_work_is_linear_in_turns(name, tokenizers):
    def chars(n_turns):
        tok = Counting(tokenizers[name])
        enc = Encoder(tok, get_family(name), None, max_length=10**6)
        turns = []
        for k in range(n_turns):
            turns += [Turn("user", f"Question {k}: what is in part {k} of the picture? " * 3),
                      Turn("assistant", f"Part {k} shows a red square next to a blue circle. " * 3)]
        tok.chars = 0
        enc.encode(Conversation("x", turns), [])
        return tok.chars

    small, double = chars(50), chars(100)
    assert 1.8 < double / small < 2.2, (small, double)  # quadratic would be ~4
