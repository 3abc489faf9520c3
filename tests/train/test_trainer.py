"""The trainer's own duties beyond HF's: here, that a finished run leaves no DataLoader worker behind."""

import multiprocessing

from conftest import DEMO


def test_finished_run_leaves_no_dataloader_workers(tmp_path):
    """Persistent workers live as long as their loader. Were the finished trainer kept alive, or only freed
    by the cyclic GC (which closes the loader's queues before torch's shutdown sends its stop sentinel: torch
    then waits 2 x 5 s and cannot SIGTERM our workers, which ignore it), every run in one process (`--multirun`,
    a library user's loop) would leave its workers running. The benchmark's own reference cycle did exactly
    that (benchmarks/train_throughput.py, `_teardown`); the recipe must not."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from llava_train.cli import CONFIG_DIR
    from llava_train.train.recipe import run

    def workers() -> set[int]:
        return {c.pid for c in multiprocessing.active_children() if c.daemon}

    before = workers()
    overrides = ["model=tiny", "peft=lora", f"data.train_path={DEMO / 'train.json'}", f"data.image_root={DEMO}",
                 "data.eval_path=null", "eval.enabled=false", "data.num_workers=2", "trainer.max_steps=2",
                 "trainer.per_device_train_batch_size=4", "trainer.disable_tqdm=true"]
    for job in ("a", "b"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = OmegaConf.to_object(compose(config_name="train",
                                              overrides=[*overrides, f"output_dir={tmp_path / job}"]))
        run(cfg, str(tmp_path / job))
        assert workers() == before, f"after run {job}: DataLoader workers still alive"
