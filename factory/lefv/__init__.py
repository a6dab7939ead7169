"""LEFV (ICVIP 2019) as a pipeline kind: a light face detector and a face-normalisation GAN before the
multi-scale-fusion recogniser (the recogniser itself is the registered model `lefv`, `factory/models/lefv.py`).

  config.py          the recipe's `pipeline:` section (`kind: lefv`) and its checks
  detector_net.py    the detector network; detection.py: its MTCNN-taught training, decoding, scoring
  normaliser_net.py  the normaliser networks; normalisation.py: its GAN training and identity scoring
  stages.py          compiling and verifying both stages, and the raw-photo-to-embedding run
  schema.py          the types of its report section; card.py: its model-card sections

Declared in the project's `pyproject.toml` under the `factory.pipelines` entry points (see `factory.pipelines`).
"""

from factory.lefv import card, config
from factory.lefv.detection import train_detector_stage
from factory.lefv.normalisation import train_normaliser_stage
from factory.lefv.stages import build_pipeline
from factory.pipelines import PipelineKind, TrainableStage

PIPELINE = PipelineKind(
    name="lefv",
    description="LEFV: face detector (taught by MTCNN) and face normaliser (GAN) before the recogniser",
    config=config.LEFVPipelineConfig,
    check=config.check,
    build=build_pipeline,
    card_lines=card.card_lines,
    summary=card.summary,
    stages={
        "detector": TrainableStage(lambda cfg: cfg.detector.weights, train_detector_stage),
        "normaliser": TrainableStage(lambda cfg: cfg.normaliser.weights if cfg.normaliser else None,
                                     train_normaliser_stage),
    },
)
