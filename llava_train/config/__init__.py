from llava_train.config.schema import (
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    FsdpConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    SweepReportConfig,
    TinyModelConfig,
    TrainerConfig,
    TrainJobConfig,
    register_configs,
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
