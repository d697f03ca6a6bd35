"""Sample-quality metrics: FID / KID / IS / precision-recall through torch-fidelity.

Importing this package registers the digit feature extractor ("dsno-digits16") with torch-fidelity.
The classifier names (DigitClassifier, load_digit_classifier, train_digit_classifier) load on first use,
so that `python -m dsno.metrics.digit_classifier` runs its module only once.
"""

from dsno.metrics.fidelity import (
    DIGIT_EXTRACTOR,
    EXTRACTORS,
    DigitFeatureExtractor,
    ImageTensorDataset,
    compute_fidelity,
    digit_extractor_name,
    inception_weights_path,
    reference_digits,
    register_digit_extractor,
)
from dsno.metrics.image_io import from_uint8, to_uint8

_CLASSIFIER_NAMES = ("DigitClassifier", "load_digit_classifier", "train_digit_classifier")


def __getattr__(name: str):
    if name in _CLASSIFIER_NAMES:
        from dsno.metrics import digit_classifier  # deferred: `python -m dsno.metrics.digit_classifier` runs it once
        return getattr(digit_classifier, name)
    raise AttributeError(f"module 'dsno.metrics' has no attribute {name!r}")


__all__ = [
    "DIGIT_EXTRACTOR",
    "EXTRACTORS",
    "DigitClassifier",
    "DigitFeatureExtractor",
    "ImageTensorDataset",
    "compute_fidelity",
    "digit_extractor_name",
    "from_uint8",
    "inception_weights_path",
    "load_digit_classifier",
    "reference_digits",
    "register_digit_extractor",
    "to_uint8",
    "train_digit_classifier",
]
