"""LESS (Dong et al., ICML 2024): a constant-size learned state for the tokens eviction drops.

``kernels``: feature maps, state and the numpy reference; ``train``: per-model training
(``kvcrush-ov less-train``).
"""
