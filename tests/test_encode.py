"""Label masking: exactly the assistant tokens carry labels, never image or prompt tokens."""

import pytest
from PIL import Image
from transformers import AutoProcessor

from mixtune.data.conversation import Conversation, Turn
from mixtune.data.encode import IGNORE_INDEX, encode_with_processor
from mixtune.data.templates import make_renderer
from mixtune.models.registry import get_family


def two_turn_conversation():
    return Conversation(turns=[Turn("user", "<image>What colour is it?"), Turn("assistant", "red"),
                               Turn("user", "And the shape?"), Turn("assistant", "a round circle")],
                        images=["unused"], file="mem.json", index=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_labels_are_exactly_assistant_tokens(tiny_model_dir, family):
    path = tiny_model_dir(family)
    processor = AutoProcessor.from_pretrained(path)
    fam = get_family(family)
    render = make_renderer(processor, None, fam.image_placeholder)
    enc = encode_with_processor(two_turn_conversation(), [Image.new("RGB", (112, 112), "red")], processor, render)
    tok = processor.tokenizer
    labelled = enc.labels != IGNORE_INDEX
    # the labelled tokens decode to the two replies, each followed by the end-of-turn marker
    eos = tok.eos_token
    pieces, current = [], []
    for i, is_label in enumerate(labelled.tolist()):
        if is_label:
            current.append(int(enc.input_ids[i]))
        elif current:
            pieces.append(tok.decode(current))
            current = []
    if current:
        pieces.append(tok.decode(current))
    assert [p.strip() for p in pieces] == [f"red{eos}", f"a round circle{eos}"]
    # labels equal the input ids where set
    assert (enc.labels[labelled] == enc.input_ids[labelled]).all()
    # no image token and no prompt token is labelled
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    n_image = int((enc.input_ids == image_id).sum())
    assert n_image >= 16
    assert not labelled[enc.input_ids == image_id].any()
    assert "USER" not in "".join(pieces) and "user" not in "".join(pieces)


def test_paddlemix_chat_template_json(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen2_vl")
    processor = AutoProcessor.from_pretrained(path)
    fam = get_family("qwen2_vl")
    tpl = tmp_path / "chat_template.json"
    tpl.write_text('{"system": "SYS ", "conversation": ["Q: {{user}} A:", " {{bot}}<|im_end|>"], '
                   '"query": "Q: {{query}} A:"}')
    render = make_renderer(processor, str(tpl), fam.image_placeholder)
    conv = two_turn_conversation()
    from mixtune.data.templates import to_messages
    text = render(to_messages(conv), False)
    assert text == ("SYS Q: <|vision_start|><|image_pad|><|vision_end|>What colour is it? A: red<|im_end|>"
                    "Q: And the shape? A: a round circle<|im_end|>")
    enc = encode_with_processor(conv, [Image.new("RGB", (112, 112), "red")], processor, render)
    labelled = enc.input_ids[enc.labels != IGNORE_INDEX]
    assert processor.tokenizer.decode(labelled) == " red<|im_end|> a round circle<|im_end|>"


def test_jinja_chat_template_file(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen2_vl")
    processor = AutoProcessor.from_pretrained(path)
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}[{{ m['role'] }}]{% for p in m['content'] %}"
                   "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}"
                   "{{ p['text'] }}{% endif %}{% endfor %}{% if m['role'] == 'assistant' %}<|im_end|>{% endif %}"
                   "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    render = make_renderer(processor, str(tpl), get_family("qwen2_vl").image_placeholder)
    enc = encode_with_processor(two_turn_conversation(), [Image.new("RGB", (112, 112), "red")], processor, render)
    labelled = enc.input_ids[enc.labels != IGNORE_INDEX]
    assert processor.tokenizer.decode(labelled) == "red<|im_end|>a round circle<|im_end|>"


def test_tokenizer_that_adds_bos_keeps_labels_exact(tiny_model_dir, tmp_path):
    """Llama-style tokenizers add BOS themselves when the template does not; labels must not shift."""
    from tokenizers.processors import TemplateProcessing

    processor = AutoProcessor.from_pretrained(tiny_model_dir("llava"))
    tok = processor.tokenizer
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    render = make_renderer(processor, None, get_family("llava").image_placeholder)
    enc = encode_with_processor(two_turn_conversation(), [Image.new("RGB", (112, 112), "red")], processor, render)
    assert int(enc.input_ids[0]) == tok.bos_token_id
    assert tok.decode(enc.input_ids[enc.labels != IGNORE_INDEX]) == " red</s> a round circle</s>"
