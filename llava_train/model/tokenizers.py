"""Real tokenizers of each prompt family that can be had offline, as HF fast tokenizers (for the tiny model
of that family and the tests; a real checkpoint brings its own).

- mistral: `mistral-common`'s `data/tokenizer.model.v1` (Mistral-7B sentencepiece, 32000 ids);
- vicuna: a Llama-2 `tokenizer.model` ($LLAVA_TRAIN_LLAMA2_TOKENIZER, else `../shared/tokenizers/llama2/`
  beside the repository): Llama-2 sentencepiece, 32000 ids, Vicuna v1.5's vocabulary;
- llama3: `llama-models`' `llama_models/llama3/tokenizer.model`: Meta's Llama-3 tiktoken BPE, 128000 ids +
  256 special tokens;
- qwen: `dashscope`'s `dashscope/resources/qwen.tiktoken`: the Qwen byte-level BPE, 151643 ids, + Qwen2's
  `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`;
- chatml: a *stand-in*, the Mistral tokenizer plus `<|im_start|>`/`<|im_end|>` and no BOS (Yi-34B's tokenizer
  is not available offline).

The tiktoken files are converted with transformers' `TikTokenConverter` and the packages are never imported
(only their files are read: `llama-models` and `dashscope` pull in servers and clients we do not need); the
tests check every conversion against `tiktoken` / sentencepiece on probe texts. Each tokenizer gets
`<image>` as an added special token, as the llava-hf checkpoints have it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from llava_train.constants import IMAGE_TOKEN

# The pre-tokenisation patterns of the reference tokenizers (llama_models/llama3/tokenizer.py `pat_str`;
# dashscope/tokenizers/qwen_tokenizer.py `PAT_STR`, which Qwen2's tokenizer.json also uses).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIAL))]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

FAMILIES_WITH_TOKENIZERS = ("mistral", "vicuna", "chatml", "llama3", "qwen")
STAND_IN = {"chatml": "the Mistral-7B tokenizer plus <|im_start|>/<|im_end|> (Yi-34B's is not available offline)"}


def package_file(dist: str, relative: str) -> Path:
    """A file shipped by an installed distribution, found without importing it."""
    try:
        path = Path(metadata.distribution(dist).locate_file(relative))
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the {dist!r} package is not installed (pip install {dist}); it ships {relative}") \
            from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: reinstall {dist}")
    return path


def mistral_tokenizer_file() -> Path:
    return package_file("mistral-common", "mistral_common/data/tokenizer.model.v1")


def llama2_tokenizer_file() -> Path:
    env = os.environ.get("LLAVA_TRAIN_LLAMA2_TOKENIZER")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "llama2" / "tokenizer.model")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError("no Llama-2 tokenizer.model: set LLAVA_TRAIN_LLAMA2_TOKENIZER to one (looked in "
                            + ", ".join(map(str, candidates)) + ")")


def llama3_tokenizer_file() -> Path:
    return package_file("llama-models", "llama_models/llama3/tokenizer.model")


def qwen_tokenizer_file() -> Path:
    return package_file("dashscope", "dashscope/resources/qwen.tiktoken")


def _sentencepiece(model_file: Path, extra_special: list[str] = (), add_bos: bool = True):
    """A sentencepiece model as a fast Llama tokenizer (BOS added unless `add_bos=False`, `legacy=False` so
    the ids after a special token do not change on reload; persisted by `save_tokenizer`)."""
    from transformers import LlamaTokenizer

    src = Path(tempfile.mkdtemp())
    try:
        # Converting needs the file named tokenizer.model inside a folder; constructing the class with
        # vocab_file= builds a 3-token vocabulary instead.
        shutil.copy(model_file, src / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(str(src), add_bos_token=add_bos, add_eos_token=False, legacy=False)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    tok.add_tokens([IMAGE_TOKEN, *extra_special], special_tokens=True)
    tok.pad_token = tok.unk_token  # llava-v1.6-mistral/vicuna pad with <unk> (id 0)
    return tok


def _tiktoken(model_file: Path, pattern: str, special: list[str], *, bos: str | None, eos: str, pad: str,
              normalize_nfc: bool = False):
    from tokenizers import normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(model_file), pattern=pattern, extra_special_tokens=special).converted()
    if normalize_nfc:  # Qwen2's tokenizer.json normalises to NFC
        backend.normalizer = normalizers.NFC()
    if bos:  # Llama-3's tokenizer.json adds <|begin_of_text|> in front
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, bos_id)]),
        ])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                  clean_up_tokenization_spaces=False)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tok


def build_family_tokenizer(family: str):
    """The real (or, for chatml, stand-in) tokenizer of a prompt family, `<image>` added."""
    if family == "mistral":
        return _sentencepiece(mistral_tokenizer_file())
    if family == "vicuna":
        return _sentencepiece(llama2_tokenizer_file())
    if family == "chatml":
        # Yi's chat tokenizer adds no BOS (llava-v1.6-34b prompts start with <|im_start|>)
        return _sentencepiece(mistral_tokenizer_file(), ["<|im_start|>", "<|im_end|>"], add_bos=False)
    if family == "llama3":
        # llama3-llava-next-8b: eos <|eot_id|> (Llama-3-Instruct), an added <pad>
        tok = _tiktoken(llama3_tokenizer_file(), LLAMA3_PATTERN, LLAMA3_SPECIAL, bos="<|begin_of_text|>",
                        eos="<|eot_id|>", pad="<|finetune_right_pad_id|>")
        return tok
    if family == "qwen":
        return _tiktoken(qwen_tokenizer_file(), QWEN_PATTERN, QWEN_SPECIAL, bos=None, eos="<|im_end|>",
                         pad="<|endoftext|>", normalize_nfc=True)
    raise ValueError(f"no tokenizer for prompt family {family!r}; choose one of {FAMILIES_WITH_TOKENIZERS}")


def save_tokenizer(tok, folder: Path) -> None:
    """`save_pretrained`, then persist what transformers leaves out of a sentencepiece tokenizer's config
    (`legacy`: without it a reload changes the ids after `<image>`)."""
    tok.save_pretrained(str(folder))
    persist_tokenizer_settings(tok, folder)


def persist_tokenizer_settings(tok, folder: Path) -> None:
    from transformers import LlamaTokenizer

    if isinstance(tok, LlamaTokenizer):
        cfg_path = Path(folder) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update({"legacy": False, "add_bos_token": bool(tok.add_bos_token), "add_eos_token": False})
        cfg_path.write_text(json.dumps(cfg, indent=2))
