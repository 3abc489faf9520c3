from llava_train.config.schema import (
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
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
    "ModelConfig",
    "OptimConfig",
    "PeftConfig",
    "SweepReportConfig",
    "TinyModelConfig",
    "TrainerConfig",
    "TrainJobConfig",
    "register_configs",
]
