"""Nothing a record says is silently thrown away: each field is honoured, or the sample is refused naming
its file, index and field. Fixtures are written in the shapes other toolkits' data uses (LLaMA-Factory's
mllm demos, ms-swift's loss / grounding / query-response data, Qwen-VL's <img> tags)."""

import json
import logging
import re

import pytest
from PIL import Image
from transformers import AutoProcessor

from conftest import write_json
from mixtune.config import load_config
from mixtune.data.conversation import Conversation, Objects, Turn
from mixtune.data.dataset import DatasetEntry, build_split, read_entry
from mixtune.data.encode import IGNORE_INDEX
from mixtune.data.grounding import fill_grounding
from mixtune.data.images import fit_image, load_image
from mixtune.errors import DataError
from mixtune.models.registry import get_family


@pytest.fixture(scope="module")
def qwen(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir("qwen2_vl")), get_family("qwen2_vl")


@pytest.fixture(scope="module")
def llava(tiny_model_dir):
    """A family without video support: video samples are refused naming it."""
    return AutoProcessor.from_pretrained(tiny_model_dir("llava")), get_family("llava")


def entry(tmp_path, name, data_files, **keys):
    return DatasetEntry.from_config({"name": name, "data_files": data_files, **keys}, str(tmp_path), "test")


def image(path, size=(112, 112), colour="red"):
    Image.new("RGB", size, colour).save(path)
    return path.name


