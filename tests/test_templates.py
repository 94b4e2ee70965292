"""Chat templates: user templates render in a sandbox, datasets pickle for `spawn` workers, and the template
training used is the one saved with the model."""

import os
import pickle

import jinja2
import pytest
import torch
from transformers import AutoProcessor

from conftest import red_image, write_config, write_json
from mixtune.config import load_config
from mixtune.data.templates import make_renderer, paddle_to_jinja
from mixtune.errors import ConfigError
from mixtune.models.registry import get_family

QWEN_IMAGE = get_family("qwen2_vl").image_placeholder
# PaddleMIX's chat_template.json shape (Qwen-VL style, ChatML markup)
PADDLE_TEMPLATE = {
    "system": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "conversation": ["<|im_start|>user\n{{user}}<|im_end|>\n<|im_start|>assistant\n", "{{bot}}<|im_end|>\n"],
    "query": "<|im_start|>user\n{{query}}<|im_end|>\n<|im_start|>assistant\n",
}

FILE_PAYLOAD = "{{{{ cycler.__init__.__globals__.os.system('touch {target}') }}}}"
MRO_PAYLOAD = "{{ ''.__class__.__mro__[1].__subclasses__() }}"


def messages(last_reply=True):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            {"role": "user", "content": [{"type": "text", "text": "And the shape?\n"}]}]
    if last_reply:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": "a circle"}]})
    return msgs


def test_paddlemix_spec_renders_by_paddlenlp_rule(tiny_model_dir, tmp_path):
    """system + (user, bot) pairs through `conversation`; the last user turn through `query` when a reply is
    to be generated; `index` counts turns; leading newlines and trailing spaces of sub-templates survive."""
    processor = AutoProcessor.from_pretrained(tiny_model_dir("qwen2_vl"))
    spec = {"system": "S\n", "conversation": ["\n[{{index}}] U: {{user}}  ", "B: {{bot}}\n"],
            "query": "Q{{index}}: {{query}} A:"}
    path = write_json(tmp_path / "chat_template.json", spec)
    render = make_renderer(processor, path, QWEN_IMAGE)
    assert render(messages(), False) == (f"S\n\n[0] U: {QWEN_IMAGE}What colour?  B: red\n"
                                         "\n[1] U: And the shape?\n  B: a circle\n")
    assert render(messages(last_reply=False), True) == (f"S\n\n[0] U: {QWEN_IMAGE}What colour?  B: red\n"
                                                        "Q1: And the shape?\n A:")
    with_system = [{"role": "system", "content": "Be brief."}] + messages()
    assert render(with_system, False).startswith("Be brief.\n[0] U:")


# ---- (a) the sandbox ----

@pytest.mark.parametrize("payload", ["file", "mro"])
@pytest.mark.parametrize("kind", ["paddle_json", "jinja"])
def test_template_payloads_are_stopped(tiny_model_dir, tmp_path, payload, kind):
    processor = AutoProcessor.from_pretrained(tiny_model_dir("qwen2_vl"))
    target = tmp_path / "pwned"
    text = FILE_PAYLOAD.format(target=target) if payload == "file" else MRO_PAYLOAD
    if kind == "paddle_json":
        path = write_json(tmp_path / "chat_template.json", {"conversation": [text + "{{user}}", "{{bot}}"]})
    else:
        path = tmp_path / "t.jinja"
        path.write_text(text + "{% for m in messages %}{{ m['role'] }}{% endfor %}")
    # refused when the template is read (a probe render), and again at any later render
    with pytest.raises(ConfigError, match="unsafe operation and was stopped by the sandbox"):
        make_renderer(processor, str(path), QWEN_IMAGE)
    from mixtune.data.templates import ChatTemplate, read_template_file

    render = ChatTemplate(processor, read_template_file(str(path), QWEN_IMAGE), str(path))
    with pytest.raises(ConfigError, match="unsafe operation and was stopped by the sandbox"):
        render(messages(), False)
    assert not target.exists()


def test_file_payload_is_real_outside_the_sandbox(tmp_path):
    """The payload above does create the file when rendered by an unsandboxed jinja2 Environment (PaddleMIX's
    old path), so the test above can fail."""
    target = tmp_path / "pwned"
    jinja2.Environment().from_string(FILE_PAYLOAD.format(target=target)).render()
    assert target.exists()


def test_payload_in_a_training_run_stops_it_and_runs_nothing(tiny_model_dir, tmp_path):
    from mixtune.train.run import train

    target = tmp_path / "pwned"
    write_json(tmp_path / "chat_template.json",
               {"conversation": [FILE_PAYLOAD.format(target=target) + "{{user}}", "{{bot}}"]})
    img = red_image(tmp_path / "red.png")
    data = write_json(tmp_path / "train.json", [{"image": img, "conversations": [["<image>Colour?", "red"]]}] * 2)
    cfg = write_config(tmp_path, tiny_model_dir("qwen2_vl"), data, dataset={"train": [
        {"name": "chatml_dataset", "data_files": data, "chat_template": "chat_template.json"}]})
    with pytest.raises(ConfigError, match="unsafe"):
        train(load_config(cfg))
    assert not target.exists()


# ---- (b) pickling and spawn workers ----

