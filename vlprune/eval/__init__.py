"""Measurement and evaluation of reduced models; library code only (never imports
:mod:`vlprune.cli`, never exits: errors are exceptions the command line turns into messages).

- measure: :mod:`~vlprune.eval.flops`, :mod:`~vlprune.eval.memory`,
  :mod:`~vlprune.eval.machine` (versions, busy-CPU check, device sync);
- settings and the one sweep loop: :mod:`~vlprune.eval.sweep` (``Setting``, ``Sweep``, plot,
  progress bars);
- benchmarks: :mod:`~vlprune.eval.bench` (images), :mod:`~vlprune.eval.vlm_bench` (LLaVA
  prefill / decode);
- data: :mod:`~vlprune.eval.image_data`, :mod:`~vlprune.eval.vqa_data`,
  :mod:`~vlprune.eval.weights` (checkpoints);
- tasks: :mod:`~vlprune.eval.imagenet`, :mod:`~vlprune.eval.vqa` and
  :mod:`~vlprune.eval.caption` (on :mod:`~vlprune.eval.generation` and
  :mod:`~vlprune.eval.vlm`, scored by :mod:`~vlprune.eval.vqa_metric`),
  :mod:`~vlprune.eval.lit`, :mod:`~vlprune.eval.text_embed`;
- :mod:`~vlprune.eval.distributed`: one process or ``accelerate`` ranks.

Submodules are imported on use (``flops`` and ``memory`` need only torch; the data and task
modules pull in timm, numpy, PIL or transformers when called).
"""
