"""`llava plan`: what a composed training config needs per GPU, before any GPU or weight is touched.

The model is built on the meta device from the checkpoint's config.json (or the tabled config of a
released checkpoint, `llava_train/model/catalog.py`), in `model.dtype`, and wrapped exactly as training
wraps it (`apply_peft`), so which parameters train, and in which dtype, is read off real module trees.
The terms, per GPU (N = world size, b = bytes per element of the model dtype):

- **parameters**: every parameter's numel x its dtype size, split into trainable / frozen / quantised.
  QLoRA's quantised linears (every language-model `nn.Linear` outside `peft.quant_skip_modules`) count
  4-bit: 0.5 byte per weight + one absmax per 64 weights (1 byte with double quantisation, plus one fp32
  per 256 blocks; 4 bytes without); 8-bit: 1 byte per weight + one fp32 scale per output row. Outside
  ZeRO-3, k-bit preparation upcasts the other 16-bit parameters to fp32 (as `apply_peft` does).
  ZeRO-3 divides parameters by N (QLoRA: the packed 4-bit weights; their absmax state stays whole on every
  rank) and adds the largest decoder layer gathered for compute;
  `offload_param` keeps only that gathered layer on the GPU.
- **gradients**: trainable numel x its dtype size; divided by N from ZeRO-2 on.
- **optimizer**: plain (no DeepSpeed): torch AdamW, two states in each parameter's dtype plus a 4-byte
  step per tensor. DeepSpeed ZeRO: an fp32 master copy and two fp32 states (12 bytes per trainable
  parameter) divided by N; `offload_optimizer` moves them to CPU memory.
- **activations per sample**, for T tokens (the longest sample: the checkpoint's largest image plus
  `plan.text_tokens`, capped at `data.max_length`; or the longest sample `plan.scan_data=true` finds) and
  a decoder of L layers, hidden h, key/value width h_kv, MLP width i. What autograd saves per token and
  layer when every linear is trained or carries LoRA (the default targets, and full fine-tuning):
  the attention block's normed input (b h), roped q and k (b (h + h_kv)), v (b h_kv), the attention
  output and its reshaped copy (2 b h); the MLP block's normed input (b h), gate, up, activated gate and
  their product (4 b i); and, for 16-bit models, the fp32 copies RMSNorm makes (2 x 4 h). That is
  b (5h + 2 h_kv + 4i) + 8h bytes. LoRA adds lora_A's outputs (7 r a, a the adapters' dtype size) and,
  when the adapters are fp32 beside a 16-bit base, the fp32 copies of the seven linears' inputs peft casts
  (a (6h + i)). Without checkpointing all L layers keep it; with checkpointing each
  layer keeps only its input (b h) and one layer's worth is rebuilt during backward. The frozen vision
  tower saves nothing; the trained projector saves its inputs for every image patch token.
- **logits**: the loss projects only trained positions onto the vocabulary (`logits_to_keep`): R trained
  tokens x vocabulary x (b + 4 + 4) (the logits, their fp32 upcast for cross-entropy, its gradient).
  R is bounded by the text tokens.
- **total**: the sum, plus `plan.overhead_gb` (CUDA context, workspaces), times 1 + `plan.headroom`.

Per optimizer step: N x per-device batch x accumulation samples of at most T tokens; steps per epoch
from the sample count (`plan.scan_data` or `plan.num_samples`); wall time from `plan.tokens_per_second`.
`llava train` on a CUDA machine builds the same plan and refuses up front when the total exceeds the
visible GPU memory (`plan.check=false` skips it); that path is not exercised on CPU-only CI.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from llava_train.config import TrainJobConfig
from llava_train.model.load import DTYPES, checkpoint_config, resolve_checkpoint

GB = 2**30  # GiB: what "an 80GB GPU" holds and what torch reports
PEFT_PREFIX = "base_model.model."


@dataclass
class DataStats:
    """What the plan needs from the training data (from `llava doctor`'s scan, or assumed)."""

    max_tokens: int  # longest sample (tokens, images expanded), capped at data.max_length
    trained_tokens: int  # trained positions per (longest) sample, bounded by its text tokens
    num_samples: Optional[int]  # samples per epoch
    source: str  # where the figures come from


@dataclass
class Plan:
    """Bytes per GPU (and in CPU memory when offloaded) of one training config."""

    checkpoint: str
    world_size: int
    zero_stage: int
    params_trainable: int = 0
    params_frozen: int = 0
    params_quantised: int = 0
    quant_state: int = 0  # of params_quantised: the 4-bit absmax state, which ZeRO-3 does not partition
    trainable_numel: int = 0
    total_numel: int = 0
    gradients: int = 0
    optimizer: int = 0
    cpu_offloaded: int = 0
    activations_sample: int = 0  # with the configured checkpointing
    activations_sample_ckpt: int = 0
    activations_sample_no_ckpt: int = 0
    logits_sample: int = 0
    samples_per_device_step: int = 1
    overhead: int = 0
    headroom: float = 0.1
    gpu_memory: int = 0
    gradient_checkpointing: bool = False
    stats: Optional[DataStats] = None
    tokens_per_step: int = 0
    steps_per_epoch: Optional[int] = None
    max_steps: int = -1
    seconds_per_epoch: Optional[float] = None
    notes: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return self.params_trainable + self.params_frozen + self.params_quantised

    @property
    def activations(self) -> int:
        return (self.activations_sample + self.logits_sample) * self.samples_per_device_step

    @property
    def total(self) -> int:
        subtotal = self.parameters + self.gradients + self.optimizer + self.activations + self.overhead
        return int(subtotal * (1 + self.headroom))

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    def render(self) -> str:
        g = lambda n: f"{n / GB:8.2f} GiB"  # noqa: E731
        s = self.stats
        ck = "on" if self.gradient_checkpointing else "off"
        lines = [
            f"plan for {self.checkpoint}: {self.world_size} GPU(s), "
            f"{'ZeRO-' + str(self.zero_stage) if self.zero_stage else 'no DeepSpeed'}",
            f"  parameters   {g(self.parameters)}  (trainable {self.params_trainable / GB:.2f}, frozen "
            f"{self.params_frozen / GB:.2f}, quantised {self.params_quantised / GB:.2f}; "
            f"{self.trainable_numel / 1e6:.1f}M of {self.total_numel / 1e9:.2f}B parameters train)",
            f"  gradients    {g(self.gradients)}",
            f"  optimizer    {g(self.optimizer)}",
            f"  activations  {g(self.activations_sample)} per sample (checkpointing {ck}; "
            f"with: {self.activations_sample_ckpt / GB:.2f} GiB, without: {self.activations_sample_no_ckpt / GB:.2f}"
            f" GiB) for {s.max_tokens} tokens ({s.source})",
            f"  logits       {g(self.logits_sample)} per sample ({s.trained_tokens} trained positions projected)",
            f"  x {self.samples_per_device_step} sample(s) per device step = {self.activations / GB:.2f} GiB",
            f"  overhead     {g(self.overhead)}  (CUDA context, workspaces)",
            f"  total        {g(self.total)}  (with {self.headroom:.0%} headroom) of {self.gpu_memory / GB:.0f} GiB "
            f"per GPU: {'fits' if self.fits else 'DOES NOT FIT'}",
        ]
        if self.cpu_offloaded:
            lines.append(f"  CPU memory   {g(self.cpu_offloaded)}  offloaded per GPU (ZeRO offload)")
        lines.append(f"  tokens per optimizer step: <= {self.tokens_per_step:,}")
        if self.steps_per_epoch is not None:
            lines.append(f"  steps per epoch: {self.steps_per_epoch:,}")
        if self.max_steps > 0:
            lines.append(f"  trainer.max_steps={self.max_steps} ends the run first when smaller")
        if self.seconds_per_epoch is not None:
            lines.append(f"  wall time per epoch: {self.seconds_per_epoch / 3600:.1f} h")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def world_size(cfg: TrainJobConfig, *, assumed: bool = True) -> int:
    if assumed and cfg.plan.world_size:
        return cfg.plan.world_size
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return max(torch.cuda.device_count(), 1)


def gpu_memory(cfg: TrainJobConfig, *, assumed: bool = True) -> int:
    if assumed and cfg.plan.gpu_memory_gb:
        return int(cfg.plan.gpu_memory_gb * GB)
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return int(80 * GB)


def meta_training_model(cfg: TrainJobConfig, config):
    """The model as training wraps it, on the meta device (QLoRA: LoRA on an unquantised tree; the
    quantised bytes are computed in `parameter_bytes`)."""
    from llava_train.model.adapt import apply_peft
    from llava_train.model.load import meta_model

    with torch.device("meta"):
        model = meta_model(config).to(DTYPES[cfg.model.dtype])  # the public constructor; meta tensors cast free
        peft = replace(cfg.peft, method="lora") if cfg.peft.method == "qlora" else cfg.peft
        return apply_peft(model, peft, cfg.model, zero_stage=cfg.deepspeed.stage)


def _quantised(name: str, module, cfg: TrainJobConfig) -> bool:
    base = name.removeprefix(PEFT_PREFIX)
    return (isinstance(module, torch.nn.Linear) and "lora_" not in base and "modules_to_save" not in base
            and "original_module" not in base
            and not any(base == s or base.startswith(s + ".") for s in cfg.peft.quant_skip_modules))


def quantised_bytes(weight: torch.Tensor, cfg: TrainJobConfig) -> tuple[int, int]:
    """(packed weight bytes, quantisation-state bytes) of one quantised linear's weight."""
    n = weight.numel()
    if cfg.peft.bits == 8:
        return n, 4 * weight.shape[0]
    blocks = math.ceil(n / 64)
    absmax = blocks + 4 * math.ceil(blocks / 256) if cfg.peft.double_quant else 4 * blocks
    return math.ceil(n / 2), absmax


def parameter_bytes(model, cfg: TrainJobConfig, plan: Plan) -> None:
    qlora = cfg.peft.method == "qlora"
    upcast = qlora and cfg.deepspeed.stage != 3  # prepare_model_for_kbit_training
    quantised = set()
    if qlora:
        for name, module in model.named_modules():
            if _quantised(name, module, cfg):
                quantised.add(id(module.weight))
                packed, state = quantised_bytes(module.weight, cfg)
                plan.params_quantised += packed + state
                plan.quant_state += state
    tensors = 0
    for _, p in model.named_parameters():
        plan.total_numel += p.numel()
        if id(p) in quantised:
            continue
        size = p.element_size()
        if upcast and p.dtype in (torch.float16, torch.bfloat16):
            size = 4
        if p.requires_grad:
            plan.trainable_numel += p.numel()
            plan.params_trainable += p.numel() * size
            plan.gradients += p.numel() * size
            plan.optimizer += 2 * p.numel() * size
            tensors += 1
        else:
            plan.params_frozen += p.numel() * size
    plan.optimizer += 4 * tensors  # torch AdamW's step counter per tensor


def apply_zero(plan: Plan, cfg: TrainJobConfig, layer_bytes: int) -> None:
    """Divide what each ZeRO stage partitions; move what offload moves to the CPU."""
    ds, n = cfg.deepspeed, plan.world_size
    if ds.stage == 0:
        return
    plan.optimizer = math.ceil(12 * plan.trainable_numel / n)
    if ds.stage >= 2:
        plan.gradients = math.ceil(plan.gradients / n)
    if ds.offload_optimizer:
        plan.cpu_offloaded += plan.optimizer + math.ceil(4 * plan.trainable_numel / n)
        plan.optimizer = 0
    if ds.stage == 3:
        # a bitsandbytes weight's quantisation state is a Python attribute of the parameter: ZeRO-3 partitions
        # the packed weights (peft.quant_storage) but every rank keeps the whole state (the 2-rank QLoRA test's
        # shard report, tests/train/test_distributed.py)
        packed = plan.params_quantised - plan.quant_state
        parts = [math.ceil(plan.params_trainable / n), math.ceil(plan.params_frozen / n),
                 math.ceil(packed / n) + plan.quant_state]
        if ds.offload_param:
            plan.cpu_offloaded += sum(parts)
            parts = [0, 0, 0]
        plan.params_trainable, plan.params_frozen, plan.params_quantised = parts
        plan.params_frozen += layer_bytes  # the decoder layer gathered for compute
        plan.notes.append(f"ZeRO-3 gathers one decoder layer at a time ({layer_bytes / GB:.2f} GiB, counted)")


def activation_bytes(config, dtype: torch.dtype, tokens: int, image_tokens: int, peft_trains_projector: bool,
                     checkpointing: bool, lora_r: int = 0, adapter_dtype: Optional[torch.dtype] = None) -> int:
    t = config.text_config
    h, i, layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    head_dim = getattr(t, "head_dim", None) or h // t.num_attention_heads
    hkv = t.num_key_value_heads * head_dim
    b = torch.empty((), dtype=dtype).element_size()
    per_token_layer = b * (5 * h + 2 * hkv + 4 * i) + (8 * h if b < 4 else 0)
    if lora_r:  # LoRA on the 7 linears: lora_A's outputs; inputs cast to the adapters' dtype are copies
        a = torch.empty((), dtype=adapter_dtype or dtype).element_size()
        per_token_layer += 7 * lora_r * a + (a * (6 * h + i) if a != b else 0)
    if checkpointing:
        lm = layers * tokens * b * h + tokens * per_token_layer
    else:
        lm = layers * tokens * per_token_layer
    projector = 0
    if peft_trains_projector and image_tokens:
        v = config.vision_config
        patch_tokens = (v.image_size // v.patch_size) ** 2
        crops = max(ph * pw for ph, pw in config.image_grid_pinpoints) // (v.image_size ** 2) + 1
        projector = crops * patch_tokens * b * (v.hidden_size + 2 * h)
    return lm + projector


def adapter_dtype(model) -> Optional[torch.dtype]:
    """The LoRA weights' dtype (fp32 beside a 16-bit base, except under ZeRO-3: see `apply_peft`)."""
    return next((p.dtype for n, p in model.named_parameters() if "lora_A" in n), None)


def assumed_stats(cfg: TrainJobConfig, image_tokens: int) -> DataStats:
    tokens = min(cfg.data.max_length, image_tokens + cfg.plan.text_tokens)
    return DataStats(tokens, min(cfg.plan.text_tokens, tokens), cfg.plan.num_samples,
                     f"largest image {image_tokens} + {cfg.plan.text_tokens} text tokens")


def scanned_stats(cfg: TrainJobConfig) -> DataStats:
    """Sample count, longest sample and trained tokens from the same scan `llava doctor` runs."""
    import sys

    from llava_train.data.dataset import as_sources
    from llava_train.data.encoder import Encoder
    from llava_train.inspection.doctor import Report, check_source
    from llava_train.inspection.preview import load_encoder

    _, bounded = load_encoder(cfg.model, cfg.data)
    full = Encoder(bounded.tok, bounded.family, bounded.geometry, max_length=sys.maxsize, overflow="drop_turns",
                   last_turn_only=cfg.data.train_last_turn_only)
    report = Report("train")
    for source in as_sources(cfg.data.train_path, cfg.data):
        check_source(source, cfg.data, full, bounded, workers=os.cpu_count() or 1, progress=False, report=report)
    count = len(report.lengths)
    longest = min(max(report.lengths, default=0), cfg.data.max_length)
    trained = math.ceil(report.trained_tokens / max(count, 1))
    return DataStats(longest, trained, count, f"longest of {count} scanned samples; mean trained {trained}")


def build(cfg: TrainJobConfig, stats: Optional[DataStats] = None, *, assumed_hardware: bool = True) -> Plan:
    """The plan of `cfg`; `assumed_hardware=False` ignores plan.world_size / plan.gpu_memory_gb (the fit
    check of a real launch uses the GPUs it runs on)."""
    from llava_train.model.catalog import geometry, largest_image_tokens

    checkpoint = resolve_checkpoint(cfg.model)
    config = checkpoint_config(checkpoint)
    plan = Plan(checkpoint=cfg.model.path, world_size=world_size(cfg, assumed=assumed_hardware),
                zero_stage=cfg.deepspeed.stage, headroom=cfg.plan.headroom, overhead=int(cfg.plan.overhead_gb * GB),
                gpu_memory=gpu_memory(cfg, assumed=assumed_hardware),
                gradient_checkpointing=cfg.trainer.gradient_checkpointing)
    model = meta_training_model(cfg, config)
    parameter_bytes(model, cfg, plan)
    if cfg.deepspeed.stage:
        layer = re.compile(r".*language_model\.layers\.0\.")
        layer_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if layer.match(n))
        apply_zero(plan, cfg, layer_bytes)
    image_tokens = largest_image_tokens(geometry(config))
    plan.stats = stats = stats or (scanned_stats(cfg) if cfg.plan.scan_data else assumed_stats(cfg, image_tokens))
    dtype = DTYPES[cfg.model.dtype]
    args = (config, dtype, stats.max_tokens, image_tokens, cfg.peft.train_projector)
    lora = {"lora_r": cfg.peft.r, "adapter_dtype": adapter_dtype(model)} if cfg.peft.method != "full" else {}
    plan.activations_sample_ckpt = activation_bytes(*args, checkpointing=True, **lora)
    plan.activations_sample_no_ckpt = activation_bytes(*args, checkpointing=False, **lora)
    plan.activations_sample = (plan.activations_sample_ckpt if cfg.trainer.gradient_checkpointing
                               else plan.activations_sample_no_ckpt)
    b = torch.empty((), dtype=dtype).element_size()
    plan.logits_sample = stats.trained_tokens * config.text_config.vocab_size * (b + 4 + 4)
    t, d = cfg.trainer, cfg.data
    per_device = t.per_device_train_batch_size
    if d.max_tokens_per_batch:  # a token budget: as many samples as fit
        per_device = max(1, d.max_tokens_per_batch // max(stats.max_tokens, 1))
    plan.samples_per_device_step = per_device
    plan.max_steps = t.max_steps
    samples_per_step = plan.world_size * per_device * t.gradient_accumulation_steps
    plan.tokens_per_step = samples_per_step * (d.max_length if d.packing else stats.max_tokens)
    if stats.num_samples:
        plan.steps_per_epoch = math.ceil(stats.num_samples / samples_per_step)
        if cfg.plan.tokens_per_second:
            plan.seconds_per_epoch = (plan.steps_per_epoch * plan.tokens_per_step
                                      / (cfg.plan.tokens_per_second * plan.world_size))
    return plan


KEYS_TO_CHANGE = ("trainer.per_device_train_batch_size (with trainer.gradient_accumulation_steps for the same "
                  "global batch)", "trainer.gradient_checkpointing=true", "deepspeed=zero2|zero3|zero3_offload",
                  "peft=lora|qlora", "data.max_length")


def fit_problems(cfg: TrainJobConfig) -> list[str]:
    """On a CUDA machine: the plan's total against the visible GPU memory (one problem with the plan)."""
    if not (cfg.plan.check and torch.cuda.is_available()):
        return []
    plan = build(cfg, assumed_hardware=False)
    if plan.fits:
        return []
    return [f"the run does not fit the GPU ({plan.total / GB:.1f} GiB planned per GPU, {plan.gpu_memory / GB:.1f} GiB "
            f"available); change {', '.join(KEYS_TO_CHANGE)} (or plan.check=false to try anyway):\n"
            + plan.render()]


def run(cfg: TrainJobConfig) -> Plan:
    plan = build(cfg)
    print(plan.render(), flush=True)
    return plan
