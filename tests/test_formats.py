"""Every dataset format from small files the tests write: what each record becomes, and that all of them
encode with a real (tiny) processor, lengths() agreeing with the samples."""

import base64
import io
import json

import pytest
from PIL import Image
from transformers import AutoProcessor

from conftest import write_json
from mixtune.data.conversation import IMAGE_PLACEHOLDER
from mixtune.data.dataset import DatasetEntry, build_split, read_entry
from mixtune.data.encode import IGNORE_INDEX
from mixtune.data.images import load_image
from mixtune.models.registry import get_family


def entry(tmp_path, name, data_files, **keys):
    return DatasetEntry.from_config({"name": name, "data_files": data_files, **keys}, str(tmp_path), "test")


def image(path, colour="red", size=(112, 112)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path.name


def roles_and_texts(conv):
    return [(t.role, t.text) for t in conv.turns]


def test_coco_caption_annotation_file_one_sample_per_caption(tmp_path):
    image(tmp_path / "imgs" / "a.jpg")
    image(tmp_path / "imgs" / "b.jpg", "blue")
    write_json(tmp_path / "captions.json", {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "caption": "A red square. "}, {"image_id": 2, "caption": "Blue."},
                        {"image_id": 1, "caption": "Red."}]})
    convs = read_entry(entry(tmp_path, "coco_caption", "captions.json", image_root="imgs", prompt="Caption it."))
    assert [roles_and_texts(c) for c in convs] == [
        [("user", "<image>Caption it."), ("assistant", t)] for t in ("A red square.", "Blue.", "Red.")]
    assert [c.images for c in convs] == [[str(tmp_path / "imgs" / n)] for n in ("a.jpg", "b.jpg", "a.jpg")]
    assert [c.index for c in convs] == [0, 1, 2]


def test_coco_caption_karpathy_list_and_dataset_coco(tmp_path):
    write_json(tmp_path / "k.json", [{"image": "a.jpg", "caption": ["one", "two"]}, {"image": "b.jpg", "caption": "x"}])
    convs = read_entry(entry(tmp_path, "coco_caption", "k.json"))
    assert [c.turns[1].text for c in convs] == ["one", "two", "x"]
    assert convs[0].turns[0].text == "<image>Describe the image briefly."
    write_json(tmp_path / "dataset_coco.json", {"images": [
        {"filepath": "val2014", "filename": "c.jpg", "sentences": [{"raw": "s1"}, {"raw": "s2"}]}]})
    convs = read_entry(entry(tmp_path, "coco_caption", "dataset_coco.json"))
    assert [(c.images[0], c.turns[1].text) for c in convs] == [(str(tmp_path / "val2014" / "c.jpg"), s)
                                                                for s in ("s1", "s2")]


def test_vqav2_questions_with_annotations_most_common_answer(tmp_path):
    write_json(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What colour?", "question_id": 420},
        {"image_id": 7, "question": "How many?", "question_id": 70}]})
    write_json(tmp_path / "a.json", {"annotations": [
        {"question_id": 70, "answers": [{"answer": "2"}, {"answer": "3"}, {"answer": "3"}]},
        {"question_id": 420, "multiple_choice_answer": "red", "answers": [{"answer": "pink"}]}]})
    convs = read_entry(entry(tmp_path, "coco_vqa", ["q.json", "a.json"], image_root="/coco",
                             prompt="{question} Answer in one word."))
    assert [roles_and_texts(c) for c in convs] == [
        [("user", "<image>What colour? Answer in one word."), ("assistant", "red")],
        [("user", "<image>How many? Answer in one word."), ("assistant", "3")]]
    assert convs[0].images == ["/coco/COCO_val2014_000000000042.jpg"]
    assert (convs[1].file, convs[1].index) == (str(tmp_path / "q.json"), 1)


def test_vqa_jsonl_lines_text_only_and_multi_image(tmp_path):
    lines = [{"image": "a.jpg", "question": "Q1", "answer": "A1"},
             {"question": "Q2", "answer": ["x", "y", "y"]},
             {"image": ["a.jpg", "b.jpg"], "question": "Same?", "answer": "no"}]
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    convs = read_entry(entry(tmp_path, "vqa", "v.jsonl"))
    assert [c.turns[0].text for c in convs] == ["<image>Q1", "Q2", "<image><image>Same?"]
    assert [c.turns[1].text for c in convs] == ["A1", "y", "no"]
    assert [len(c.images) for c in convs] == [1, 0, 2]
    assert [c.line for c in convs] == [1, 2, 3]