def good(reader="sharegpt"):
    if reader == "llava":
        return {"image": "red.png", "conversations": [{"from": "human", "value": "<image>Colour?"},
                                                      {"from": "gpt", "value": "red"}]}
    return {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
            "images": ["red.png"]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


def user_assistant(q="<video>Why is this video funny?", a="Because a baby is reading."):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


# ---- videos and audio for a family without them: refused, never trained with literal placeholders ----

MEDIA_CASES = {
    # LLaMA-Factory's mllm_video_demo / mllm_audio_demo / mllm_video_audio_demo
    "video_demo": ("chatml_dataset", {"messages": user_assistant(), "videos": ["mllm_demo_data/1.mp4"]},
                   "videos", "the sample has 1 video(s): video inputs are not supported by family llava"),
    "audio_demo": ("sharegpt", {"messages": user_assistant("<audio>What's that sound?", "Glass."),
                                "audios": ["mllm_demo_data/1.mp3"]},
                   "audios", "the sample has 1 audio(s): audio inputs are not supported by family llava"),
    "video_audio_demo": ("messages", {"messages": user_assistant("<video><audio>What is it?", "A talk."),
                                      "videos": ["1.mp4"], "audios": ["1.mp3"]},
                         "videos", "video inputs are not supported by family llava"),
    # a placeholder with no media key at all is still refused
    "llava_placeholder_only": ("llava", {"conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                                           {"from": "gpt", "value": "A dog runs."}]},
                               "videos", "1 '<video>' placeholder(s) but 0 video(s)"),
    "openai_video_url_part": ("sharegpt", {"messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "a.mp4"}},
                                     {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": "A dog runs."}]},
        "videos", "video inputs are not supported by family llava"),
    "openai_input_audio_part": ("sharegpt", {"messages": [
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]},
        {"role": "assistant", "content": "Silence."}]},
        "audios", "audio inputs are not supported by family llava"),
}


@pytest.mark.parametrize("case", sorted(MEDIA_CASES))
def test_video_and_audio_samples_are_refused_with_file_index_field(tmp_path, llava, case):
    reader, record, field, reason = MEDIA_CASES[case]
    image(tmp_path / "red.png")
    write_jsonl(tmp_path / "d.jsonl", [good(reader), record])
    with pytest.raises(DataError) as info:
        build_split([{"name": reader, "data_files": "d.jsonl"}], "train", *llava, 512, str(tmp_path))
    e = info.value
    assert (e.file, e.index, e.field) == (str(tmp_path / "d.jsonl"), 1, field)
    assert reason in e.reason


def test_video_samples_are_counted_under_skip_and_the_rest_trains(tmp_path, llava):
    image(tmp_path / "red.png")
    rows = [good(), MEDIA_CASES["video_demo"][1], good(), MEDIA_CASES["openai_video_url_part"][1], good()]
    write_jsonl(tmp_path / "d.jsonl", rows)
    mix = build_split([{"name": "sharegpt", "data_files": "d.jsonl", "on_bad_sample": "skip"}], "train", *llava, 512,
                      str(tmp_path))
    assert [c.index for c in mix.parts[0].conversations] == [0, 2, 4]
    assert [(r["index"], r["field"]) for r in mix.skipped] == [(1, "videos"), (3, "videos")]
    assert all("video inputs are not supported by family llava" in r["reason"] for r in mix.skipped)


def test_hf_videos_column_and_empty_image_are_counted_bad_samples(tmp_path, qwen):
    import datasets

    image(tmp_path / "red.png")
    messages = [user_assistant("<image>Colour?", "red")] * 3
    datasets.Dataset.from_dict({"messages": messages, "images": [["red.png"], [""], ["red.png"]],
                                "videos": [[], [], ["clip.mp4"]]}).to_parquet(str(tmp_path / "d.parquet"))
    mix = build_split([{"name": "hf", "data_files": "d.parquet", "on_bad_sample": "skip"}], "train", *qwen, 512,
                      str(tmp_path))
    assert len(mix) == 1 and mix.parts[0].conversations[0].index == 0
    reasons = {r["index"]: (r["field"], r["reason"]) for r in mix.skipped}
    assert reasons[1] == ("images", "image reference must be a non-empty string, got ''")
    assert reasons[2][0] == "videos" and "video inputs are not supported yet" in reasons[2][1]


# ---- ms-swift's per-turn loss ----

def loss_record(loss_key="loss", value=False):
    return {"messages": [{"role": "user", "content": "<image>Colour?"},
                         {"role": "assistant", "content": "crimson maybe", loss_key: value},
                         {"role": "user", "content": "Sure?"},
                         {"role": "assistant", "content": "red"}], "images": ["red.png"]}


def labelled_pieces(enc, tokenizer) -> list[str]:
    pieces, current = [], []
    for token, label in zip(enc.input_ids.tolist(), enc.labels.tolist()):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    return pieces + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("loss_key,value", [("loss", False), ("weight", 0)])
def test_turn_with_loss_false_carries_no_labels_and_the_others_do(tmp_path, qwen, loss_key, value):
    processor, family = qwen
    image(tmp_path / "red.png")
    plain = loss_record()
    del plain["messages"][1]["loss"]
    write_jsonl(tmp_path / "d.jsonl", [loss_record(loss_key, value), plain])
    mix = build_split([{"name": "sharegpt", "data_files": "d.jsonl"}], "train", processor, family, 512, str(tmp_path))
    excluded, full = mix[0], mix[1]
    assert (excluded.input_ids == full.input_ids).all()  # the text is the same; only the labels differ
    tok = processor.tokenizer
    assert [p.strip() for p in labelled_pieces(full, tok)] == [f"crimson maybe{tok.eos_token}", f"red{tok.eos_token}"]
    assert [p.strip() for p in labelled_pieces(excluded, tok)] == [f"red{tok.eos_token}"]
    # exactly the excluded reply's tokens became -100; every other label is unchanged
    changed = (excluded.labels != full.labels).nonzero().flatten().tolist()
    assert (excluded.labels[changed] == IGNORE_INDEX).all()
    assert tok.decode(full.input_ids[changed]).strip() == f"crimson maybe{tok.eos_token}"


def test_loss_true_on_a_user_turn_and_all_replies_excluded_are_refused(tmp_path, qwen):
    image(tmp_path / "red.png")
    on_user = loss_record()
    on_user["messages"][1].pop("loss")
    on_user["messages"][2]["loss"] = True
    none_left = loss_record()
    none_left["messages"][3]["loss"] = False
    not_bool = loss_record(value="no")
    write_jsonl(tmp_path / "d.jsonl", [on_user, none_left, not_bool, loss_record()])
    mix = build_split([{"name": "messages", "data_files": "d.jsonl", "on_bad_sample": "skip"}], "train", *qwen, 512,
                      str(tmp_path))
    assert [c.index for c in mix.parts[0].conversations] == [3]
    reasons = {r["index"]: (r["field"], r["reason"]) for r in mix.skipped}
    assert reasons[0] == ("loss", "turn 2 is 'user' with loss: true (or weight: 1); only assistant replies are "
                                  "trained on (remove the key, or make the turn an assistant reply)")
    assert reasons[1] == ("loss", "every assistant turn has loss: false; nothing is left to train on")
    assert reasons[2] == ("loss", "messages[1]: 'loss' must be true or false, got 'no'")


# ---- ms-swift grounding: boxes in each family's own convention ----

def grounding_conv(objects, images):
    return Conversation(turns=[Turn("user", "<image>Find <ref-object>."),
                               Turn("assistant", "<ref-object><bbox> is left of <bbox>.")],
                        images=images, objects=objects, file="g.json", index=0).validate()


def test_grounding_placeholders_become_each_familys_markup(tmp_path, qwen):
    processor, _ = qwen
    path = tmp_path / "wide.png"
    image(path, (200, 100))
    img = load_image(str(path))
    objects = Objects(refs=["the dog", "a dog"], boxes=[[20, 10, 100, 50], [150, 40]])
    qwen_refs = ("<|object_ref_start|>the dog<|object_ref_end|>", "<|object_ref_start|>a dog<|object_ref_end|>")
    expected = {  # family: (the two refs, the two boxes)
        # Qwen2-VL and Qwen3-VL: 0-1000 of the image
        "qwen2_vl": (qwen_refs, ("<|box_start|>(100,100),(500,500)<|box_end|>", "<|box_start|>(750,400)<|box_end|>")),
        "qwen3_vl": (qwen_refs, ("<|box_start|>(100,100),(500,500)<|box_end|>", "<|box_start|>(750,400)<|box_end|>")),
        # Qwen2.5-VL: pixels of the image its processor resizes to: 200x100 -> 140x56 under max 112*112 pixels
        "qwen2_5_vl": (qwen_refs, ("<|box_start|>(14,6),(70,28)<|box_end|>", "<|box_start|>(105,22)<|box_end|>")),
        "internvl": (("<ref>the dog</ref>", "<ref>a dog</ref>"),
                     ("<box>[[100, 100, 500, 500]]</box>", "<box>[[750, 400]]</box>")),
        # families without a convention of their own: the documented default
        "llava": (("the dog", "a dog"), ("[100, 100, 500, 500]", "[750, 400]")),
    }
    for family, ((ref0, ref1), (box0, box1)) in expected.items():
        filled = fill_grounding(grounding_conv(objects, [str(path)]), [img], processor, get_family(family).grounding)
        assert [t.text for t in filled.turns] == [f"<image>Find {ref0}.", f"{ref1}{box0} is left of {box1}."], family
        assert filled.objects is None
    # the size Qwen2.5-VL's coordinates refer to is the one the processor really produces, also under an
    # entry's own max_pixels
    from mixtune.data.dataset import PixelBudgetProcessor
    from mixtune.models.qwen2_vl import resized_image_size

    for proc in (processor, PixelBudgetProcessor(processor, None, 56 * 56)):
        grid = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[img])["image_grid_thw"][0]
        assert resized_image_size(proc, img) == (int(grid[2]) * 14, int(grid[1]) * 14)
    assert resized_image_size(processor, img) == (140, 56)
    assert resized_image_size(PixelBudgetProcessor(processor, None, 56 * 56), img) == (56, 28)


def test_grounding_uses_the_file_pixels_after_resizing_norm1_and_image_id(tmp_path, qwen):
    processor, family = qwen
    image(tmp_path / "a.png", (200, 100))
    image(tmp_path / "b.png", (50, 400))
    a, b = load_image(str(tmp_path / "a.png")), load_image(str(tmp_path / "b.png"))
    shrunk = [fit_image(a, max_pixels=50 * 25), fit_image(b, max_pixels=25 * 200)]
    assert shrunk[0].size == (50, 25)
    conv = Conversation(turns=[Turn("user", "<image><image>Where?"), Turn("assistant", "<bbox> and <bbox>")],
                        images=["a", "b"], objects=Objects([], [[20, 10, 100, 50], [10, 100, 40, 200]],
                                                           image_ids=[0, 1])).validate()
    text = fill_grounding(conv, shrunk, processor, family.grounding).turns[1].text
    assert text == "<|box_start|>(100,100),(500,500)<|box_end|> and <|box_start|>(200,250),(800,500)<|box_end|>"
    norm1 = Conversation(turns=conv.turns, images=conv.images, objects=Objects(
        [], [[0.1, 0.1, 0.5, 0.5], [0.2, 0.25, 0.8, 0.5]], bbox_type="norm1", image_ids=[0, 1])).validate()
    assert fill_grounding(norm1, shrunk, processor, family.grounding).turns[1].text == text


GROUNDING_RECORD = {"messages": [{"role": "user", "content": "<image>Find <ref-object> in the image"},
                                 {"role": "assistant", "content": "<bbox><bbox>"}],
                    "images": ["wide.png"], "objects": {"ref": ["sheep"], "bbox": [[20, 10, 100, 50], [120, 60,
                                                                                                       180, 90]]}}


def test_grounding_record_trains_on_the_rendered_boxes(tmp_path, qwen):
    processor, family = qwen
    image(tmp_path / "wide.png", (200, 100))
    write_jsonl(tmp_path / "g.jsonl", [GROUNDING_RECORD])
    mix = build_split([{"name": "sharegpt", "data_files": "g.jsonl"}], "train", processor, family, 512, str(tmp_path))
    enc = mix[0]
    assert len(enc) == mix.lengths()[0]
    text = processor.tokenizer.decode(enc.input_ids)
    assert "<ref-object>" not in text and "<bbox>" not in text
    assert "Find <|object_ref_start|>sheep<|object_ref_end|> in the image" in text
    labelled = "".join(labelled_pieces(enc, processor.tokenizer))
    assert labelled.strip() == ("<|box_start|>(100,100),(500,500)<|box_end|><|box_start|>(600,600),(900,900)"
                                f"<|box_end|>{processor.tokenizer.eos_token}")


@pytest.mark.parametrize("change,field,reason", [
    (lambda r: r["objects"]["bbox"].pop(), "objects", "2 '<bbox>' placeholder(s) but 1 in objects.bbox"),
    (lambda r: r["objects"]["ref"].append("goat"), "objects", "1 '<ref-object>' placeholder(s) but 2 in objects.ref"),
    (lambda r: r.pop("objects"), "objects", "1 '<ref-object>' placeholder(s) but no 'objects' field"),
    (lambda r: r["messages"][1].update(content="two sheep"), "objects",
     "0 '<bbox>' placeholder(s) but 2 in objects.bbox"),
    (lambda r: r["objects"]["bbox"][0].append(7), "objects",
     "objects.bbox must be a list of boxes [x1, y1, x2, y2] or points [x, y]"),
    (lambda r: r["objects"].update(bbox_type="norm1000"), "objects", "objects.bbox_type must be one of"),
    (lambda r: r["objects"]["bbox"].__setitem__(1, [120, 60, 280, 90]), "objects",
     "objects.bbox [120, 60, 280, 90] lies outside image 0 (200x100 pixels)"),
])
def test_grounding_mismatches_are_bad_samples(tmp_path, qwen, change, field, reason):
    image(tmp_path / "wide.png", (200, 100))
    record = json.loads(json.dumps(GROUNDING_RECORD))
    change(record)
    write_jsonl(tmp_path / "g.jsonl", [GROUNDING_RECORD, record])
    with pytest.raises(DataError) as info:
        build_split([{"name": "sharegpt", "data_files": "g.jsonl"}], "train", *qwen, 512, str(tmp_path))
    e = info.value
    assert (e.file, e.index, e.field) == (str(tmp_path / "g.jsonl"), 1, field)
    assert reason in e.reason, e.reason


# ---- unknown keys: one warning per entry, an error under strict_fields ----

def test_unknown_keys_are_reported_once_per_entry_with_counts(tmp_path, qwen, caplog):
    image(tmp_path / "red.png")
    tools = dict(good(), tools="[]")
    named = good()
    named["messages"][0]["name"] = "alice"
    write_jsonl(tmp_path / "d.jsonl", [tools, good(), named, dict(tools, rejected_response="no")])
    with caplog.at_level(logging.WARNING, logger="mixtune"):
        mix = build_split([{"name": "sharegpt", "data_files": "d.jsonl"}], "train", *qwen, 512, str(tmp_path))
    assert len(mix) == 4
    warnings = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
    assert warnings == ["dataset d: record key(s) that mixtune does not read were ignored: 'messages[].name' "
                        "(1 sample), 'rejected_response' (1 sample), 'tools' (2 samples); they are not trained on "
                        "(strict_fields: true makes this an error)"]


def test_known_keys_of_every_reader_raise_no_warning(tmp_path, qwen, caplog):
    image(tmp_path / "red.png")
    write_jsonl(tmp_path / "msg.jsonl", [dict(good(), id="x1", system="Be brief.")])
    write_json(tmp_path / "llava.json", [{"id": "1", "model": "", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "red"}]}])
    write_json(tmp_path / "cap.json", [{"image": "red.png", "caption": "red", "id": 3}])
    write_json(tmp_path / "vqa.json", [{"image": "red.png", "question": "Colour?", "answer": "red",
                                        "question_id": 7}])
    entries = [{"name": "chatml_dataset", "data_files": "msg.jsonl"}, {"name": "llava", "data_files": "llava.json"},
               {"name": "coco_caption", "data_files": "cap.json"}, {"name": "vqa", "data_files": "vqa.json"}]
    with caplog.at_level(logging.WARNING, logger="mixtune"):
        mix = build_split(entries, "train", *qwen, 512, str(tmp_path))
    assert len(mix) == 4 and "does not read" not in caplog.text
    assert [(t.role, t.text) for t in mix.parts[0].conversations[0].turns][0] == ("system", "Be brief.")


