"""Prompt families: generation prompts equal the published strings, training form = inference form
(prefix property) on multi-turn, multi-image and system-prompt conversations, exact trained spans.

The real Llama-2/Yi/Llama-3/Qwen tokenizers are not available offline: each family is tested with the
Mistral tokenizer plus that family's special tokens added as special tokens (unadded, `<|im_start|>`
would split into 7 pieces and nothing would be checked)."""

import pytest

from llava_train.constants import IGNORE_INDEX
from llava_train.data.encoder import Encoder
from llava_train.data.formats import Conversation, DataError, Turn
from llava_train.data.images import ImageGeometry, num_image_tokens
from llava_train.data.templates import FAMILIES, get_family

GEO = ImageGeometry(image_size=336, patch_size=14,
                    grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)))
Q = "<image>\nWhat is shown in this image?"

# The seed strings: transformers' LLaVA-NeXT docs (llama3 without the docs' doubled header token).
SEED = {
    "mistral": "[INST] <image>\nWhat is shown in this image? [/INST]",
    "vicuna": "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the human's questions. USER: <image>\nWhat is shown in "
              "this image? ASSISTANT:",
    "chatml": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is shown in this "
              "image?<|im_end|><|im_start|>assistant\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. You "
              "are able to understand the visual content that the user provides, and assist the user with a "
              "variety of tasks using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
              "<image>\nWhat is shown in this image?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is shown "
            "in this image?<|im_end|>\n<|im_start|>assistant\n",
}
FIRST_TOKEN = {"mistral": "<s>", "vicuna": "<s>", "chatml": "<|im_start|>", "llama3": "<|begin_of_text|>",
               "qwen": "<|im_start|>"}
SIZES = [(480, 640), (900, 200)]  # (height, width)

CONVS = {
    "multi_turn": [Turn("user", Q), Turn("assistant", "A red circle."), Turn("user", "And its size?"),
                   Turn("assistant", "3 cm across"), Turn("user", "Sure?"), Turn("assistant", "Yes.")],
    "multi_image": [Turn("user", "<image>\nCompare with <image>\nthis one."), Turn("assistant", "Both are red."),
                    Turn("user", "Which is larger?"), Turn("assistant", "\nThe first.")],
    "system": [Turn("system", "You answer tersely."), Turn("user", Q), Turn("assistant", ".5 of it"),
               Turn("user", "Again?"), Turn("assistant", "Red.")],
}
N_IMAGES = {"multi_turn": 1, "multi_image": 2, "system": 1}


def _encoder(tokenizers, name, **kw):
    kw.setdefault("max_length", 100_000)
    return Encoder(tokenizers[name], get_family(name), GEO, **kw)


def _text(tok, ids):
    """Token ids back to text exactly (sentencepiece ▁ and byte pieces)."""
    return "".join(tok.convert_ids_to_tokens(ids)).replace("▁", " ").replace("<0x0A>", "\n")


@pytest.mark.parametrize("name", sorted(SEED))
def test_generation_prompt_equals_seed(name, tokenizers):
    family = get_family(name)
    assert family.generation_prompt([Turn("user", Q)]) == SEED[name]
    # the saved Jinja chat template renders the same string (what plain transformers users get)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}]
    assert tokenizers[name].apply_chat_template(msgs, tokenize=False, chat_template=family.chat_template) == SEED[name]
    # and the ids start with the family's BOS (llama3: <|begin_of_text|>; chatml/qwen: none)
    enc = _encoder(tokenizers, name)
    ids = enc.encode_prompt(Conversation("x", [Turn("user", Q)], ["a.png"]), [Turn("user", Q)], [(336, 336)])
    assert tokenizers[name].convert_ids_to_tokens(ids[:1]) == [FIRST_TOKEN[name]]
    assert ids.count(tokenizers[name].convert_tokens_to_ids("<image>")) == 1176


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("kind", sorted(CONVS))
def test_prefix_property_and_trained_spans(name, kind, tokenizers):
    tok, family = tokenizers[name], get_family(name)
    turns = CONVS[kind]
    conv = Conversation("x", turns, ["img"] * N_IMAGES[kind])
    sizes = SIZES[: N_IMAGES[kind]]
    enc = _encoder(tokenizers, name).encode(conv, sizes)
    assert len(enc.input_ids) == len(enc.labels)
    eot = tok.convert_tokens_to_ids(family.eot)
    replies = [k for k, t in enumerate(turns) if t.role == "assistant"]
    expected_labels = [IGNORE_INDEX] * len(enc.input_ids)
    for k in replies:
        # the tokens before reply k are exactly the generation prompt for the turns before it
        prompt = _encoder(tokenizers, name).encode_prompt(conv, turns[:k], sizes)
        assert enc.input_ids[: len(prompt)] == prompt
        # from there the reply is trained: separator + reply + end-of-turn, exactly
        span = family.reply.format(text=family.message_text(turns[k].text))
        end = len(prompt)
        while _text(tok, enc.input_ids[len(prompt): end]) != span:
            end += 1
            assert end <= len(enc.input_ids), f"reply {k} not found after its prompt"
        assert enc.input_ids[end - 1] == eot
        expected_labels[len(prompt): end] = enc.input_ids[len(prompt): end]
    assert enc.labels == expected_labels  # nothing else trained: system, user, scaffolding, images
    n_img = sum(num_image_tokens(h, w, GEO) for h, w in sizes)
    assert enc.input_ids.count(tok.convert_tokens_to_ids("<image>")) == n_img


