"""FLOPs of cross-modal guidance on an open_clip ViT-B-16 image tower (random weights).

Compares, per image, the unpatched tower, class-attention pruning and text-guided pruning at
the same keep rate, with 1, 80 and 1000 guiding text embeddings (zero-shot prompt counts):

    python benchmarks/guide_cost.py [--keep 0.5] [--layer 6]
"""

from __future__ import annotations

import argparse

import open_clip
import torch

import vlprune
from vlprune.eval.flops import count_flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--layer", type=int, default=6)
    args = p.parse_args()
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval()
    image = torch.randn(1, 3, *model.visual.image_size)
    dim = model.text_projection.shape[1]
    rows = []
    with torch.no_grad():
        base = count_flops(lambda: model.encode_image(image))
        rows.append(("unpatched", base))
        vlprune.patch(model, prune_keep=args.keep, prune_layers=(args.layer,), merge_r=0, text_merge_r=0)
        rows.append((f"cls_attn {args.keep}@{args.layer}", count_flops(lambda: model.encode_image(image))))
        vlprune.patch(model, guide="text", prune_keep=args.keep, prune_layers=(args.layer,),
                      merge_r=0, text_merge_r=0)
        for texts in (1, 80, 1000):
            vlprune.set_guide(model, torch.randn(texts, dim))
            flops = count_flops(lambda: model.encode_image(image))
            rows.append((f"guide=text {args.keep}@{args.layer}, {texts} texts", flops))
    print(f"{'setting':<36} {'GFLOPs/img':>10} {'vs unpatched':>12}")
    for name, flops in rows:
        print(f"{name:<36} {flops / 1e9:>10.3f} {base / flops:>11.2f}x")


if __name__ == "__main__":
    main()
