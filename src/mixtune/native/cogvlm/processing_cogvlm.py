"""CogVLM's / CogAgent's processor: text with `<image>` markup plus images -> input ids, `token_type_ids` and
pixel values (CogAgent: also `cross_pixel_values`, the same image at `cross_image_size`).

As the published `build_conversation_input_ids` lays a sample out: BOS, then per image `vision_tokens`
placeholder ids (the tokenizer's pad id, else 0) with token type 1, then the text with token type 0; the model
replaces the placeholders' inputs with the image's boi, patch and eoi vectors. Here an image sits where its
`<image>` markup stands in the text (CogVLM's prompt formats put it first, right after BOS). Images are resized
to `image_size` squared (bicubic) and normalised with CLIP's mean and std, as published. `token_type_ids` are
built per sample, so they travel with each sample through padding and MixToken packing.
"""

from __future__ import annotations

import os

import torch
from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

IMAGE_MARKUP = "<image>"


def clip_image_processor(size: int):
    """Resize to size x size (bicubic, no crop), then CLIP's mean and std: CogVLM's published image transform."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    return CLIPImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC,
                              do_center_crop=False, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)


class CogVLMProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, vision_tokens: int = 1227,
                 cross_image_size: int | None = None, chat_template=None, **kwargs):
        self.vision_tokens = vision_tokens
        self.cross_image_size = cross_image_size  # CogAgent only
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder) or any(os.path.exists(os.path.join(folder, name)) for name in
                                            ("processor_config.json", "preprocessor_config.json")):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.for_published_folder(folder)

    @classmethod
    def for_published_folder(cls, folder: str) -> CogVLMProcessor:
        """A published CogVLM / CogAgent folder has no processor files (its remote code hard-codes them): build the
        processor from config.json and the folder's (Vicuna) tokenizer."""
        from transformers import AutoConfig, AutoTokenizer

        from mixtune.models.loading import config_from_architectures

        config = config_from_architectures(folder) or AutoConfig.from_pretrained(folder)  # published: no model_type
        tokenizer = AutoTokenizer.from_pretrained(folder, config=config)  # never the folder's remote-code config class
        return cls(clip_image_processor(int(config.vision_config["image_size"])), tokenizer,
                   vision_tokens=config.vision_tokens, cross_image_size=getattr(config, "cross_image_size", None))

    @property
    def image_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else pad

    def _encode_text(self, text: str, want_offsets: bool, add_bos: bool):
        """Token ids, token types (and per-token character spans of `text`), each `<image>` expanded in place."""
        tok = self.tokenizer
        ids, types, offsets, images, cursor = [], [], [], 0, 0
        if add_bos and tok.bos_token_id is not None:
            ids, types, offsets = [tok.bos_token_id], [0], [(0, 0)]
        starts = []
        at = text.find(IMAGE_MARKUP)
        while at >= 0:
            starts.append(at)
            at = text.find(IMAGE_MARKUP, at + len(IMAGE_MARKUP))
        for start in starts + [len(text)]:
            if start > cursor:
                enc = tok(text[cursor:start], add_special_tokens=False, return_offsets_mapping=want_offsets)
                ids += enc["input_ids"]
                types += [0] * len(enc["input_ids"])
                if want_offsets:
                    offsets += [(a + cursor, b + cursor) for a, b in enc["offset_mapping"]]
            if start == len(text):
                break
            end = start + len(IMAGE_MARKUP)
            ids += [self.image_token_id] * self.vision_tokens
            types += [1] * self.vision_tokens
            offsets += [(start, end)] * self.vision_tokens
            images += 1
            cursor = end
        return ids, types, offsets, images

    def __call__(self, text=None, images=None, return_offsets_mapping: bool = False,
                 return_text_replacement_offsets: bool = False, return_tensors="pt", padding=True,
                 add_special_tokens: bool = True, **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [] if images is None else (images if isinstance(images, (list, tuple)) else [images])
        encoded = [self._encode_text(t, return_offsets_mapping, add_special_tokens) for t in texts]
        n_markup = sum(e[3] for e in encoded)
        if n_markup != len(images):
            raise ValueError(f"the text has {n_markup} {IMAGE_MARKUP} markups but {len(images)} images were given")
        data = self._pad(encoded, return_offsets_mapping)
        if images:
            data["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
            if self.cross_image_size:
                cross = clip_image_processor(self.cross_image_size)
                data["cross_pixel_values"] = cross(images, return_tensors="pt")["pixel_values"]
        if return_text_replacement_offsets:  # offsets already refer to the text as given
            data["text_replacement_offsets"] = [[] for _ in texts]
        return BatchFeature(data, tensor_type=None)

    def _pad(self, encoded, want_offsets: bool) -> dict:
        width = max((len(e[0]) for e in encoded), default=0)
        pad_id, left = self.image_token_id, self.tokenizer.padding_side == "left"
        out = {"input_ids": [], "attention_mask": [], "token_type_ids": [], "offset_mapping": []}
        for ids, types, offsets, _ in encoded:
            fill = width - len(ids)

            def place(row, value):
                return [value] * fill + row if left else row + [value] * fill
            out["input_ids"].append(place(ids, pad_id))
            out["attention_mask"].append(place([1] * len(ids), 0))
            out["token_type_ids"].append(place(types, 0))
            if want_offsets:
                out["offset_mapping"].append(place(offsets, (0, 0)))
        data = {k: torch.tensor(out[k], dtype=torch.long) for k in ("input_ids", "attention_mask", "token_type_ids")}
        if want_offsets:
            offsets = torch.tensor(out["offset_mapping"], dtype=torch.long)
            data["offset_mapping"] = offsets.reshape(len(encoded), width, 2)
        return data

    @property
    def model_input_names(self):
        names = ["input_ids", "attention_mask", "token_type_ids", "pixel_values"]
        return names + (["cross_pixel_values"] if self.cross_image_size else [])