def test_strict_fields_makes_an_unknown_key_an_error_entry_or_top_level(tmp_path, qwen):
    image(tmp_path / "red.png")
    write_jsonl(tmp_path / "d.jsonl", [good(), dict(good(), tools="[]")])
    expected = (r"d.jsonl, line 2, sample 1, field 'tools': unknown key\(s\) \['tools'\]: mixtune does not read them "
                r"\(strict_fields: true\)")
    with pytest.raises(DataError, match=expected):
        build_split([{"name": "sharegpt", "data_files": "d.jsonl", "strict_fields": True}], "train", *qwen, 512,
                    str(tmp_path))
    with pytest.raises(DataError, match=expected):  # a top-level default; skip does not swallow it
        build_split([{"name": "sharegpt", "data_files": "d.jsonl", "on_bad_sample": "skip"}], "train", *qwen, 512,
                    str(tmp_path), defaults={"strict_fields": True})
    assert len(build_split([{"name": "sharegpt", "data_files": "d.jsonl", "strict_fields": False}], "train", *qwen,
                           512, str(tmp_path), defaults={"strict_fields": True})) == 2
    write_json(tmp_path / "c.json", {"model_name_or_path": "m", "strict_fields": True,
                                     "dataset": {"train": [{"name": "sharegpt", "data_files": "d.jsonl"}]}})
    assert load_config(str(tmp_path / "c.json")).mix.strict_fields is True


