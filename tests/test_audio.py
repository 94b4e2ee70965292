"""Audio inputs: readers, decoding and resampling, max_audio_seconds, bad audio, labels, training and reload on
tiny Qwen2-Audio. Tones are generated here as wav files."""

import base64
import json

import pytest
import torch
from transformers import AutoModelForMultimodalLM, AutoProcessor

from conftest import write_config
from mixtune.config import load_config
from mixtune.data.dataset import DatasetEntry, build_split, read_entry
from mixtune.data.encode import IGNORE_INDEX, media_inputs
from mixtune.errors import ConfigError, DataError
from mixtune.media.audio import AudioBudget, load_audio
from mixtune.models.registry import families, get_family
from video_fixtures import write_tone


def test_audio_families():
    assert [f.name for f in families() if "audio" in f.media_kinds] == ["qwen2_audio"]
    assert get_family("qwen2_audio").media_kinds == ("audio",)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


def ask(audios=None, question="<audio>Which tone is it?", answer="low"):
    row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if audios is not None:
        row["audios"] = audios
    return row


def entry(tmp_path, name, data_files, **keys):
    return DatasetEntry.from_config({"name": name, "data_files": data_files, **keys}, str(tmp_path), "test")


@pytest.fixture
def tones(tmp_path):
    write_tone(tmp_path / "low.wav", 440)
    write_tone(tmp_path / "high.wav", 1320)
    return tmp_path


@pytest.fixture(scope="module")
def qwen_audio(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir("qwen2_audio")), get_family("qwen2_audio")


def test_readers_carry_audio_from_every_shape(tones):
    t = tones
    b64 = base64.b64encode((t / "low.wav").read_bytes()).decode()
    records = [ask(["low.wav"]),
               {"messages": [{"role": "user", "content": [
                   {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
                   {"type": "text", "text": "Which?"}]}, {"role": "assistant", "content": "low"}]},
               {"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "high.wav"}}]},
                             {"role": "assistant", "content": "high"}]},
               {"audio": "high.wav", "messages": [{"role": "user", "content": "Which?"},
                                                  {"role": "assistant", "content": "high"}]}]
    convs = read_entry(entry(t, "messages", write_jsonl(t / "d.jsonl", records)))
    assert [c.audios for c in convs[:1] + convs[2:]] == [[str(t / "low.wav")], [str(t / "high.wav")],
                                                         [str(t / "high.wav")]]
    assert convs[1].audios == [f"data:audio/wav;base64,{b64}"]
    assert [c.turns[-2].text for c in convs] == ["<audio>Which tone is it?", "<audio>Which?", "<audio>",
                                                 "<audio>Which?"]
    # decoded alike from the file and from the inline base64
    budget = AudioBudget(rate=16000)
    assert torch.equal(torch.from_numpy(load_audio(convs[0].audios[0], budget).samples),
                       torch.from_numpy(load_audio(convs[1].audios[0], budget).samples))


def test_audio_is_resampled_to_the_processor_rate(tones):
    clip = load_audio(str(tones / "low.wav"), AudioBudget(rate=16000))  # written at 22050 Hz, 1 s
    assert clip.rate == 16000 and abs(len(clip.samples) - 16000) <= 32
    # still a 440 Hz tone: the spectrum's peak
    spectrum = torch.fft.rfft(torch.from_numpy(clip.samples)).abs()
    assert abs(spectrum.argmax().item() * 16000 / len(clip.samples) - 440) < 5


def test_over_long_audio_is_a_bad_sample_never_cut(tones, qwen_audio):
    write_tone(tones / "long.wav", 440, seconds=31, rate=8000)
    write_jsonl(tones / "d.jsonl", [ask(["low.wav"]), ask(["long.wav"]), ask(["high.wav"])])
    mix = build_split([{"name": "messages", "data_files": "d.jsonl", "on_bad_sample": "skip"}], "train",
                      *qwen_audio, 1024, str(tones))
    assert [c.index for c in mix.parts[0].conversations] == [0, 2]
    assert "audio is 31.0 s, over max_audio_seconds 30" in mix.skipped[0]["reason"]  # Whisper reads 30 s
    with pytest.raises(DataError, match="audio is 1.0 s, over max_audio_seconds 0.5") as e:
        build_split([{"name": "messages", "data_files": "d.jsonl", "max_audio_seconds": 0.5}], "train",
                    *qwen_audio, 1024, str(tones))
    assert (e.value.index, e.value.field) == (0, "audios")
    with pytest.raises(ConfigError, match="positive number"):
        entry(tones, "messages", "d.jsonl", max_audio_seconds=-1)


