"""Adapters that connect a frozen image encoder to a frozen language model (chapter 8)."""
