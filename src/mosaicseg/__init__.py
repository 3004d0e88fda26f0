"""MosaicSeg: one segmentation model from many partially labelled medical imaging datasets."""

__version__ = "0.1.0"