def test_bad_audio_is_named_or_counted(tones, qwen_audio):
    (tones / "corrupt.wav").write_bytes(b"RIFF" + bytes(range(200)))
    (tones / "empty.wav").write_bytes(b"")
    cases = {"corrupt.wav": "cannot decode audio", "empty.wav": "audio file is empty",
             "missing.wav": "audio not found", "data:audio/wav;base64,@@@": "not valid base64"}
    for ref, reason in cases.items():
        write_jsonl(tones / "d.jsonl", [ask(["low.wav"]), ask([ref])])
        with pytest.raises(DataError) as e:
            build_split([{"name": "messages", "data_files": "d.jsonl"}], "train", *qwen_audio, 1024, str(tones))
        assert (e.value.index, e.value.field) == (1, "audios") and reason in e.value.reason, (ref, e.value.reason)
    write_jsonl(tones / "d.jsonl", [ask(["low.wav"])] + [ask([ref]) for ref in cases])
    mix = build_split([{"name": "messages", "data_files": "d.jsonl", "on_bad_sample": "skip"}], "train",
                      *qwen_audio, 1024, str(tones))
    assert len(mix) == 1 and [r["index"] for r in mix.skipped] == [1, 2, 3, 4]


def test_families_refuse_the_media_they_do_not_read(tones, tiny_model_dir, qwen_audio):
    from PIL import Image

    Image.new("RGB", (56, 56)).save(tones / "a.png")
    write_jsonl(tones / "d.jsonl", [ask(["low.wav"])])
    qwen_vl = AutoProcessor.from_pretrained(tiny_model_dir("qwen2_vl")), get_family("qwen2_vl")
    with pytest.raises(DataError, match="audio inputs are not supported by family qwen2_vl") as e:
        build_split([{"name": "messages", "data_files": "d.jsonl"}], "train", *qwen_vl, 1024, str(tones))
    assert e.value.field == "audios"
    write_jsonl(tones / "d.jsonl", [{**ask(), "messages": [{"role": "user", "content": "<image>Hi"},
                                                           {"role": "assistant", "content": "hi"}],
                                     "images": ["a.png"]}])
    with pytest.raises(DataError, match="image inputs are not supported by family qwen2_audio"):
        build_split([{"name": "messages", "data_files": "d.jsonl"}], "train", *qwen_audio, 1024, str(tones))


def test_labels_cover_exactly_the_reply(tones, qwen_audio):
    processor = qwen_audio[0]
    write_jsonl(tones / "d.jsonl", [ask(["low.wav"]), ask(["high.wav", "low.wav"], "<audio><audio>Same?", "no")])
    mix = build_split([{"name": "messages", "data_files": "d.jsonl"}], "train", *qwen_audio, 1024, str(tones))
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    for i, (answer, clips) in enumerate((("low", 1), ("no", 2))):
        enc = mix.parts[0][i]
        assert processor.decode(enc.labels[enc.labels != IGNORE_INDEX]) == answer + "<|im_end|>"
        # 1 s at 16 kHz: 100 mel frames -> 50 after the encoder's stride -> 25 after its pooling, per clip
        assert (enc.input_ids == audio_id).sum().item() == 25 * clips
        assert enc.media["input_features"].shape[0] == clips


def test_audio_training_lowers_loss_and_reloads_with_equal_logits(tiny_model_dir, tones):
    from mixtune.train.run import build_trainer

    rows = [ask(["low.wav"]), ask(["high.wav"], answer="high")] * 3
    train_file = str(tones / write_jsonl(tones / "train.jsonl", rows))
    cfg = load_config(write_config(tones, tiny_model_dir("qwen2_audio"), train_file, max_steps=8,
                                   learning_rate=5e-3, lr_scheduler_type="constant",
                                   dataset={"train": [{"name": "messages", "data_files": train_file}]}))
    trainer = build_trainer(cfg)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0], losses
    out = cfg.training.output_dir
    trainer.save_model(out)

    model = AutoModelForMultimodalLM.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    msgs = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Which tone is it?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def inputs(name):
        return processor(text=[text], **media_inputs(processor, [load_audio(str(tones / name), AudioBudget())]),
                         return_tensors="pt")

    with torch.no_grad():
        logits = model(**inputs("low.wav")).logits
        assert torch.allclose(trainer.model.eval()(**inputs("low.wav")).logits, logits, atol=1e-5)
        other = model(**inputs("high.wav")).logits
    assert (other - logits).abs().max() > 1e-3  # the model hears the clip


def test_predict_answers_audio_prompts_at_the_processor_rate(tones, tiny_model_dir, tmp_path):
    """`mixtune predict` reads audio like training: resampled, each clip reaching the model."""
    from mixtune.infer.engine import Engine, GenerationOptions
    from mixtune.infer.predict import predict, read_prompts

    write_jsonl(tones / "p.jsonl", [ask(["low.wav"]), ask(["high.wav"])])
    items = read_prompts([entry(tones, "messages", "p.jsonl")])
    assert [i.conv.audios for i in items] == [[str(tones / "low.wav")], [str(tones / "high.wav")]]
    summary = predict(Engine.load(tiny_model_dir("qwen2_audio")), items, GenerationOptions(max_new_tokens=2),
                      str(tmp_path / "preds"), metrics=("exact_match",), progress=False)
    rows = [json.loads(line) for line in open(summary["predictions"])]
    assert len(rows) == 2 and all(isinstance(r["prediction"], str) for r in rows)