def test_hf_unread_columns_are_reported_with_their_row_count(tmp_path, caplog):
    import datasets

    datasets.Dataset.from_dict({"question": ["a?", "b?"], "answer": ["x", "y"], "source": ["s", "t"],
                                "id": [1, 2]}).to_parquet(str(tmp_path / "d.parquet"))
    with caplog.at_level(logging.WARNING, logger="mixtune"):
        assert len(read_entry(entry(tmp_path, "hf", "d.parquet"))) == 2
    assert "'source' (2 samples)" in caplog.text
    with pytest.raises(DataError, match=r"d.parquet, field 'source': unknown key\(s\) \['source'\]"):
        read_entry(entry(tmp_path, "hf", "d.parquet", strict_fields=True))


# ---- remote images: one rule for every reader ----

@pytest.mark.parametrize("reader,record", [
    ("chatml_dataset", {"image": "https://example.com/a.jpg", "conversations": [["<image>What?", "A cat."]]}),
    ("sharegpt", {"messages": user_assistant("<image>What?", "A cat."), "images": ["http://example.com/a.jpg"]}),
    ("vqa", {"image": "https://example.com/a.jpg", "question": "What?", "answer": "A cat."}),
])
def test_remote_image_says_download_it_first_in_every_reader(tmp_path, reader, record):
    write_json(tmp_path / "d.json", [record])
    with pytest.raises(DataError) as info:
        read_entry(entry(tmp_path, reader, "d.json"))
    assert re.search(r"remote image 'https?://example.com/a.jpg': mixtune reads local files and data: URIs; "
                     r"download it first", info.value.reason)
    assert (info.value.index, info.value.field in ("image", "images")) == (0, True)


