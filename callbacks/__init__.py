"""Lightning callbacks: freezing, adversarial training, robustness and backdoor evaluation, example-image logging,
the latest-state checkpoint and the training RNG stream (exact resume).

On the command line they are appended to the defaults with ``--trainer.callbacks+=callbacks.<Name>`` (options then
follow as ``--trainer.callbacks.<option>=...``, applying to the callback appended last).
"""

from callbacks.adversarial_examples import AdversarialExamples
from callbacks.adversarial_training import AdversarialTraining
from callbacks.backdoor import BackdoorEvaluation
from callbacks.caption_samples import CaptionSamples
from callbacks.freeze import FreezeDecoder, FreezeEncoder
from callbacks.latest_checkpoint import LatestCheckpoint
from callbacks.robustness import RobustnessEvaluation
from callbacks.training_rng import TrainingRNG

__all__ = [
    "AdversarialExamples",
    "AdversarialTraining",
    "BackdoorEvaluation",
    "CaptionSamples",
    "FreezeDecoder",
    "FreezeEncoder",
    "LatestCheckpoint",
    "RobustnessEvaluation",
    "TrainingRNG",
]
