"""Testing helpers for people who check vlprune against other projects' test suites.

:mod:`vlprune.testing.pytest_plugin` is a pytest plugin that patches every model a test suite
builds (timm ``VisionTransformer``, Hugging Face ``PreTrainedModel``) at a setting that reduces
nothing. It is never loaded by itself: pass ``-p vlprune.testing.pytest_plugin``.
"""