# ---- legacy shapes ----

def turns(conv):
    return [(t.role, t.text) for t in conv.turns]


@pytest.mark.parametrize("reader", ["chatml_dataset", "sharegpt"])
def test_legacy_shapes_are_read(tmp_path, reader):
    image(tmp_path / "red.png")
    records = [
        # ms-swift query / response / history
        {"system": "Be brief.", "query": "And now?", "response": "Blue.", "history": [["<image>Colour?", "Red."]],
         "images": ["red.png"]},
        # ms-swift conversation pairs
        {"system": "Be brief.", "conversation": [{"human": "<image>Colour?", "assistant": "Red."},
                                                 {"human": "And now?", "assistant": "Blue."}], "images": ["red.png"]},
        # Qwen-VL inline image tags
        {"id": "identity_0", "conversations": [{"from": "user", "value": "Picture 1: <img>red.png</img>\nColour?"},
                                               {"from": "assistant", "value": "Red."}]},
        # Alpaca
        {"instruction": "Translate.", "input": "rouge", "output": "red"},
    ]
    write_json(tmp_path / "d.json", records)
    convs = read_entry(entry(tmp_path, reader, "d.json"))
    expected_pairs = [("system", "Be brief."), ("user", "<image>Colour?"), ("assistant", "Red."), ("user", "And now?"),
                      ("assistant", "Blue.")]
    assert turns(convs[0]) == expected_pairs and turns(convs[1]) == expected_pairs
    assert turns(convs[2]) == [("user", "Picture 1: <image>\nColour?"), ("assistant", "Red.")]
    assert turns(convs[3]) == [("user", "Translate.\nrouge"), ("assistant", "red")]
    assert [c.images for c in convs] == [[str(tmp_path / "red.png")]] * 3 + [[]]


def test_legacy_shape_errors_name_the_field(tmp_path):
    write_json(tmp_path / "d.json", [
        {"query": "q", "response": "r", "history": [["only a question"]]},
        {"conversations": [{"from": "user", "value": "<img>a.png</img>Colour?"},
                           {"from": "assistant", "value": "Red."}], "images": ["a.png"]},
        {"conversation": [{"human": "hi"}]},
    ])
    with pytest.raises(DataError) as info:
        read_entry(entry(tmp_path, "sharegpt", "d.json"))
    assert info.value.index == 0 and info.value.field == "history"
    from mixtune.data.badsamples import BadSamples

    bad = BadSamples("skip")
    assert read_entry(entry(tmp_path, "sharegpt", "d.json"), bad) == []
    assert [(r["index"], r["field"]) for r in bad.records] == [(0, "history"), (1, "images"), (2, "conversation")]
    assert "both as <img>...</img> tags in the text and in an image list" in bad.records[1]["reason"]
