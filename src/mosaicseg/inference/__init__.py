"""Inference: sliding-window prediction, test-time mirroring, post-processing, writing files back."""
