"""`llava export` reads the run's saved config.yaml into the typed schema: QLoRA cards keep the LoRA settings."""

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llava_train.cli import CONFIG_DIR
from llava_train.config.saved import load_train_config
from llava_train.export.card import build_card


def _saved(overrides) -> str:
    """config.yaml as `llava train` writes it (Tracking: the resolved config)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        job = OmegaConf.to_object(compose(config_name="train", overrides=overrides))
    return OmegaConf.to_yaml(OmegaConf.to_container(OmegaConf.structured(job), resolve=True))


def test_qlora_card_keeps_lora_settings():
    cfg = load_train_config(_saved(["peft=qlora", "peft.r=8", "peft.alpha=16", "trainer.optim=paged_adamw_8bit"]))
    assert cfg.peft.method == "qlora" and cfg.peft.r == 8
    card = build_card(kind="adapter", repo_id="me/x", base_model="base", datasets=[], train_cfg=cfg, metrics={})
    for row in ("| method | `qlora` |", "| LoRA r | `8` |", "| LoRA alpha | `16` |", "| quantisation | `4-bit nf4` |",
                "| optimizer | `paged_adamw_8bit` |", "| prompt family | `mistral` |"):
        assert row in card.text, card.text


def test_saved_config_of_another_version_loads_with_defaults(caplog):
    text = ("model:\n  path: tiny\n  dtype: bf16\ntrainer:\n  report_to: wandb\n  max_steps: 7\n"
            "data:\n  max_eval_samples: 3\n")
    cfg = load_train_config(text)
    assert cfg.model.dtype == "bf16" and cfg.trainer.max_steps == 7 and cfg.peft.method == "lora"
    assert "trainer.report_to" in caplog.text and "data.max_eval_samples" in caplog.text
    assert load_train_config("").model.path == ""  # no config at all: the schema's defaults
