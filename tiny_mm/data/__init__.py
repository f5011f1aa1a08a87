"""Datasets the book makes itself, so nothing is ever downloaded.

- `tiny_mm.data.shapes`: coloured shapes with captions, for training a tiny
  CLIP (and a captioner) on a CPU in minutes.
- `tiny_mm.data.words`: the word-level vocabulary of those captions, for the
  caption decoders and the tiny language model of chapters 6 and 8.
- `tiny_mm.data.spoken_digits`: digit strings spoken by espeak-ng (when it is
  installed), resampled to 16 kHz, for the tiny Whisper of chapter 9.
- `tiny_mm.data.video`: clips of a moving disc with a tone track and a
  caption, whose action label needs all three modalities (chapter 10).
"""
