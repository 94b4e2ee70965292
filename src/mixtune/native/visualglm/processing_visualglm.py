"""VisualGLM-6B's processor: text with `<img>...</img>` markup plus images -> input ids and pixel values.

As the published chat code builds a prompt: the text up to and including `<img>` is encoded, then `image_length`
placeholder ids (`<unk>`) stand for the image, then the text from `</img>` on is encoded (each piece separately,
as published); whatever stood between the tags (the published prompt's file path) is dropped, and the k-th span is
the k-th image. With `add_special_tokens` the ids end with [gMASK] <sop>. Images are resized to 224 x 224 (bicubic,
no crop) and normalised with CLIP's mean and std (BLIP-2's eval transform, as published).
"""

from __future__ import annotations

import os
import re

from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

from mixtune.native.padding import pad_rows

IMG_START, IMG_END = "<img>", "</img>"
IMAGE_SPAN = re.compile(re.escape(IMG_START) + r".*?" + re.escape(IMG_END), re.DOTALL)
IMAGE_SIZE = 224


class VisualGLMProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, image_length: int = 32, chat_template=None, **kwargs):
        self.image_length = image_length
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder) or any(os.path.exists(os.path.join(folder, name)) for name in
                                            ("processor_config.json", "preprocessor_config.json")):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.for_published_folder(folder)

    @classmethod
    def for_published_folder(cls, folder: str) -> VisualGLMProcessor:
        """A published VisualGLM-6B folder has no processor files (its remote code hard-codes the transform): build
        the processor from config.json's `eva_config` / `image_length` and the folder's tokenizer."""
        from transformers import AutoConfig

        from mixtune.native.visualglm.tokenization_chatglm import ChatGLMTokenizer

        config = AutoConfig.from_pretrained(folder)
        size = config.eva_config.get("image_size", [IMAGE_SIZE])[0]
        return cls(blip_image_processor(int(size)), ChatGLMTokenizer.from_pretrained(folder),
                   image_length=config.image_length)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.unk_token_id

    def encode_text(self, text: str) -> tuple[list[int], int]:
        """Ids of `text` with each `<img>...</img>` span expanded (no special tokens), and the number of spans."""
        tok = self.tokenizer
        ids, cursor, spans = [], 0, 0
        for m in IMAGE_SPAN.finditer(text):
            ids += tok.encode(text[cursor:m.start() + len(IMG_START)], add_special_tokens=False)
            ids += [self.image_token_id] * self.image_length
            cursor, spans = m.end() - len(IMG_END), spans + 1
        if cursor < len(text):
            ids += tok.encode(text[cursor:], add_special_tokens=False)
        return ids, spans

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True, add_special_tokens: bool = True,
                 **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [] if images is None else (images if isinstance(images, (list, tuple)) else [images])
        encoded = [self.encode_text(t) for t in texts]
        n_spans = sum(e[1] for e in encoded)
        if n_spans != len(images):
            raise ValueError(f"the text has {n_spans} <img>...</img> spans but {len(images)} images were given")
        ids = [self.tokenizer.build_inputs_with_special_tokens(e[0]) if add_special_tokens else e[0]
               for e in encoded]
        data = self.pad(ids)
        if images:
            data["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return BatchFeature(data, tensor_type=None)

    def pad(self, ids: list[list[int]]) -> dict:
        return pad_rows(ids, None, self.tokenizer.pad_token_id, self.tokenizer.padding_side == "left")

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


def blip_image_processor(size: int = IMAGE_SIZE):
    """Resize to size x size (bicubic, no crop), then CLIP's mean and std: VisualGLM's published image transform."""
    from transformers import BlipImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    return BlipImageProcessor(size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC,
                              image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True)
