"""The sparse loss (logits only at trained positions) equals the model's own full-vocabulary loss."""

import torch

from conftest import DEMO
from llava_train.config import DataConfig
from llava_train.data.collate import Collator
from llava_train.data.dataset import ConversationDataset
from llava_train.train.loss import sparse_lm_loss


def test_sparse_loss_equals_model_loss(tiny_model, processor, encoder):
    ds = ConversationDataset(str(DEMO / "train.json"), DataConfig(train_path=str(DEMO / "train.json")), encoder,
                             processor.image_processor)
    # a mix: single image, multi-turn, text-only
    idx = [0, 11, 17, 3]
    batch = Collator(pad_token_id=0)([ds[i] for i in idx])
    with torch.no_grad():
        full = tiny_model(**batch).loss
        sparse, _ = sparse_lm_loss(tiny_model, batch)
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-6)
