"""Qwen-VL's processor: text with `<img>...</img>` markup plus images -> input ids and pixel values.

The published tokenizer writes an image's file path inside `<img>...</img>` (its bytes, padded with `<imgpad>`
to 256 tokens) and the published model opens that path itself. Here the processor reads the images: each
`<img>...</img>` in the text (whatever it holds) becomes `<img>` + n_queries `<imgpad>` + `</img>`, and the k-th
one is the k-th image. The model replaces those positions' inputs with the image's vectors, so the logits do
not depend on what stood between the tags. Images are resized to `image_size` squared (bicubic) and normalised
with CLIP's mean and std, as published.
"""

from __future__ import annotations

import os
import re

from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

from mixtune.native.padding import pad_rows
from mixtune.native.qwen_vl.tokenization_qwen import IMG_END, IMG_PAD, IMG_START

IMAGE_SPAN = re.compile(re.escape(IMG_START) + r".*?" + re.escape(IMG_END), re.DOTALL)


class QWenVLProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, n_queries: int = 256, chat_template=None, **kwargs):
        self.n_queries = n_queries
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder) or any(os.path.exists(os.path.join(folder, name)) for name in
                                            ("processor_config.json", "preprocessor_config.json")):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.for_published_folder(folder)

    @classmethod
    def for_published_folder(cls, folder: str) -> QWenVLProcessor:
        """A published Qwen-VL folder has no processor files (its remote code hard-codes them): build the
        processor from config.json's `visual` block and the folder's qwen.tiktoken."""
        from transformers import AutoConfig

        from mixtune.native.qwen_vl.tokenization_qwen import QWenTokenizer

        config = AutoConfig.from_pretrained(folder)
        return cls(clip_image_processor(int(config.visual["image_size"])), QWenTokenizer.from_pretrained(folder),
                   n_queries=config.n_queries)

    def _encode_text(self, text: str, want_offsets: bool):
        """Token ids (and per-token character spans of `text`), each image markup expanded in place."""
        tok = self.tokenizer
        ids, offsets, spans, cursor = [], [], 0, 0
        pieces = [(m.start(), m.end()) for m in IMAGE_SPAN.finditer(text)]
        img = [tok.convert_tokens_to_ids(t) for t in (IMG_START, IMG_PAD, IMG_END)]
        for start, end in pieces + [(len(text), None)]:
            if start > cursor:
                enc = tok(text[cursor:start], add_special_tokens=False, return_offsets_mapping=want_offsets)
                ids += enc["input_ids"]
                if want_offsets:
                    offsets += [(a + cursor, b + cursor) for a, b in enc["offset_mapping"]]
            if end is None:
                break
            ids += [img[0]] + [img[1]] * self.n_queries + [img[2]]
            offsets += [(start, end)] * (self.n_queries + 2)
            spans += 1
            cursor = end
        return ids, offsets, spans

    def __call__(self, text=None, images=None, return_offsets_mapping: bool = False,
                 return_text_replacement_offsets: bool = False, return_tensors="pt", padding=True,
                 add_special_tokens: bool = True, **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [] if images is None else (images if isinstance(images, (list, tuple)) else [images])
        encoded = [self._encode_text(t, return_offsets_mapping) for t in texts]
        n_spans = sum(e[2] for e in encoded)
        if n_spans != len(images):
            raise ValueError(f"the text has {n_spans} <img>...</img> spans but {len(images)} images were given")
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


def clip_image_processor(size: int):
    """Resize to size x size (bicubic, no crop), then CLIP's mean and std: Qwen-VL's published image transform."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    return CLIPImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC,
                              do_center_crop=False, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
