"""QU-net++: choose the few slices of a 3D stack worth annotating (Roychowdhury, arXiv 2110.14181)."""

__version__ = "0.2.0"  # the one place of the version (pyproject reads it); what changed: CHANGELOG.md

from qunet.config import DEFAULT_FEATURES, ModelConfig, QualityConfig, SelectionConfig, TrainConfig
from qunet.disagreement import disagreement_scores, segment
from qunet.io import Stack, StackError, load_label, load_stack
from qunet.network import build_network
from qunet.quality import SliceQuality, slice_quality
from qunet.selection import select_by_disagreement, select_initial

__all__ = [
    "__version__",
    "DEFAULT_FEATURES",
    "ModelConfig",
    "QualityConfig",
    "SelectionConfig",
    "SliceQuality",
    "Stack",
    "StackError",
    "TrainConfig",
    "build_network",
    "disagreement_scores",
    "load_label",
    "load_stack",
    "segment",
    "select_by_disagreement",
    "select_initial",
    "slice_quality",
]