@pytest.mark.parametrize("name", ["mistral", "vicuna"])
@pytest.mark.parametrize("reply,first", [("3 apples", ["▁", "3"]), (".hidden", ["▁."]), ("\nnew", ["▁", "<0x0A>"])])
def test_separator_space_is_trained(name, reply, first, tokenizers):
    conv = Conversation("x", [Turn("user", "Count?"), Turn("assistant", reply)])
    enc = _encoder(tokenizers, name).encode(conv, [])
    trained = tokenizers[name].convert_ids_to_tokens([t for t in enc.labels if t != IGNORE_INDEX])
    assert trained[: len(first)] == first and trained[-1] == "</s>"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_train_last_turn_only(name, tokenizers):
    tok, family = tokenizers[name], get_family(name)
    conv = Conversation("x", CONVS["multi_turn"], ["img"])
    enc = _encoder(tokenizers, name, last_turn_only=True).encode(conv, SIZES[:1])
    assert _text(tok, [t for t in enc.labels if t != IGNORE_INDEX]) == family.reply.format(text="Yes.")


def test_truncation_drops_whole_turns_never_images(tokenizers):
    tok = tokenizers["mistral"]
    turns = [Turn("user", "<image>\nWhat?"), Turn("assistant", "Red."), Turn("user", "<image>\nAnd this?"),
             Turn("assistant", "Blue.")]
    conv = Conversation("x", turns, ["a", "b"])
    full = _encoder(tokenizers, "mistral").encode(conv, SIZES)
    first_images = num_image_tokens(*SIZES[0], GEO)
    # room for turn 1 and half of the second image: the whole second exchange goes, image included
    limit = len(full.input_ids) - num_image_tokens(*SIZES[1], GEO) // 2
    enc = _encoder(tokenizers, "mistral", max_length=limit).encode(conv, SIZES)
    assert enc.num_images == 1 and enc.image_tokens == [first_images]
    assert enc.input_ids.count(32000) == first_images and enc.input_ids[-1] == tok.eos_token_id
    assert _text(tok, [t for t in enc.labels if t != IGNORE_INDEX]) == " Red.</s>"
    assert enc.input_ids == full.input_ids[: len(enc.input_ids)]
    # the first turn alone does not fit: too_long (skipped and counted by the dataset)
    with pytest.raises(DataError, match="first turn needs .* over data.max_length=100") as err:
        _encoder(tokenizers, "mistral", max_length=100).encode(conv, SIZES)
    assert err.value.kind == "too_long"
    # overflow=skip / error: a sample that is too long is not cut at all
    for policy in ("skip", "error"):
        with pytest.raises(DataError, match=f"data.overflow={policy}"):
            _encoder(tokenizers, "mistral", max_length=limit, overflow=policy).encode(conv, SIZES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hf_assistant_mask_equals_our_labels(name, tokenizers):
    """Plain transformers with the saved chat template trains exactly the same tokens."""
    tok, family = tokenizers[name], get_family(name)
    turns = [Turn("system", "Be brief."), Turn("user", "Q?"), Turn("assistant", "3 red."), Turn("user", "More"),
             Turn("assistant", "Yes.")]
    msgs = [{"role": t.role, "content": t.text} for t in turns]
    hf = tok.apply_chat_template(msgs, chat_template=family.chat_template, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    enc = _encoder(tokenizers, name).encode(Conversation("x", turns), [])
    n_bos = 1 if family.bos else 0
    assert enc.input_ids[n_bos:] == hf["input_ids"]
    assert [lab != IGNORE_INDEX for lab in enc.labels[n_bos:]] == [bool(m) for m in hf["assistant_masks"]]


def test_wrong_family_for_tokenizer_fails_early(tokenizers):
    with pytest.raises(ValueError, match=r"no '<\|im_end\|>' token, which the 'chatml' prompt family uses"):
        Encoder(tokenizers["mistral"], get_family("chatml"), GEO, max_length=100)
    with pytest.raises(ValueError, match=r"no '<\|begin_of_text\|>' token"):
        Encoder(tokenizers["qwen"], get_family("llama3"), GEO, max_length=100)
