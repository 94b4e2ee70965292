"""Grounding DINO (transformers' GroundingDinoForObjectDetection): open-vocabulary detection from a text
prompt of phrases ("red circle . blue square ."). Task: detection. The model's own Hungarian matcher and
focal + L1 + GIoU loss train it; named parts are the image backbone, the BERT text encoder and the
encoder-decoder with its heads.

The tiny checkpoint keeps BERT's token ids for [CLS], [SEP], "." and "?" (101, 102, 1012, 1029): Grounding
DINO's modelling code has them built in to split a prompt into phrases, so its WordPiece vocabulary is laid
out like bert-base-uncased's around those ids.
"""

from __future__ import annotations

from mixtune.models.family import Family
from mixtune.models.tiny import save_checkpoint, seeded

TINY_IMAGE_SIZE = 128
TINY_TEXT_LENGTH = 64
# BERT-base-uncased's ids, which GroundingDino's SPECIAL_TOKENS and build_label_maps hard-code
FIXED_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
TINY_VOCAB_SIZE = 1100
# whole words the demo and tests prompt with (anything else falls back to single letters)
TINY_WORDS = """red green blue yellow purple orange white black circle square triangle star shape object
cat dog person car left right top bottom the a an of and with on in small big large , ! ' - ( ) : ; /""".split()


def tiny_vocab() -> dict[str, int]:
    """A WordPiece vocabulary with BERT's special ids in place: words, then letters and digits whole and as
    `##` continuations, so any lowercase ASCII text tokenises without [UNK]."""
    by_id = {i: t for t, i in FIXED_IDS.items()}
    pieces = TINY_WORDS + list("abcdefghijklmnopqrstuvwxyz0123456789")
    pieces += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    free = (i for i in range(TINY_VOCAB_SIZE) if i not in by_id and i >= 104)
    for piece in pieces:
        by_id[next(free)] = piece
    for i in range(TINY_VOCAB_SIZE):
        by_id.setdefault(i, f"[unused{i}]")
    return {t: i for i, t in sorted(by_id.items())}


def tiny_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab=tiny_vocab(), model_max_length=TINY_TEXT_LENGTH)


def tiny_config(vocab_size: int):
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    backbone = SwinConfig(image_size=TINY_IMAGE_SIZE, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 2, 2], window_size=4, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=TINY_TEXT_LENGTH)
    return GroundingDinoConfig(backbone_config=backbone, text_config=text, num_queries=30, d_model=32,
                               encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2,
                               decoder_n_points=2, max_text_len=TINY_TEXT_LENGTH, num_feature_levels=4)


def build_tiny(output_dir: str) -> str:
    from transformers import GroundingDinoForObjectDetection, GroundingDinoImageProcessor, GroundingDinoProcessor

    seeded()
    tok = tiny_tokenizer()
    image_processor = GroundingDinoImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tok)
    model = GroundingDinoForObjectDetection(tiny_config(len(tok)))
    return save_checkpoint(model, processor, output_dir)


def expose_text_embeddings(model) -> None:
    """Gives transformers' GroundingDinoModel the `get_input_embeddings` it lacks (its BERT's word embeddings, the
    model's only input embeddings): peft asks for it to look for weights tied to them (there are none) and
    otherwise stops. Bound to the instance, so deep copies and peft wrappers keep it."""
    import types

    base = getattr(model, "model", model)
    if type(base).__name__ == "GroundingDinoModel":
        base.get_input_embeddings = types.MethodType(lambda self: self.text_backbone.get_input_embeddings(), base)


# default LoRA targets: the encoder's and decoder's attention, fusion and feed-forward linears (not the deformable
# attention's sampling offsets and weights, not the backbone, BERT or the box head)
LORA_TARGETS = (r"model\.(encoder|decoder)\.layers\.\d+\.(.+\.)?(query|key|value|out_proj|value_proj|output_proj|"
                r"vision_proj|text_proj|values_vision_proj|values_text_proj|out_vision_proj|out_text_proj|fc1|fc2)")

BACKBONE = ("model.backbone.*", "model.input_proj_vision.*")
TEXT_ENCODER = ("model.text_backbone.*", "model.text_projection.*")
ENCODER_DECODER = ("*",)

FAMILY = Family(
    name="grounding_dino",
    model_types=("grounding-dino", "mm-grounding-dino"),
    vision=BACKBONE,
    projector=(),
    image_placeholder="",
    build_tiny=build_tiny,
    language=TEXT_ENCODER,
    uses_chat_template=False,
    # measured with transformers 5.24: under eager attention its BERT adds the boolean phrase mask to the
    # scores instead of masking, so each phrase's tokens see the other phrases
    refused_attn={"eager": "transformers' eager path mixes the prompt's phrases (the default sdpa is correct)"},
    requires=("scipy", "pycocotools"),  # the loss's Hungarian matcher; COCO mAP (pip install 'mixtune[detection]')
    auto_class="GroundingDinoForObjectDetection",
    task="detection",
    lora_targets=LORA_TARGETS,
    after_load=expose_text_embeddings,  # peft asks for get_input_embeddings
    parts=(("backbone", BACKBONE), ("text_encoder", TEXT_ENCODER), ("encoder_decoder", ENCODER_DECODER)),
)
