"""Measurement tools for reduced models: FLOPs, peak memory, checkpoint loading, accuracy.

Submodules are imported on use (``vlprune.eval.flops`` and ``vlprune.eval.memory`` need only
torch; ``weights`` and ``imagenet`` pull in timm, numpy and PIL when called).
"""
