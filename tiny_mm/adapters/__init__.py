"""Adapters that connect a frozen image encoder to a frozen language model (chapter 8).

    flamingo  PerceiverResampler, GatedCrossAttentionDense, media_mask, FlamingoLM
    llava     LlavaProjector (linear or LLaVA-1.5's MLP), PrefixLM (any soft-prompt adapter)
    qformer   BLIP-2's QFormer and its three objectives

The language model they attach to is `tiny_mm.language_model.TinyLM`; the
experiment that trains each of them is `tiny_mm.train_adapters`.
"""
