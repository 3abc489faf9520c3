"""Speed features switched on by keys, and the up-front checks of where each applies.

- `model.compile`: regional `torch.compile` of the language model's decoder blocks (each block compiled
  on its own: all share one graph, so compile time is that of one block; the vision tower, the anyres
  feature packing and the loss stay eager, which a whole-model compile breaks on).
- `model.liger`: Liger-Kernel's RMSNorm / RoPE / SwiGLU kernels patched into the language model
  instance (Liger only ships a LLaVA-1.5 patch; its Mistral/Llama/Qwen2 patches fit LlavaNext's text
  model). Its fused linear cross entropy is used by train/loss.py on the trained positions.
- `trainer.activation_offloading` without checkpointing: `OffloadActivations` below.
- `trainer.tf32`: TF32 matmuls on Ampere+ (handed to `TrainingArguments(tf32=...)`).
- `model.mask_free_attention`: `without_padding_mask` below.
Selective checkpointing and offloading of checkpointed inputs are transformers' own
(`activation_checkpointing_enable(every_n_layers, offload)`, model/adapt.py).
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import Optional

import torch

from llava_train.constants import ATTENTION_MASK

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# text model_type -> Liger-Kernel's patch function for it
LIGER_PATCHES = {"mistral": "apply_liger_kernel_to_mistral", "llama": "apply_liger_kernel_to_llama",
                 "qwen2": "apply_liger_kernel_to_qwen2"}


def without_padding_mask(inputs: dict) -> dict:
    """A right-padded training batch without its attention mask (`model.mask_free_attention`).

    With right padding every pad position comes after all of its row's real tokens, so plain causal
    attention already keeps each real token from seeing padding: the real positions' outputs, the loss
    (pads are labelled -100) and every gradient are those of the masked forward (tests/model/
    test_speed.py compares them). Without a mask transformers runs attention as `is_causal`: no
    [batch, 1, L, L] mask is built, the CPU and flash kernels skip the masked upper triangle, and on a GPU
    sdpa may take its flash kernel, which an explicit mask rules out. Position ids stay 0..L-1 per row,
    the real tokens' own. Only the pad positions' (unused) outputs change. The collator pads training
    batches on the right (data/collate.py) and packed rows carry no mask, so this applies to every
    training and eval-loss batch; generation pads left and never comes here."""
    return {k: v for k, v in inputs.items() if k != ATTENTION_MASK}


def llava_model(model: torch.nn.Module):
    """The `LlavaNextModel` inside any wrapper (peft, DDP, DeepSpeed)."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    inner = [m for m in model.modules() if isinstance(m, LlavaNextModel)]
    if len(inner) != 1:
        raise ValueError(f"expected one LlavaNextModel inside {type(model).__name__}, found {len(inner)}")
    return inner[0]


def compile_language_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """`torch.compile` each decoder block of the language model in place; returns how many."""
    layers = llava_model(model).language_model.layers
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


def apply_liger(model: torch.nn.Module) -> str:
    """Patch Liger's kernels into the language model instance (before peft wraps it); returns the patch used."""
    import liger_kernel.transformers as liger

    language = llava_model(model).language_model
    name = LIGER_PATCHES[language.config.model_type]
    getattr(liger, name)(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                         fused_linear_cross_entropy=False, model=language)
    return name


def tf32_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def resolve_tf32(value: Optional[bool]) -> Optional[bool]:
    """`trainer.tf32` for TrainingArguments: None -> on where supported (None = leave torch's default)."""
    if value is None:
        return True if tf32_supported() else None
    return value if (value or torch.cuda.is_available()) else None


def _cxx_available() -> bool:
    from torch._inductor import config as inductor_config

    names = inductor_config.cpp.cxx if isinstance(inductor_config.cpp.cxx, tuple) else (inductor_config.cpp.cxx,)
    return any(n and shutil.which(n) for n in (*names, "g++", "clang++"))


