"""Run by tests/evaluate/test_zero3_generation.py under torchrun: a merged model loaded under DeepSpeed
ZeRO-3 (weights partitioned across 2 CPU ranks, gloo); every rank generates its shard of the eval set
through `generate_predictions` (synced_gpus chosen automatically); rank 0 writes the predictions."""

import json
import sys

import deepspeed
import torch.distributed as dist
from transformers import AutoProcessor, LlavaNextForConditionalGeneration
from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

from llava_train.config.schema import DataConfig
from llava_train.data.dataset import ConversationDataset
from llava_train.data.encoder import Encoder
from llava_train.data.images import ImageGeometry
from llava_train.data.templates import get_family
from llava_train.evaluate.generate import generate_predictions

merged, eval_path, image_root, n, out = sys.argv[1:]
deepspeed.init_distributed(dist_backend="gloo")
ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_pretrained partition the weights (zero.Init)
assert is_deepspeed_zero3_enabled()
engine, *_ = deepspeed.initialize(model=LlavaNextForConditionalGeneration.from_pretrained(merged), config=ds_config)
model = engine.module.eval()
partitioned = all(p.numel() == 0 for p in model.parameters())
processor = AutoProcessor.from_pretrained(merged)
encoder = Encoder(processor.tokenizer, get_family("mistral"), ImageGeometry.from_processor(processor), max_length=4096)
ds = ConversationDataset(eval_path, DataConfig(train_path=eval_path, image_root=image_root), encoder,
                         processor.image_processor)
preds = generate_predictions(model, ds, processor.tokenizer, batch_size=2, indices=range(int(n)))
if dist.get_rank() == 0:
    with open(out, "w") as f:
        json.dump({"partitioned": partitioned, "predictions": [{"id": p.id, "prediction": p.prediction}
                                                                for p in preds]}, f)
dist.barrier()
dist.destroy_process_group()
