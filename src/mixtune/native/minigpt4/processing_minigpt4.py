"""MiniGPT-4's processor: text with `<ImageHere>` (inside the prompt's `<Img>...</Img>`) plus images -> input ids
and pixel values.

PaddleMIX's MiniGPT4Processor splits each prompt at `<ImageHere>`, tokenises the text before it (with BOS) and
after it (without) separately, and the model concatenates [before, image, after]. Here each `<ImageHere>`
becomes `num_query_tokens` image tokens between the separately tokenised pieces, and the model puts the k-th
image's vectors at the k-th run of them: the same sequence, in one row of ids. Images: BLIP-2's transform
(resize to 224 squared, bicubic, CLIP's mean and std), which is PaddleMIX's MiniGPT4ImageProcessor at test time.
"""

from __future__ import annotations

from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

from mixtune.native.minigpt4.configuration_minigpt4 import IMAGE_TOKEN
from mixtune.native.padding import pad_rows


class MiniGPT4Processor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, num_query_tokens: int = 32, chat_template=None,
                 **kwargs):
        self.num_query_tokens = num_query_tokens
        self.image_token = IMAGE_TOKEN
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def _encode_text(self, text: str, add_bos: bool, want_offsets: bool):
        """Token ids (and per-token character spans of `text`), each `<ImageHere>` expanded in place."""
        tok = self.tokenizer
        ids, offsets = [], []
        if add_bos and tok.bos_token_id is not None:
            ids, offsets = [tok.bos_token_id], [(0, 0)]
        pieces = text.split(IMAGE_TOKEN)
        cursor = 0
        for i, piece in enumerate(pieces):
            if piece:
                enc = tok(piece, add_special_tokens=False, return_offsets_mapping=want_offsets)
                ids += enc["input_ids"]
                if want_offsets:
                    offsets += [(a + cursor, b + cursor) for a, b in enc["offset_mapping"]]
            cursor += len(piece)
            if i < len(pieces) - 1:
                ids += [self.image_token_id] * self.num_query_tokens
                offsets += [(cursor, cursor + len(IMAGE_TOKEN))] * self.num_query_tokens
                cursor += len(IMAGE_TOKEN)
        return ids, offsets, len(pieces) - 1

    def __call__(self, text=None, images=None, return_offsets_mapping: bool = False,
                 return_text_replacement_offsets: bool = False, return_tensors="pt", padding=True,
                 add_special_tokens: bool = True, **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [] if images is None else (images if isinstance(images, (list, tuple)) else [images])
        encoded = [self._encode_text(t, add_special_tokens, return_offsets_mapping) for t in texts]
        n_tags = sum(e[2] for e in encoded)
        if n_tags != len(images):
            raise ValueError(f"the text has {n_tags} {IMAGE_TOKEN} tags but {len(images)} images were given")
        data = self._pad([e[0] for e in encoded], [e[1] for e in encoded] if return_offsets_mapping else None)
        if images:
            data["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        if return_text_replacement_offsets:  # offsets already refer to the text as given
            data["text_replacement_offsets"] = [[] for _ in texts]
        return BatchFeature(data, tensor_type=None)

    def _pad(self, ids: list[list[int]], offsets: list | None) -> dict:
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        return pad_rows(ids, offsets, pad_id, tok.padding_side == "left")

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


def blip2_image_processor(size: int = 224):
    """BLIP-2's eval transform, which MiniGPT-4 uses: size x size bicubic, CLIP's mean and std."""
    from transformers import BlipImageProcessor

    return BlipImageProcessor(size={"height": size, "width": size})
