"""InternLM2's native port (mixtune.native.internlm2): the tokenizer encodes as SentencePiece does with the same
tokenizer.model; the fused wqkv splits into grouped-query heads as published; the KV cache, SDPA, gradient
checkpointing and packed position_ids compute what the plain forward computes; the published names and
rope_scaling survive a save; `linear_class` swaps every projection. (Its logits against PaddleMIX's own InternLM2
are checked through InternVL2 in test_native_internvl_chat.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from mixtune.native.internlm2 import InternLM2Config, InternLM2ForCausalLM, InternLM2Model, InternLM2Tokenizer
from mixtune.native.internlm2.tokenization_internlm2 import train_tiny_spm


def tiny_config(**overrides) -> InternLM2Config:
    sizes = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=20.0, initializer_range=0.1)
    return InternLM2Config(**{**sizes, **overrides})


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    from mixtune.models.tokenizer import _CORPUS

    return train_tiny_spm(str(tmp_path_factory.mktemp("spm")), _CORPUS * 3 + "你好 ünïcode\n", vocab_size=400,
                          user_defined=("<|im_start|>", "<|im_end|>"))


def test_tokenizer_encodes_as_sentencepiece(spm_file, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    reference = spm.SentencePieceProcessor(model_file=spm_file)
    tok = InternLM2Tokenizer(vocab_file=spm_file)
    texts = ["What colour is the shape?  Answer: red!\n\n 12345 ünïcode 你好 ¿",
             "<|im_start|>user\nWhat shape?<|im_end|>", " leading space", ""]
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == reference.encode(text)
    assert tok("red")["input_ids"] == [1] + reference.encode("red")  # <s> first, as published; no </s>
    assert tok.decode(tok("What colour? 12")["input_ids"], skip_special_tokens=True) == "What colour? 12"
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == open(spm_file, "rb").read()
    tiny_config(vocab_size=len(tok)).save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(texts[0])["input_ids"] == tok(texts[0])["input_ids"]


def test_wqkv_is_split_per_key_value_group_as_published():
    """Reference: the published layout (kv head h holds [its 2 query heads | key | value]) written out by hand."""
    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=1)
    model = InternLM2ForCausalLM(config).eval()
    attn = model.model.layers[0].attention
    x = torch.randn(1, 5, 64)
    d, groups = config.head_dim, 2
    w = attn.wqkv.weight.view(2, groups + 2, d, 64)
    b = attn.wqkv.bias.view(2, groups + 2, d)
    q = torch.stack([x @ w[h, g].T + b[h, g] for h in range(2) for g in range(groups)], 1)  # heads kv-major
    k = torch.stack([x @ w[h, groups].T + b[h, groups] for h in range(2)], 1)
    v = torch.stack([x @ w[h, groups + 1].T + b[h, groups + 1] for h in range(2)], 1)
    pos = torch.arange(5)[None]
    cos, sin = model.model.rotary_emb(pos, 5, x.dtype)
    from mixtune.native.internlm2.modeling_internlm2 import rotate_half

    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) / d ** 0.5 + torch.full((5, 5), float("-inf")).triu(1)
    expected = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 5, 64))
    with torch.no_grad():
        got = attn(x, (cos, sin), attention_mask=None)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_cache_sdpa_and_generation_agree_with_the_plain_forward():
    torch.manual_seed(0)
    model = InternLM2ForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 97, (2, 12))
    with torch.no_grad():
        sdpa = model(ids).logits
        model.config._attn_implementation = "eager"
        eager = model(ids).logits
        torch.testing.assert_close(sdpa, eager, rtol=0, atol=1e-5)
        gen = model.generate(ids[:1, :4], max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        assert gen.sequences.shape == (1, 12)
        full = model(gen.sequences).logits
    # each cached step's logits = the full forward's at that position
    torch.testing.assert_close(torch.cat(gen.logits), full[0, 3:-1], rtol=0, atol=1e-5)


def test_packed_rows_equal_the_samples_alone():
    torch.manual_seed(0)
    model = InternLM2ForCausalLM(tiny_config()).eval()
    a, b = torch.randint(3, 97, (1, 7)), torch.randint(3, 97, (1, 5))
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        got = model(packed, position_ids=positions, use_cache=False).logits
        torch.testing.assert_close(got[:, :7], model(a).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(got[:, 7:], model(b).logits, rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = InternLM2ForCausalLM(tiny_config())
    ids = torch.randint(3, 97, (2, 9))
    model.train()
    model(ids, labels=ids).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for p, g in zip(model.parameters(), plain):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-6)


def test_rope_scaling_as_published():
    ids = torch.arange(3, 23)[None]
    torch.manual_seed(0)
    plain = InternLM2ForCausalLM(tiny_config(max_position_embeddings=8)).eval()
    dynamic = InternLM2ForCausalLM(tiny_config(max_position_embeddings=8,
                                               rope_scaling={"type": "dynamic", "factor": 2.0})).eval()
    dynamic.load_state_dict(plain.state_dict())
    with torch.no_grad():
        # within max_position_embeddings nothing changes; past it the base is stretched
        torch.testing.assert_close(dynamic(ids[:, :8]).logits, plain(ids[:, :8]).logits, rtol=0, atol=0)
        assert (dynamic(ids).logits - plain(ids).logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="rope_scaling"):
        tiny_config(rope_scaling={"type": "yarn", "factor": 2.0})


def test_saved_folder_keeps_published_names_and_config(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = InternLM2ForCausalLM(tiny_config(rope_scaling={"type": "dynamic", "factor": 2.0},
                                             attn_implementation="flash_attention_2"))
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    per_layer = {"attention.wqkv.weight", "attention.wqkv.bias", "attention.wo.weight", "attention.wo.bias",
                 "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
                 "attention_norm.weight", "ffn_norm.weight"}
    assert keys == {"model.tok_embeddings.weight", "model.norm.weight", "output.weight"} | {
        f"model.layers.{i}.{k}" for i in range(2) for k in per_layer}
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "internlm2" and saved["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    again = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code
    assert type(again) is InternLM2ForCausalLM
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_linear_class_swaps_every_projection():
    calls = []

    class Recording(torch.nn.Linear):
        def forward(self, x, im_mask=None):
            calls.append(im_mask)
            return super().forward(x)

    class Model(InternLM2Model):
        linear_class = Recording

    class LM(InternLM2ForCausalLM):
        model_class = Model

    model = LM(tiny_config()).eval()
    assert sum(isinstance(m, Recording) for m in model.modules()) == 2 * 5
    with torch.no_grad():
        model(torch.randint(3, 97, (1, 4)), linear_kwargs={"im_mask": "mask"})
    assert calls == ["mask"] * 10
