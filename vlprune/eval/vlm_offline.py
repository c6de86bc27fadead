"""Processors built in code, with nothing downloaded, for VLMs with random weights
(``qwen2.5-vl:<shape>``, ``qwen3-vl:<shape>``, ``internvl:<shape>``): a word-level tokenizer
whose vocabulary comes from the evaluation's own texts, holding the model's special tokens at
the ids its config names, and the family's own image processor built from arguments.

:func:`word_tokenizer` is shared with LLaVA's :func:`vlprune.eval.vlm.offline_processor`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["QWEN_SPECIALS", "offline_qwen_processor", "word_tokenizer"]

#: the chat-template tokens of Qwen prompts (free ids; the vision and end tokens take the
#: config's ids)
QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>", "<|endoftext|>")


def word_tokenizer(vocab_size: int, fixed: Mapping[str, int], words: Iterable[str] = (), *,
                   specials: Iterable[str] = (), bos: str | None = None, pad: str, eos: str,
                   unk: str = "<unk>", max_length: int, extra: Mapping[str, str] | None = None
                   ) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over ``vocab_size`` ids, padding on the left.

    ``fixed`` maps special tokens to the ids the model's config gives them (distinct, below
    ``vocab_size``); ``unk`` and the other ``specials`` take the first free ids, then ``words``
    (most important first) as many as fit; ids left over are ``<unusedN>`` tokens, so every id
    the model can generate decodes to something. Text is lower-cased and split into words and
    punctuation runs. ``bos`` (if given) starts every encoded text. ``extra`` names special
    tokens as tokenizer attributes (e.g. ``{"image_token": "<|image_pad|>"}``).
    """
    try:
        from tokenizers import (
            AddedToken,
            Tokenizer,
            decoders,
            models,
            normalizers,
            pre_tokenizers,
            processors,
        )
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        raise RuntimeError("the offline processor needs transformers and tokenizers: "
                           "pip install 'vlprune[hf]'") from e
    fixed = dict(fixed)
    if any(v is None for v in fixed.values()):
        raise ValueError(f"the offline tokenizer needs an id for each of {sorted(fixed)}; got {fixed}")
    if len(set(fixed.values())) != len(fixed) or max(fixed.values()) >= vocab_size:
        raise ValueError(f"the config's special token ids {fixed} must be distinct and below "
                         f"vocab_size={vocab_size}")
    free = (i for i in range(vocab_size) if i not in set(fixed.values()))
    vocab = dict(fixed)
    for token in (unk, *specials):
        if token not in vocab:
            vocab[token] = next(free)
    special = list(vocab)
    for word in words:
        if word in vocab:
            continue
        i = next(free, None)
        if i is None:
            break
        vocab[word] = i
    for i in free:
        vocab[f"<unused{i}>"] = i

    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    kwargs = dict(extra_special_tokens=dict(extra)) if extra else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        padding_side="left", model_max_length=max_length, **kwargs,
    )


def offline_qwen_processor(config: Any, words: Iterable[str] = (), *, image_size: int = 448) -> Any:
    """A ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` for a model built from ``config``.

    The tokenizer (:func:`word_tokenizer`) holds ``<|image_pad|>``, ``<|video_pad|>``,
    ``<|vision_start|>`` and ``<|vision_end|>`` at the config's ids, ``<|im_end|>`` at the
    text config's ``eos_token_id`` and ``<|endoftext|>`` (padding) at its ``bos_token_id``
    (as Qwen's tokenizer does). The image processor resizes every image to about
    ``image_size`` x ``image_size`` pixels (``min_pixels = max_pixels = image_size**2``, aspect
    kept, sides multiples of ``patch * merge``), with the tower's patch, temporal patch and
    merge sizes.
    """
    import transformers

    qwen3 = config.model_type.startswith("qwen3")
    tcfg, vcfg = config.text_config, config.vision_config
    eos = tcfg.eos_token_id[0] if isinstance(tcfg.eos_token_id, (list, tuple)) else tcfg.eos_token_id
    fixed = {"<|image_pad|>": config.image_token_id, "<|video_pad|>": config.video_token_id,
             "<|vision_start|>": config.vision_start_token_id,
             "<|vision_end|>": config.vision_end_token_id, "<|im_end|>": eos,
             "<|endoftext|>": tcfg.bos_token_id if tcfg.pad_token_id is None else tcfg.pad_token_id}
    tokenizer = word_tokenizer(
        tcfg.vocab_size, fixed, words, specials=QWEN_SPECIALS, pad="<|endoftext|>",
        eos="<|im_end|>", max_length=tcfg.max_position_embeddings,
        extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )
    patch, merge = vcfg.patch_size, vcfg.spatial_merge_size
    if image_size < patch * merge:
        raise ValueError(f"image_size must be >= patch * merge = {patch * merge}, got {image_size}")
    image_processor = transformers.Qwen2VLImageProcessor(
        size={"shortest_edge": image_size ** 2, "longest_edge": image_size ** 2},
        patch_size=patch, temporal_patch_size=vcfg.temporal_patch_size, merge_size=merge,
    )
    video_processor = (transformers.Qwen3VLVideoProcessor if qwen3 else transformers.Qwen2VLVideoProcessor)(
        patch_size=patch, temporal_patch_size=vcfg.temporal_patch_size, merge_size=merge)
    cls = transformers.Qwen3VLProcessor if qwen3 else transformers.Qwen2_5_VLProcessor
    processor = cls(image_processor=image_processor, tokenizer=tokenizer,
                    video_processor=video_processor)
    if processor.image_token_id != config.image_token_id:
        raise ValueError(f"the offline processor's image token id {processor.image_token_id} is "
                         f"not the model's {config.image_token_id}")
    return processor
