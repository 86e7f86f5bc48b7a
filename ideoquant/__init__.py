"""ideoquant: offline converter from Ideogram 4 weights to INT8 W8A8, GGUF and NF4 checkpoints."""

from pathlib import Path

__version__ = "0.1.0"


def data_dir(name: str) -> Path:
    """A data folder of ideoquant (`model_cards`, `calibration_prompts`): inside an installed
    wheel, or at the top of the checkout for a source or editable install."""
    package = Path(__file__).resolve().parent
    installed = package / name
    return installed if installed.is_dir() else package.parent / name
