"""Fingerprints of the upstream functions vlprune overrides, by the versions tested
(written by ``vlprune check --record``; see :mod:`vlprune.upstream`).
"""

KNOWN: dict[str, dict[str, list[str]]] = {
    'open_clip.transformer:ResidualAttentionBlock.forward': {
        'b93909ef01c5f545': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'open_clip.transformer:TextTransformer.forward': {
        '09b6f7e4c9a24aa7': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
        '82139c42f733e4e3': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
    },
    'open_clip.transformer:VisionTransformer._global_pool': {
        'cfe69d4e71adb44d': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'open_clip.transformer:VisionTransformer.forward': {
        'a05007d4bd050a17': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'open_clip.transformer:VisionTransformer.forward_intermediates': {
        '8e20c7e2312393a5': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'timm.layers.attention:Attention.forward': {
        'f13f55e191a0687e': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
        'f4eceff3a82aa7c9': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'timm.models.vision_transformer:Block.forward': {
        '5139fcfbfcecc3a1': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'timm.models.vision_transformer:VisionTransformer.forward_features': {
        '975b76c93c16207a': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'timm.models.vision_transformer:VisionTransformer.forward_intermediates': {
        '1f4b3143a3b80582': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'timm.models.vision_transformer:VisionTransformer.pool': {
        'f608a1c447e7bdc4': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'torch.nn.modules.activation:MultiheadAttention.forward': {
        'c636cb9ff5dd78e4': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.generation.utils:GenerationMixin.generate': {
        '383c3993ef0af51b': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
        '940c7dc224207fa1': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.bert.modeling_bert:BertLayer.forward': {
        'da012ec5f4f55ff4': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
        'e977ef072c6f733d': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.bert.modeling_bert:BertModel.forward': {
        '84f73c86545d662b': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
        'ddb61fe7d0212e0b': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.bert.modeling_bert:BertSelfAttention.forward': {
        '4417ddf6fa865e95': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
        '8db67f416c2db903': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.clip.modeling_clip:CLIPAttention.forward': {
        '53ce0b9274f453f5': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.clip.modeling_clip:CLIPEncoderLayer.forward': {
        '4e70ff8211cf2587': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.clip.modeling_clip:CLIPForImageClassification.forward': {
        'c6561a0080cf6034': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.clip.modeling_clip:CLIPTextModel.forward': {
        'c1825413f14c3009': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
        'd54b887199c43685': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.clip.modeling_clip:CLIPVisionModel.forward': {
        'e8e5473d9bce3727': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.internvl.modeling_internvl:InternVLForConditionalGeneration.forward': {
        'd06ebd3bbbca77c1': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
        'dd2be36157ce6785': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
    },
    'transformers.models.llama.modeling_llama:LlamaDecoderLayer.forward': {
        'e1163a0c575bd555': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
        'ff68a8a835eddfb5': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.llava.modeling_llava:LlavaForConditionalGeneration.forward': {
        '6880a69fbefd4f3c': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
        'e1ecc6febb7e3a30': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.llava.modeling_llava:LlavaModel.forward': {
        '32ea0aa9de621741': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
        '58e19daac415fcfe': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
    },
    'transformers.models.qwen2.modeling_qwen2:Qwen2DecoderLayer.forward': {
        'e1163a0c575bd555': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
        'ff68a8a835eddfb5': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLDecoderLayer.forward': {
        'af492823c9c5bdea': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLForConditionalGeneration.forward': {
        '51713b9a8a130bd8': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.qwen3_vl.modeling_qwen3_vl:Qwen3VLForConditionalGeneration.forward': {
        'de76947ad6e2660b': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.qwen3_vl.modeling_qwen3_vl:Qwen3VLTextDecoderLayer.forward': {
        '55c3b8f17be47d1f': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.roberta.modeling_roberta:RobertaLayer.forward': {
        'da012ec5f4f55ff4': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
        'e977ef072c6f733d': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.roberta.modeling_roberta:RobertaModel.forward': {
        '84f73c86545d662b': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
        'ddb61fe7d0212e0b': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.roberta.modeling_roberta:RobertaSelfAttention.forward': {
        '4417ddf6fa865e95': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
        '8db67f416c2db903': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.siglip.modeling_siglip:SiglipAttention.forward': {
        'cf4a1bb95f9d90c0': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.siglip.modeling_siglip:SiglipEncoderLayer.forward': {
        '6fe700ee8e42163d': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.siglip.modeling_siglip:SiglipForImageClassification.forward': {
        'efe4484409a2d3e2': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.siglip.modeling_siglip:SiglipMultiheadAttentionPoolingHead.forward': {
        '9cfcb30438ee4776': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.siglip.modeling_siglip:SiglipTextModel.forward': {
        '4547f1e73d936f5f': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.siglip.modeling_siglip:SiglipVisionModel.forward': {
        '96bcfd3b7fbb75f7': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0', 'torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.xlm_roberta.modeling_xlm_roberta:XLMRobertaLayer.forward': {
        'da012ec5f4f55ff4': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
        'e977ef072c6f733d': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.xlm_roberta.modeling_xlm_roberta:XLMRobertaModel.forward': {
        '84f73c86545d662b': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
        'ddb61fe7d0212e0b': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
    'transformers.models.xlm_roberta.modeling_xlm_roberta:XLMRobertaSelfAttention.forward': {
        '4417ddf6fa865e95': ['torch 2.14.1 timm 1.0.26 open_clip_torch 2.32.0 transformers 5.23.0'],
        '8db67f416c2db903': ['torch 2.14.1 timm 1.0.31 open_clip_torch 3.3.0 transformers 5.25.0'],
    },
}