def liger_text_problems(model_cfg, text_model_type: str) -> list[str]:
    """model.liger against the checkpoint's text model type (config.json's text_config.model_type)."""
    if not model_cfg.liger or text_model_type in LIGER_PATCHES:
        return []
    return [f"model.liger=true: Liger has no patch for this checkpoint's text model ({text_model_type!r}); "
            f"supported: {sorted(LIGER_PATCHES)}"]


def speed_problems(model_cfg, trainer_cfg) -> list[str]:
    """What is wrong with the speed keys (model.compile/liger/loss_chunk_tokens, checkpointing, offloading,
    tf32) on this machine."""
    m, t = model_cfg, trainer_cfg
    cuda = torch.cuda.is_available()
    problems = []
    if m.compile:
        if m.compile_backend not in COMPILE_BACKENDS:
            problems.append(f"model.compile_backend={m.compile_backend!r}: use one of {list(COMPILE_BACKENDS)}")
        elif m.compile_backend == "inductor" and cuda and importlib.util.find_spec("triton") is None:
            problems.append("model.compile=true with the inductor backend needs Triton on a GPU (pip install triton), "
                            "or set model.compile_backend=aot_eager")
        elif m.compile_backend == "inductor" and not cuda and not _cxx_available():
            problems.append("model.compile=true with the inductor backend on CPU needs a C++ compiler (g++/clang++) "
                            "on PATH; install one, or set model.compile_backend=aot_eager, or model.compile=false")
    if m.liger:
        if not cuda:
            problems.append("model.liger=true needs a CUDA GPU: Liger-Kernel's kernels are Triton kernels; this "
                            "machine has none (set model.liger=false; model.loss_chunk_tokens works on CPU)")
        elif importlib.util.find_spec("liger_kernel") is None:
            problems.append("model.liger=true but the liger-kernel package is not installed (pip install liger-kernel)")
        if m.loss_chunk_tokens:
            problems.append("model.liger=true brings its own fused linear cross entropy: leave "
                            "model.loss_chunk_tokens=0")
    if m.loss_chunk_tokens < 0:
        problems.append(f"model.loss_chunk_tokens={m.loss_chunk_tokens} must be >= 0 (0: no chunking)")
    if t.checkpoint_every_n_layers < 1:
        problems.append(f"trainer.checkpoint_every_n_layers={t.checkpoint_every_n_layers} must be >= 1")
    elif t.checkpoint_every_n_layers > 1 and not t.gradient_checkpointing:
        problems.append("trainer.checkpoint_every_n_layers > 1 selects which layers are checkpointed: also set "
                        "trainer.gradient_checkpointing=true")
    if t.activation_offloading and not cuda:
        problems.append("trainer.activation_offloading=true moves activations from GPU to CPU memory; on a CPU-only "
                        "machine they already are there: set it to false")
    if t.tf32 and not tf32_supported():
        problems.append("trainer.tf32=true needs an Ampere or newer NVIDIA GPU (compute capability >= 8.0); "
                        "leave it null (on where supported)")
    return problems


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Tensors autograd saves in forward go to (pinned) CPU memory and come back in backward.

    Unlike `torch.autograd.graph.save_on_cpu`, parameters (and views of them: the weights a linear
    saves for its input gradient) stay where they are, so a step copies activations only, never the
    model; tensors under `min_numel` elements stay too (not worth a transfer). `force_copy` also copies
    tensors already on the CPU (tests use it to exercise pack/unpack on a CPU-only machine).
    """

    def __init__(self, model: torch.nn.Module, *, min_numel: int = 1024, force_copy: bool = False):
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}
        self.min_numel, self.force_copy = min_numel, force_copy
        self.offloaded = self.kept_weights = 0
        pin = torch.cuda.is_available()

        def pack(tensor: torch.Tensor):
            if tensor.untyped_storage().data_ptr() in self.weights:
                self.kept_weights += 1
                return tensor
            if tensor.numel() < self.min_numel or (tensor.device.type == "cpu" and not self.force_copy):
                return tensor
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout,
                               pin_memory=pin and tensor.device.type != "cpu")
            host.copy_(tensor, non_blocking=pin)
            self.offloaded += 1
            return tensor.device, host

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=pin)

        super().__init__(pack, unpack)
