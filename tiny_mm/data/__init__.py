"""Datasets the book makes itself, so nothing is ever downloaded.

- `tiny_mm.data.shapes`: coloured shapes with captions, for training a tiny
  CLIP (and a captioner) on a CPU in minutes.
"""
