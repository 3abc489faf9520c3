"""Every prompt family with its real tokenizer (chatml: a stand-in, Yi's is not available offline):

- the converted HF tokenizers equal the reference tokenizers (tiktoken, sentencepiece) on probe texts;
- the processor a tiny checkpoint of the family saves gives, with plain `apply_chat_template`, exactly the
  training tokens before every reply of a multi-turn, multi-image, system-prompt conversation, and its
  assistant mask equals our labels;
- (slow) 2 training steps, export, chat: every loadable folder carries the training template and stops on
  the family's end-of-turn token, and `llava chat` builds the training prompt.

The Llama-2 tokenizer is read from `../shared/tokenizers/llama2/` beside the repository (or
$LLAVA_TRAIN_LLAMA2_TOKENIZER); vicuna's tests are skipped when it is absent."""

from __future__ import annotations

import ast
import json
import re

import pytest
from PIL import Image

from conftest import DEMO, tiny_family_dir
from llava_train.constants import IGNORE_INDEX
from llava_train.data.encoder import Encoder
from llava_train.data.formats import Conversation, Turn
from llava_train.data.images import ImageGeometry
from llava_train.data.templates import FAMILIES, get_family

PROBES = ["Hello world", "  leading spaces and trailing  ", "\n\nnewlines\n\n\nmany", "numbers 1234567 3.14159",
          "Ünïcödé café naïve 日本語のテキスト 中文字符", "emoji 😀🚀 and tabs\tx",
          "code: def f(x):\n    return x**2  # ok",
          "I'm sure they'll've done it", "What is shown in this image?\nA red circle.", "x" * 300 + " end"]
EOT = {"mistral": "</s>", "vicuna": "</s>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>", "qwen": "<|im_end|>"}


def _reference_encode(family: str):
    """The reference tokenizer's encode (plain text, no BOS)."""
    from llava_train.model import tokenizers as t

    if family in ("mistral", "vicuna"):
        import sentencepiece

        path = t.mistral_tokenizer_file() if family == "mistral" else t.llama2_tokenizer_file()
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        return lambda text: sp.encode(text)
    if family == "llama3":
        from llama_models.llama3.tokenizer import Tokenizer  # Meta's own tiktoken wrapper

        ref = Tokenizer(t.llama3_tokenizer_file())
        return lambda text: ref.encode(text, bos=False, eos=False)
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    # dashscope's Qwen tokenizer, from its source (importing dashscope needs its web clients)
    source = t.package_file("dashscope", "dashscope/tokenizers/qwen_tokenizer.py").read_text()
    pattern = next(ast.literal_eval(n.value) for n in ast.parse(source).body
                   if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "PAT_STR")
    ranks = load_tiktoken_bpe(str(t.qwen_tokenizer_file()))
    enc = tiktoken.Encoding("qwen", pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645})
    return lambda text: enc.encode(text, disallowed_special=())


