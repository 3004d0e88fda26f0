"""MosaicSeg benchmark studies: ``python -m benchmarks STUDY`` (see BENCHMARKS.md)."""
