"""Run by tests/evaluate/test_sharded_generation.py under torchrun: 2 gloo ranks generate their shards
of the eval set with synced_gpus=True; rank 0 writes the gathered predictions."""

import json
import sys

import torch.distributed as dist

from llava_train.config.schema import DataConfig
from llava_train.data.dataset import ConversationDataset, Encoder
from llava_train.data.images import ImageGeometry
from llava_train.data.templates import get_family
from llava_train.evaluate.generate import generate_predictions
from llava_train.model.inference import load_for_inference, load_processor_for, resolve

run_dir, eval_path, image_root, n, out = sys.argv[1:]
dist.init_process_group("gloo")
resolved = resolve(run_dir)
processor = load_processor_for(resolved)
model = load_for_inference(resolved, device="cpu")
encoder = Encoder(processor.tokenizer, get_family("mistral"), ImageGeometry.from_processor(processor), max_length=4096)
ds = ConversationDataset(eval_path, DataConfig(train_path=eval_path, image_root=image_root), encoder,
                         processor.image_processor)
preds = generate_predictions(model, ds, processor.tokenizer, batch_size=2, indices=range(int(n)), synced_gpus=True)
if dist.get_rank() == 0:
    with open(out, "w") as f:
        json.dump([{"id": p.id, "prediction": p.prediction} for p in preds], f)
dist.barrier()
dist.destroy_process_group()