def _train_set(tiny_model_dir, tmp_path, family="qwen2_vl"):
    from mixtune.data.dataset import build_split
    from mixtune.models.loading import load_model_and_processor

    fam, _, processor = load_model_and_processor(tiny_model_dir(family), None)
    write_json(tmp_path / "chat_template.json", PADDLE_TEMPLATE)
    img = red_image(tmp_path / "red.png")
    records = [{"image": img, "conversations": [[f"<image>Colour {i}?", "red"], ["Shape?", "a circle"]]}
               for i in range(4)]
    data = write_json(tmp_path / "train.json", records)
    entries = [{"name": "chatml_dataset", "data_files": data, "chat_template": "chat_template.json"}]
    return build_split(entries, "train", processor, fam, 512, str(tmp_path)), processor


def test_dataset_pickles_and_spawn_workers_give_the_same_batch(tiny_model_dir, tmp_path):
    from mixtune.data.collate import PadCollator

    train_set, processor = _train_set(tiny_model_dir, tmp_path)
    again = pickle.loads(pickle.dumps(train_set))
    assert torch.equal(again[1].input_ids, train_set[1].input_ids)
    assert torch.equal(again[1].labels, train_set[1].labels)

    collate = PadCollator(processor.tokenizer.pad_token_id)

    def first_batch(**kw):
        loader = torch.utils.data.DataLoader(train_set, batch_size=2, collate_fn=collate, **kw)
        return next(iter(loader))

    inline = first_batch(num_workers=0)
    spawned = first_batch(num_workers=1, multiprocessing_context="spawn")
    assert inline.keys() == spawned.keys()
    for key in inline:
        assert torch.equal(inline[key], spawned[key]), key


# ---- (c) the training template is saved with the model ----

@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_reloaded_processor_renders_as_training_did(tiny_model_dir, tmp_path, family):
    from mixtune.train.run import train

    fam = get_family(family)
    spec = {**PADDLE_TEMPLATE, "system": "SYSTEM PROMPT\n"}
    write_json(tmp_path / "chat_template.json", spec)
    img = red_image(tmp_path / "red.png")
    data = write_json(tmp_path / "train.json",
                      [{"image": img, "conversations": [["<image>Colour?", "red"], ["Shape?", "round"]]}] * 2)
    cfg = load_config(write_config(tmp_path, tiny_model_dir(family), data, max_steps=2, dataset={"train": [
        {"name": "chatml_dataset", "data_files": data, "chat_template": "chat_template.json"}]}))
    train(cfg)
    out = cfg.training.output_dir
    base = AutoProcessor.from_pretrained(tiny_model_dir(family))
    training_render = make_renderer(base, str(tmp_path / "chat_template.json"), fam.image_placeholder)
    reloaded = AutoProcessor.from_pretrained(out)
    for msgs, gen in ((messages(), False), (messages(last_reply=False), True), (messages(last_reply=False), False)):
        expected = training_render(msgs, gen)
        assert reloaded.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == expected
    # and that is PaddleMIX's rule, not the checkpoint's own template
    assert training_render(messages(last_reply=False), True) == (
        f"SYSTEM PROMPT\n<|im_start|>user\n{fam.image_placeholder}What colour?<|im_end|>\n<|im_start|>assistant\n"
        "red<|im_end|>\n<|im_start|>user\nAnd the shape?\n<|im_end|>\n<|im_start|>assistant\n")
    with open(os.path.join(out, "chat_template.jinja"), encoding="utf-8") as f:
        saved = f.read()
    assert saved == paddle_to_jinja(spec, fam.image_placeholder, "x")


def test_several_templates_save_the_first_and_say_so(tiny_model_dir, tmp_path, caplog):
    from mixtune.train.run import build_trainer

    write_json(tmp_path / "chat_template.json", PADDLE_TEMPLATE)
    img = red_image(tmp_path / "red.png")
    a = write_json(tmp_path / "a.json", [{"image": img, "conversations": [["<image>Colour?", "red"]]}] * 2)
    b = write_json(tmp_path / "b.json", [{"image": img, "conversations": [["<image>Colour?", "red"]]}] * 2)
    cfg = load_config(write_config(tmp_path, tiny_model_dir("qwen2_vl"), a, dataset={"train": [
        {"name": "chatml_dataset", "data_files": a, "chat_template": "chat_template.json"},
        {"name": "chatml_dataset", "data_files": b}]}))
    with caplog.at_level("WARNING", logger="mixtune"):
        trainer = build_trainer(cfg)
    assert trainer.processing_class.chat_template == paddle_to_jinja(PADDLE_TEMPLATE, QWEN_IMAGE, "x")
    assert "different chat templates" in caplog.text and "saved with a's" in caplog.text and "b" in caplog.text


def test_renderers_read_no_template_after_construction(tiny_model_dir):
    """Replacing the processor's template for saving must not change how entries using the checkpoint's own
    template render."""
    processor = AutoProcessor.from_pretrained(tiny_model_dir("qwen2_vl"))
    render = make_renderer(processor, None, QWEN_IMAGE)
    before = render(messages(), False)
    processor.chat_template = "{{ 'changed' }}"
    assert render(messages(), False) == before