@pytest.mark.parametrize("family", ["mistral", "vicuna", "llama3", "qwen"])
def test_tokenizer_equals_reference(family):
    from transformers import AutoTokenizer

    # as saved with the family's tiny checkpoint and loaded back (sentencepiece: `legacy` persisted)
    tok = AutoTokenizer.from_pretrained(str(tiny_family_dir(family)))
    ref = _reference_encode(family)
    probes = PROBES
    if family in ("mistral", "vicuna"):
        # transformers' sentencepiece conversion (Metaspace, split=False) tokenises runs of spaces and a
        # leading space differently from sentencepiece itself: compared on texts without them
        probes = [p for p in PROBES if "  " not in p and not p.startswith(" ")] + ["A chat. USER: hi ASSISTANT: ok"]
    for text in probes:
        assert tok(text, add_special_tokens=False)["input_ids"] == ref(text), (family, text)
    ids = {"llama3": {"<|begin_of_text|>": 128000, "<|eot_id|>": 128009, "<|start_header_id|>": 128006},
           "qwen": {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
           "mistral": {"<s>": 1, "</s>": 2}, "vicuna": {"<s>": 1, "</s>": 2}}[family]
    assert {k: tok.convert_tokens_to_ids(k) for k in ids} == ids
    # the family's BOS first (qwen: none)
    first = tok("<image>\nWhat is it?")["input_ids"][0]
    assert tok.convert_ids_to_tokens(first) == {"llama3": "<|begin_of_text|>", "qwen": "<image>"}.get(family, "<s>")


SIZES = [(40, 60), (90, 20), (28, 28)]  # (height, width)
MESSAGES = [
    {"role": "system", "content": [{"type": "text", "text": "You answer tersely."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare with "}, {"type": "image"},
                                 {"type": "text", "text": "this one."}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Both are red; the first is larger."}]},
    {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
]


def _turns(messages) -> list[Turn]:
    return [Turn(m["role"], "".join("<image>\n" if c["type"] == "image" else c["text"] for c in m["content"]))
            for m in messages]


def _flat(ids):
    return list(ids[0]) if ids and isinstance(ids[0], list) else list(ids)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_saved_template_gives_training_tokens(family):
    from llava_train.model.load import load_processor

    processor = load_processor(str(tiny_family_dir(family)))  # the template as saved, nothing set here
    assert processor.chat_template == get_family(family).chat_template
    images = [Image.new("RGB", (w, h), (200, 30, 30)) for h, w in SIZES]
    conv = Conversation("x", _turns(MESSAGES), ["a", "b", "c"])
    enc = Encoder(processor.tokenizer, get_family(family), ImageGeometry.from_processor(processor),
                  max_length=10**6).encode(conv, SIZES)
    n_images = 0
    for k, message in enumerate(MESSAGES):
        if message["role"] == "user":
            n_images += sum(c["type"] == "image" for c in message["content"])
        if message["role"] != "assistant":
            continue
        out = processor.apply_chat_template(MESSAGES[:k], add_generation_prompt=True, tokenize=True,
                                            return_dict=True, images=images[:n_images])
        prompt = _flat(out["input_ids"])
        # token for token the training prefix of reply k; the reply's first token is the first trained one
        assert enc.input_ids[: len(prompt)] == prompt, (family, k)
        assert enc.labels[len(prompt) - 1] == IGNORE_INDEX and enc.labels[len(prompt)] != IGNORE_INDEX
    out = processor.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        images=images)
    assert _flat(out["input_ids"]) == enc.input_ids
    assert [bool(m) for m in _flat(out["assistant_masks"])] == [lab != IGNORE_INDEX for lab in enc.labels]
    # every reply ends with the family's end-of-turn token, trained
    eot = processor.tokenizer.convert_tokens_to_ids(EOT[family])
    trained = [t for t in enc.labels if t != IGNORE_INDEX]
    assert trained.count(eot) == 3 and trained[-1] == eot


# --- 2 training steps, export, chat, per family (one shared run each) ----------------------------------------

@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    return {}


def _run_family(family: str, runs: dict, tmp_path_factory):
    if family in runs:
        return runs[family]
    import contextlib
    import io

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from llava_train.cli import CONFIG_DIR
    from llava_train.config.jobs import ExportConfig
    from llava_train.export.run import run as export
    from llava_train.train.recipe import run as train

    tiny_family_dir(family)  # skips when the tokenizer is not available
    root = tmp_path_factory.mktemp(f"family-{family}")
    data = root / "train.json"
    data.write_text(json.dumps(json.loads((DEMO / "train.json").read_text())[:4]))
    out = root / "run"
    overrides = ["model=tiny", f"model.family={family}", "peft=lora", f"output_dir={out}", f"data.train_path={data}",
                 f"data.image_root={DEMO}", "trainer.max_steps=2", "trainer.per_device_train_batch_size=2",
                 "trainer.logging_steps=1", "trainer.save_steps=2", "trainer.disable_tqdm=true",
                 "data.eval_path=null", "eval.enabled=false", "model.modules_to_save=[]"]  # LoRA only: small saves
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="train", overrides=overrides))
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg, str(out))
        export(ExportConfig(source=str(out), dtype="fp32"), str(out / "export"))
    runs[family] = out
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_export_chat(family, family_runs, tmp_path_factory):
    from transformers import AutoProcessor, GenerationConfig

    from llava_train.config.jobs import ChatJobConfig
    from llava_train.config.schema import ModelConfig
    from llava_train.evaluate.chat import Chat, _message

    out = _run_family(family, family_runs, tmp_path_factory)
    template = get_family(family).chat_template
    folders = [out / "final", out / "checkpoint-2", out / "export" / "adapter", out / "export" / "merged"]
    for folder in folders:
        processor = AutoProcessor.from_pretrained(str(folder))
        assert processor.chat_template == template, folder
        assert (folder / "chat_template.jinja").read_text() == template
        eos = GenerationConfig.from_pretrained(str(folder)).eos_token_id
        eot = processor.tokenizer.convert_tokens_to_ids(EOT[family])
        assert eot in (eos if isinstance(eos, list) else [eos]), (folder, eos)

    # `llava chat` (model.family left at its default, mistral: the saved template decides) on the merged export
    chat = Chat(ChatJobConfig(model=ModelConfig(path=str(out / "export" / "merged")), system="Be brief.",
                              max_new_tokens=4))
    assert chat.family.name == family
    image = Image.open(DEMO / json.loads((DEMO / "train.json").read_text())[0]["image"]).convert("RGB")
    convo = chat._start() + [_message("user", "What colour?", 1), _message("assistant", "Red."),
                             _message("user", "And the shape?")]
    got = chat.inputs([convo], [[image]])["input_ids"][0].tolist()
    turns = [Turn("system", "Be brief."), Turn("user", "<image>\nWhat colour?"), Turn("assistant", "Red."),
             Turn("user", "And the shape?")]
    encoder = Encoder(chat.processor.tokenizer, get_family(family), ImageGeometry.from_processor(chat.processor),
                      max_length=10**6)
    size = (image.height, image.width)
    assert got == encoder.encode_prompt(Conversation("x", turns, ["img"]), turns, [size])
    assert isinstance(chat.one_turn("What colour?", [str(DEMO / json.loads((DEMO / "train.json").read_text())[0]
                                                          ["image"])]), str)
    assert re.search(r"llava-train prompt family: " + family, (out / "final" / "chat_template.jinja").read_text())
