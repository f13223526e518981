"""opensam: OpenCLIP + SAM semi-supervised semantic segmentation."""

__version__ = "0.1.0"
