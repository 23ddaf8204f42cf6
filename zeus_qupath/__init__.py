"""zeus-qupath: zero-shot tumor pre-segmentation of whole-slide images (ZEUS) for QuPath."""

__version__ = "0.1.0"