def test_llava_instruct(tmp_path):
    write_json(tmp_path / "llava.json", [
        {"id": "1", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A bus."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}])
    convs = read_entry(entry(tmp_path, "llava", "llava.json", image_root="/data"))
    assert roles_and_texts(convs[0]) == [("user", "<image>\nWhat is it?"), ("assistant", "A bus."),
                                         ("user", "Colour?"), ("assistant", "Red.")]
    assert convs[0].images == ["/data/coco/1.jpg"] and convs[1].images == []


def test_sharegpt_and_openai_messages_with_image_parts(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 255, 0)).save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    image(tmp_path / "a.jpg")
    records = [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.jpg"}},
                                                   {"type": "text", "text": "Left, "},
                                                   {"type": "image", "image": uri},
                                                   {"type": "text", "text": "right. Same?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "No."}]}]},
        {"conversations": [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "red"}],
         "images": [str(tmp_path / "a.jpg")]},
    ]
    write_json(tmp_path / "s.json", records)
    convs = read_entry(entry(tmp_path, "sharegpt", "s.json"))
    assert roles_and_texts(convs[0]) == [("system", "Be brief."), ("user", "<image>Left, <image>right. Same?"),
                                         ("assistant", "No.")]
    assert convs[0].images == [str(tmp_path / "a.jpg"), uri]
    assert load_image(convs[0].images[1]).getpixel((0, 0)) == (0, 255, 0)
    assert roles_and_texts(convs[1]) == [("user", "<image>Colour?"), ("assistant", "red")]


def test_data_files_glob_and_list(tmp_path):
    for i in range(3):
        write_json(tmp_path / f"part{i}.json", [{"question": f"q{i}{j}", "answer": "a"} for j in range(i + 1)])
    assert len(read_entry(entry(tmp_path, "vqa", "part*.json"))) == 6
    assert len(read_entry(entry(tmp_path, "vqa", ["part0.json", "part2.json"]))) == 4


def hf_rows(tmp_path):
    import datasets

    def png(colour):
        buf = io.BytesIO()
        Image.new("RGB", (112, 112), colour).save(buf, "PNG")
        return {"bytes": buf.getvalue(), "path": None}

    image(tmp_path / "disk.png", "blue")
    features = datasets.Features({"q": datasets.Value("string"), "a": datasets.Value("string"),
                                  "img": datasets.Image()})
    return datasets.Dataset.from_dict({"q": ["colour?", "colour??", "colour???"], "a": ["red", "green", "blue"],
                                       "img": [png("red"), png((0, 200, 0)),
                                               {"bytes": None, "path": str(tmp_path / "disk.png")}]},
                                      features=features)


@pytest.mark.parametrize("kind", ["parquet", "folder", "jsonl"])
def test_hf_with_column_mapping_and_embedded_images(tmp_path, kind, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    ds = hf_rows(tmp_path)
    if kind == "parquet":
        ds.to_parquet(str(tmp_path / "d.parquet"))
        files = "d.parquet"
    elif kind == "folder":
        ds.save_to_disk(str(tmp_path / "saved"))
        files = "saved"
    else:  # plain JSONL with image paths, the other common shape
        (tmp_path / "d.jsonl").write_text("".join(json.dumps({"q": r["q"], "a": r["a"], "img": "disk.png"}) + "\n"
                                                  for r in ds.remove_columns("img")))
        files = "d.jsonl"
    convs = read_entry(entry(tmp_path, "hf", files, columns={"question": "q", "answer": "a", "image": "img"}))
    assert [roles_and_texts(c) for c in convs] == [
        [("user", f"<image>{q}"), ("assistant", a)] for q, a in zip(ds["q"], ds["a"])]
    colours = [load_image(c.images[0]).getpixel((5, 5)) for c in convs]
    if kind == "jsonl":
        assert colours == [(0, 0, 255)] * 3
    else:
        assert colours == [(255, 0, 0), (0, 200, 0), (0, 0, 255)]
        assert convs[0].images[0].startswith("hfrow:")  # the bytes stay in the arrow file until needed


def test_hf_unknown_mapped_column_is_a_clear_error(tmp_path):
    from mixtune.errors import DataError
    hf_rows(tmp_path).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d.parquet.*column\(s\) \['qq'\]"):
        read_entry(entry(tmp_path, "hf", "d.parquet", columns={"question": "qq"}))


@pytest.fixture(scope="module")
def qwen(tiny_model_dir):
    path = tiny_model_dir("qwen2_vl")
    return AutoProcessor.from_pretrained(path), get_family("qwen2_vl")


def test_every_format_encodes_and_lengths_match_samples(tmp_path, qwen):
    processor, family = qwen
    image(tmp_path / "a.png")
    image(tmp_path / "b.png", "blue", (224, 112))
    write_json(tmp_path / "cap.json", [{"image": "a.png", "caption": ["red", "a red square"]}])
    (tmp_path / "vqa.jsonl").write_text(json.dumps({"image": ["a.png", "b.png"], "question": "Same?",
                                                    "answer": "no"}) + "\n" + json.dumps({"question": "2+2?",
                                                                                          "answer": "4"}) + "\n")
    write_json(tmp_path / "llava.json", [{"image": "b.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "blue"}]}])
    write_json(tmp_path / "msg.json", [{"messages": [{"role": "user", "content": "<image>Hi"},
                                                     {"role": "assistant", "content": "red"}], "images": ["a.png"]}])
    entries = [{"name": "coco_caption", "data_files": "cap.json"}, {"name": "vqa", "data_files": "vqa.jsonl"},
               {"name": "llava", "data_files": "llava.json"}, {"name": "messages", "data_files": "msg.json"},
               {"name": "chatml_dataset", "data_files": "msg.json"}]
    mix = build_split(entries, "train", processor, family, 512, str(tmp_path))
    assert mix.names == ["cap", "vqa", "llava", "msg_1", "msg_2"]
    assert [len(p) for p in mix.parts] == [2, 2, 1, 1, 1]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # 112x112 -> 16 image tokens; 224x112 is capped at 112*112 pixels by the processor -> 8x? patches
    expected_images = [1, 1, 2, 0, 1, 1, 1]
    lengths = mix.lengths()
    for i in range(len(mix)):
        enc = mix[i]
        assert len(enc) == lengths[i]
        n_image_tokens = int((enc.input_ids == image_id).sum())
        assert (n_image_tokens > 0) == (expected_images[i] > 0)
        assert n_image_tokens >= 8 * expected_images[i]
        assert (enc.labels != IGNORE_INDEX).any()
    assert IMAGE_PLACEHOLDER not in processor.tokenizer.decode(mix[0].input_ids)
