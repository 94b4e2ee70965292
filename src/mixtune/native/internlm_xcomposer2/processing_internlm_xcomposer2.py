"""InternLM-XComposer2's processor: text with `<ImageHere>` marks plus images -> input ids and pixel values.

As published (and in PaddleMIX's processor), the text is cut at each `<ImageHere>`, each piece is tokenised on
its own (`<s>` once, at the start), and the k-th image's vectors go where its mark was. Here each mark becomes
`image_seq_length` ids of the `<ImageHere>` token, which the model replaces by the image's vectors; their
character offsets are the mark's, so labels found in the text map onto the ids. Images are resized to
img_size squared (bicubic, no crop) and normalised with CLIP's mean and std, as published.
"""

from __future__ import annotations

import os

from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

from mixtune.native.internlm_xcomposer2.tokenization_internlm_xcomposer2 import IMAGE_PLACEHOLDER
from mixtune.native.padding import pad_rows
from mixtune.native.qwen_vl.processing_qwen_vl import clip_image_processor


class InternLMXComposer2Processor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs):
        self.image_seq_length = image_seq_length
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder) or any(os.path.exists(os.path.join(folder, name)) for name in
                                            ("processor_config.json", "preprocessor_config.json")):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.for_published_folder(folder)

    @classmethod
    def for_published_folder(cls, folder: str) -> InternLMXComposer2Processor:
        """A published folder has no processor files (its remote code hard-codes them): build the processor
        from config.json (img_size, the tower's patch size) and the folder's tokenizer."""
        from transformers import AutoConfig

        from mixtune.native.internlm_xcomposer2.tokenization_internlm_xcomposer2 import InternLMXComposer2Tokenizer

        config = AutoConfig.from_pretrained(folder)
        per_side = config.img_size // config.vision_config.patch_size
        return cls(clip_image_processor(config.img_size), InternLMXComposer2Tokenizer.from_pretrained(folder),
                   image_seq_length=per_side * per_side)

    def _encode_text(self, text: str, want_offsets: bool, add_special_tokens: bool):
        """Token ids (and per-token character spans of `text`), each `<ImageHere>` expanded in place."""
        tok = self.tokenizer
        ids, offsets, images, cursor = [], [], 0, 0
        if add_special_tokens and tok.add_bos_token and tok.bos_token_id is not None:
            ids, offsets = [tok.bos_token_id], [(0, 0)]
        placeholder_id, width = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER), len(IMAGE_PLACEHOLDER)
        while cursor <= len(text):
            mark = text.find(IMAGE_PLACEHOLDER, cursor)
            end = len(text) if mark < 0 else mark
            if end > cursor:
                enc = tok(text[cursor:end], add_special_tokens=False, return_offsets_mapping=want_offsets)
                ids += enc["input_ids"]
                if want_offsets:
                    offsets += [(a + cursor, b + cursor) for a, b in enc["offset_mapping"]]
            if mark < 0:
                break
            ids += [placeholder_id] * self.image_seq_length
            offsets += [(mark, mark + width)] * self.image_seq_length
            images += 1
            cursor = mark + width
        return ids, offsets, images

    def __call__(self, text=None, images=None, return_offsets_mapping: bool = False,
                 return_text_replacement_offsets: bool = False, return_tensors="pt", padding=True,
                 add_special_tokens: bool = True, **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [] if images is None else (images if isinstance(images, (list, tuple)) else [images])
        encoded = [self._encode_text(t, return_offsets_mapping, add_special_tokens) for t in texts]
        n_marks = sum(e[2] for e in encoded)
        if n_marks != len(images):
            raise ValueError(f"the text has {n_marks} {IMAGE_PLACEHOLDER} marks but {len(images)} images were given")
        data = self._pad([e[0] for e in encoded], [e[1] for e in encoded] if return_offsets_mapping else None)
        if images:
            data["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        if return_text_replacement_offsets:  # offsets already refer to the text as given
            data["text_replacement_offsets"] = [[] for _ in texts]
        return BatchFeature(data, tensor_type=None)

    def _pad(self, ids: list[list[int]], offsets: list | None) -> dict:
        return pad_rows(ids, offsets, self.tokenizer.pad_token_id or 0, self.tokenizer.padding_side == "left")

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]
