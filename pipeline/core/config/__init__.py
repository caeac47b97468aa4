"""One typed config for every stage.

The pydantic models are the single source of truth: each key has a default and a one-line description,
unknown keys are errors (with a did-you-mean), and `configs/default.yaml` is generated from them
(`python -m pipeline config --defaults`; a test keeps it in sync). An experiment YAML holds only its
differences from the defaults; dotted command-line overrides (`train.epochs=3`) come last.

- schema.py: the sections and their keys
- detect.py: the detection track's sections (`detect.*`)
- segment.py: the segmentation track's sections (`segment.*`)
- specs.py: experiment entries (`model.backbones`, `rounds.plan`) and `Config`, the whole tree
- keys.py: every dotted key, and the suggestion an unknown key gets
- loading.py: YAML files, dotted overrides, one-line errors, the defaults file and the config hash
"""

from pipeline.core.config.detect import (
    AnchorsConfig,
    DecodeConfig,
    DetectAugmentConfig,
    DetectClassifierConfig,
    DetectConfig,
    DetectDataConfig,
    DetectFoldsConfig,
    DetectModelConfig,
    DetectPredictConfig,
    DetectTrainConfig,
    EvaluateConfig,
    FusionConfig,
    ViewsConfig,
)
from pipeline.core.config.keys import MOVED, known_keys
from pipeline.core.config.loading import (
    config_hash,
    defaults_yaml,
    load_config,
    parse_overrides,
    read_yaml,
    to_yaml,
)
from pipeline.core.config.schema import (
    VIEW_NAME,
    AutoConfig,
    AutoGluonConfig,
    CleanConfig,
    CompetitionConfig,
    DistillConfig,
    EnsembleConfig,
    ExportConfig,
    FitConfig,
    FoldsConfig,
    PredictConfig,
    PseudoConfig,
    RuntimeConfig,
    Section,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
    duration_seconds,
)
from pipeline.core.config.segment import (
    SegmentBlendConfig,
    SegmentConfig,
    SegmentDataConfig,
    SegmentFoldsConfig,
    SegmentMemberConfig,
    SegmentPredictConfig,
    SegmentThresholdsConfig,
    SegmentTrainConfig,
    SegmentViewsConfig,
)
from pipeline.core.config.specs import (
    NOT_OVERRIDDEN,
    SAFE_NAME,
    Config,
    Entry,
    ExperimentSpec,
    ModelConfig,
    RoundsConfig,
    RoundSpec,
    SpecError,
)

__all__ = [
    "duration_seconds",
    "MOVED", "NOT_OVERRIDDEN", "SAFE_NAME", "VIEW_NAME", "AnchorsConfig", "AutoConfig", "AutoGluonConfig",
    "CleanConfig", "CompetitionConfig", "Config", "DecodeConfig", "DetectAugmentConfig", "DetectClassifierConfig",
    "DetectConfig", "DetectDataConfig", "DetectFoldsConfig", "DetectModelConfig", "DetectPredictConfig",
    "DetectTrainConfig",
    "DistillConfig", "EnsembleConfig", "Entry", "EvaluateConfig", "ExportConfig", "ExperimentSpec", "FitConfig",
    "FoldsConfig", "FusionConfig", "ModelConfig", "PredictConfig",
    "PseudoConfig", "RoundSpec", "SegmentBlendConfig", "SegmentConfig", "SegmentDataConfig", "SegmentFoldsConfig",
    "SegmentMemberConfig",
    "SegmentPredictConfig", "SegmentThresholdsConfig", "SegmentTrainConfig", "SegmentViewsConfig", "RoundsConfig",
    "RuntimeConfig", "Section", "SpecError", "TrackingConfig",
    "TrainConfig", "TuneConfig", "ViewsConfig", "config_hash", "defaults_yaml", "known_keys",
    "load_config", "parse_overrides", "read_yaml", "to_yaml",
]
