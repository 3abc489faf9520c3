"""`llava train` under a multi-rank launcher, plus one callback: once checkpoint STEP is sealed, rank 0
SIGKILLs its whole process group (the launcher and every rank) - a node failure, not a clean stop.

    deepspeed --num_gpus 2 --no_local_rank tests/train/kill_worker.py STEP OUTPUT_DIR OVERRIDE...
"""

import os
import signal
import sys

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import TrainerCallback

from llava_train.cli import CONFIG_DIR
from llava_train.config.demo import demo_overrides
from llava_train.train.recipe import run

step, out, *overrides = sys.argv[1:]


class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        # HF calls on_save after LlavaTrainer._save_checkpoint, which publishes the checkpoint once every rank
        # has written it and it is sealed
        if state.global_step == int(step) and state.is_world_process_zero:
            os.killpg(os.getpgid(0), signal.SIGKILL)


with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
    cfg = OmegaConf.to_object(compose("train", overrides=demo_overrides("train", overrides)))  # as the CLI
run(cfg, out, callbacks=[KillAfterSave()])
