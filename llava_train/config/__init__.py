from llava_train.config.jobs import SweepReportConfig, register_configs
from llava_train.config.schema import (
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    FsdpConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    TinyModelConfig,
    TrainerConfig,
    TrainJobConfig,
)

__all__ = [
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "FsdpConfig",
    "ModelConfig",
    "OptimConfig",
    "PeftConfig",
    "SweepReportConfig",
    "TinyModelConfig",
    "TrainerConfig",
    "TrainJobConfig",
    "register_configs",
]
