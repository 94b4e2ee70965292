"""Data guards: the per-sample size limit (checked before parsing, memory bounded), non-UTF-8 bytes named by
offset, duplicate JSON keys, the streamed JSON list reader, image modes converted to RGB without losing
brightness, a damaged length cache measured again, and a length-cache key derived from every entry option."""

import dataclasses
import io
import json
import logging
import random
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from mixtune.data import lengths
from mixtune.data.badsamples import BadSamples
from mixtune.data.dataset import DatasetEntry, read_entry
from mixtune.data.formats import iter_json_records, jsonstream, load_json_file
from mixtune.data.formats.jsonstream import iter_records
from mixtune.data.images import load_image
from mixtune.errors import DataError


def sample(text="hi", **extra):
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}], **extra}


def entry(tmp_path, name, **kw):
    return DatasetEntry.from_config({"name": "sharegpt", "data_files": name, **kw}, str(tmp_path), "dataset.train[0]")


def read(tmp_path, name, policy="error", **kw):
    bad = BadSamples(policy, entry="e")
    return read_entry(entry(tmp_path, name, **kw), bad), bad.records


def write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


# ---- the size guard ---------------------------------------------------------------------------------

def big_line(n_bytes: int) -> bytes:
    return json.dumps(sample("x" * n_bytes)).encode()


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_oversized_record_is_a_bad_sample_error_or_counted_skip(tmp_path, suffix):
    good = json.dumps(sample()).encode()
    if suffix == ".jsonl":
        write_lines(tmp_path / "d.jsonl", [good, big_line(300_000), good])
    else:
        (tmp_path / "d.json").write_bytes(b"[" + good + b",\n" + big_line(300_000) + b",\n" + good + b"]")
    with pytest.raises(DataError, match=r"sample 1: sample is 3000\d\d bytes, over max_sample_bytes \(100000\)"):
        read(tmp_path, f"d{suffix}", max_sample_bytes=100_000)
    convs, skipped = read(tmp_path, f"d{suffix}", "skip", max_sample_bytes=100_000)
    assert [c.index for c in convs] == [0, 2]
    assert [(r["index"], r["kind"]) for r in skipped] == [(1, "sample is N bytes, over max_sample_bytes (N)")]
    assert (skipped[0]["line"] == 2) == (suffix == ".jsonl")
    assert len(read(tmp_path, f"d{suffix}")[0]) == 3  # under the default limit it is read


def test_oversized_jsonl_line_is_never_decoded_and_memory_stays_bounded(tmp_path, monkeypatch):
    write_lines(tmp_path / "d.jsonl", [json.dumps(sample()).encode(), big_line(40_000_000),
                                       json.dumps(sample("after")).encode()])
    decoded = []
    real = jsonstream.STRICT.decode
    monkeypatch.setattr(jsonstream.STRICT, "decode", lambda text: decoded.append(len(text)) or real(text))
    tracemalloc.start()
    try:
        records = list(iter_records(str(tmp_path / "d.jsonl"), max_bytes=1_000_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [type(r[2]).__name__ for r in records] == ["dict", "DataError", "dict"]
    assert records[2][2]["messages"][0]["content"] == "after" and records[2][1] == 3
    assert max(decoded) < 200  # the 40 MB line never reached the JSON decoder
    assert peak < 4_000_000, peak  # the 40 MB line was never held whole either


def test_oversized_json_list_element_is_skipped_with_bounded_memory(tmp_path):
    parts = [json.dumps(sample()), big_line(20_000_000).decode(), json.dumps(sample("after"))]
    (tmp_path / "d.json").write_text("[\n" + ",\n".join(parts) + "\n]\n")
    tracemalloc.start()
    try:
        records = list(iter_records(str(tmp_path / "d.json"), max_bytes=1_000_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(records[1][2], DataError) and "over max_sample_bytes" in str(records[1][2])
    assert records[2][2]["messages"][0]["content"] == "after"
    assert peak < 12_000_000, peak


def test_skipping_an_oversized_element_respects_strings_and_escapes(tmp_path):
    tricky = {"a": ['x"]}[{', "\\", "\\\"]", {"b": "}}}]]]"}] * 50, "n": [1, 2.5e3, None, True]}
    records = [sample("0"), tricky, sample("2"), 123456789, sample("4")]
    (tmp_path / "d.json").write_text(json.dumps(records, indent=1))
    for chunk in (1, 2, 3, 5, 64):
        got = list(iter_records(str(tmp_path / "d.json"), max_bytes=300, chunk=chunk))
        assert [type(g[2]).__name__ for g in got] == ["dict", "DataError", "dict", "int", "dict"], chunk
        assert got[4][2] == sample("4") and got[3][2] == 123456789


def random_value(rng, depth=0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(["", "plain", 'q"uote', "back\\slash", "é ü 猫 \U0001f431", "tab\tnl\n", "]}{[,"])
    if kind == 1:
        return rng.choice([0, -7, 123456789012, 3.25, -1e-7, 1.5e300])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind in (3, 4):
        return f"s{rng.random()}"
    if kind in (5, 6):
        return {f"k{i}": random_value(rng, depth + 1) for i in range(rng.randrange(4))}
    return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


@pytest.mark.parametrize("indent", [None, 2])
def test_streamed_json_list_equals_json_loads_at_any_chunk_size(tmp_path, indent):
    rng = random.Random(0)
    records = [{"id": i, "v": random_value(rng)} for i in range(60)]
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, indent=indent, ensure_ascii=False).encode())
    for chunk in (1, 2, 3, 7, 50, 1 << 20):
        got = [r for _, _, r in iter_records(str(path), chunk=chunk)]
        assert got == records, chunk


def test_malformed_json_list_names_its_line_even_when_streamed(tmp_path):
    (tmp_path / "d.json").write_text("[\n" + ",\n".join(json.dumps(sample()) for _ in range(50)) + ',\n{"oops"\n]')
    for chunk in (4, 1 << 20):
        with pytest.raises(DataError, match=r"d.json, line 53: malformed JSON: Expecting ':' delimiter"):
            list(iter_records(str(tmp_path / "d.json"), chunk=chunk))


# ---- non-UTF-8, duplicate keys, folders --------------------------------------------------------------

def test_non_utf8_jsonl_line_names_byte_offset_or_is_skipped(tmp_path):
    first = json.dumps(sample()).encode()
    second = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}'
    write_lines(tmp_path / "d.jsonl", [first, second, first])
    offset = len(first) + 1 + second.index(b"\xe9")
    with pytest.raises(DataError, match=rf"d.jsonl, line 2, sample 1: not UTF-8 text: byte 0xe9 at byte offset "
                                        rf"{offset} of the file"):
        read(tmp_path, "d.jsonl")
    convs, skipped = read(tmp_path, "d.jsonl", "skip")
    assert [c.index for c in convs] == [0, 2] and skipped[0]["index"] == 1


def test_non_utf8_json_list_element_names_byte_offset(tmp_path):
    head = b'[{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},\n'
    bad = b'{"messages": [{"role": "user", "content": "\xff"}, {"role": "assistant", "content": "b"}]}]'
    (tmp_path / "d.json").write_bytes(head + bad)
    for chunk in (3, 1 << 20):
        got = list(iter_records(str(tmp_path / "d.json"), chunk=chunk))
        assert isinstance(got[1][2], DataError)
        assert f"byte 0xff at byte offset {len(head) + bad.index(0xFF)}" in str(got[1][2])
    convs, skipped = read(tmp_path, "d.json", "skip")
    assert len(convs) == 1 and skipped[0]["index"] == 1
    coco = b'{"images": [], "annotations": [{"caption": "\xc3"}]}'
    (tmp_path / "coco.json").write_bytes(coco)
    with pytest.raises(DataError, match=rf"coco.json: not UTF-8 text: byte 0xc3 at byte offset {coco.index(0xC3)}"):
        load_json_file(str(tmp_path / "coco.json"))


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_duplicate_key_is_a_bad_sample_naming_the_key(tmp_path, suffix):
    dup = '{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", "content": "c"}]}'
    rows = [json.dumps(sample()), dup, json.dumps(sample())]
    (tmp_path / f"d{suffix}").write_text("\n".join(rows) if suffix == ".jsonl" else "[" + ",".join(rows) + "]")
    with pytest.raises(DataError, match=r"sample 1, field 'content': key given twice in one JSON object"):
        read(tmp_path, f"d{suffix}")
    convs, skipped = read(tmp_path, f"d{suffix}", "skip")
    assert [c.index for c in convs] == [0, 2] and skipped[0]["field"] == "content"


def test_a_folder_as_data_file_is_a_clear_error(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(DataError, match=r"shards: is a folder, not a data file"):
        list(iter_json_records(str(tmp_path / "shards")))


# ---- images ------------------------------------------------------------------------------------------

def saved(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def image_cases():
    grey16 = np.full((16, 16), 32768, np.uint16)  # mid-grey at 16 bits: 128 at 8 bits
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.paste(0, (0, 0, 8, 16))  # left half: index 0, declared transparent
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (8, 0, 16, 16))
    return {
        "16-bit PNG (I;16)": (saved(Image.fromarray(grey16)), [128, 128, 128], [128, 128, 128]),
        "I;16B": (saved(Image.frombytes("I;16B", (16, 16), grey16.astype(">u2").tobytes()), "TIFF"),
                  [128, 128, 128], [128, 128, 128]),
        "I (32-bit)": (saved(Image.fromarray(grey16.astype(np.int32)), "TIFF"), [128, 128, 128], [128, 128, 128]),
        "F (float 0-1)": (saved(Image.fromarray(np.full((16, 16), 0.5, np.float32)), "TIFF"),
                          [128, 128, 128], [128, 128, 128]),
        "P + transparency": (saved(palette, transparency=0), [255, 255, 255], [200, 10, 10]),
        "RGBA": (saved(rgba), [255, 255, 255], [0, 0, 255]),
        "LA": (saved(Image.merge("LA", [Image.new("L", (16, 16), 40), Image.new("L", (16, 16), 0)]).crop(
            (0, 0, 16, 16))), [255, 255, 255], [255, 255, 255]),
        "CMYK": (saved(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=100), [254, 0, 0],
                 [254, 0, 0]),
        "1 (bilevel)": (saved(Image.new("1", (16, 16), 1)), [255, 255, 255], [255, 255, 255]),
    }


@pytest.mark.parametrize("case", list(image_cases()))
def test_every_image_mode_becomes_rgb_with_its_brightness(tmp_path, case):
    data, left, right = image_cases()[case]
    (tmp_path / "img").write_bytes(data)
    img = np.asarray(load_image(str(tmp_path / "img")))
    assert img.dtype == np.uint8 and img.shape == (16, 16, 3)
    assert np.abs(img[:, :8].reshape(-1, 3).mean(0) - left).max() <= 2, img[0, 0]
    assert np.abs(img[:, 8:].reshape(-1, 3).mean(0) - right).max() <= 2, img[0, -1]


def test_16_bit_png_gradient_keeps_its_grey_levels(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    (tmp_path / "ramp.png").write_bytes(saved(Image.fromarray(ramp)))
    img = np.asarray(load_image(str(tmp_path / "ramp.png")))[..., 0].astype(float)
    assert np.abs(img - ramp / 257.0).max() <= 0.5 + 1e-9
    assert img.mean() == pytest.approx(127.5, abs=0.5)  # not 99.6% white


# ---- the length cache --------------------------------------------------------------------------------

def count_measures(calls):
    def measure_one(conv):
        calls.append(conv)
        return {"length": len(conv), "scale": 1.0}
    return measure_one


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong shape", "wrong types", "index out of range"])
def test_damaged_length_cache_is_measured_again_with_a_warning(tmp_path, caplog, damage):
    convs = ["ab", "abcd", "a"]
    calls = []
    first = lengths.scan(convs, count_measures(calls), "k", str(tmp_path))
    path = tmp_path / "k.json"
    text = path.read_text()
    path.write_text({"truncated": text[: len(text) // 2], "garbage": "\x00\x01 not json",
                     "wrong shape": json.dumps([1, 2, 3]),
                     "wrong types": json.dumps({"lengths": ["2", 4, 1], "scales": {}, "errors": {}}),
                     "index out of range": json.dumps({"lengths": [2, 4, 1], "scales": {"7": 0.5}, "errors": {}}),
                     }[damage])
    with caplog.at_level(logging.WARNING, logger="mixtune"):
        again = lengths.scan(convs, count_measures(calls), "k", str(tmp_path))
    assert again.lengths == first.lengths == [2, 4, 1]
    assert len(calls) == 6  # measured twice: the damaged cache was not trusted
    assert "is damaged" in caplog.text and "measuring again" in caplog.text
    calls.clear()
    assert lengths.scan(convs, count_measures(calls), "k", str(tmp_path)).lengths == [2, 4, 1] and not calls


def test_unwritable_length_cache_costs_only_a_warning(tmp_path, caplog):
    (tmp_path / "file").write_text("")
    with caplog.at_level(logging.WARNING, logger="mixtune"):
        result = lengths.scan(["ab"], count_measures([]), "k", str(tmp_path / "file" / "cache"))
    assert result.lengths == [2] and "could not write the length cache" in caplog.text


def other_value(value, field):
    if field.type in ("int | None", "int"):
        return (value or 1) + 1
    if field.type in ("float | None",):
        return (value or 1.0) + 0.5
    if field.type in ("dict | None",):
        return {"messages": "conv"}
    return (value or "") + "_changed" if isinstance(value, str) or value is None else [value, "more"]


def test_cache_key_follows_every_entry_option(tmp_path):
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    base = DatasetEntry(name="sharegpt", data_files="d.jsonl", chat_template=str(tmp_path / "t.jinja"),
                        base_dir=str(tmp_path))

    def key(e):
        return lengths.cache_key([], "proc", 512, lengths.entry_options(e))
    for f in dataclasses.fields(DatasetEntry):
        if f.name == "chat_template":
            changed = dataclasses.replace(base, chat_template=str(tmp_path / "t.jinja"))
            (tmp_path / "t.jinja").write_text("{{ messages }}!")  # same path, edited in place
            edited_key = key(changed)
            (tmp_path / "t.jinja").write_text("{{ messages }}")
            assert edited_key != key(base)
            continue
        changed = dataclasses.replace(base, **{f.name: other_value(getattr(base, f.name), f)})
        if f.name in lengths.NOT_LENGTH_FIELDS:
            assert key(changed) == key(base), f.name
        else:
            assert key(changed) != key(base), f.name
    # an option added to the entry later is in the key without anyone listing it
    extended = dataclasses.make_dataclass("Extended", [("new_option", int, dataclasses.field(default=0))],
                                          bases=(DatasetEntry,))
    a = extended(name="sharegpt", data_files="d.jsonl")
    assert key(a) != key(dataclasses.replace(a, new_option=1))


def test_jsonl_splits_lines_only_at_newlines(tmp_path):
    # str.splitlines also splits at U+2028 and \x1c, which JSON strings may hold raw; CRLF ends are fine
    rows = [json.dumps(sample("a\u2028b\x1cc"), ensure_ascii=False), json.dumps(sample("d"))]
    (tmp_path / "d.jsonl").write_bytes("\r\n".join(rows).encode() + b"\r\n\r\n")
    got = [r for _, _, r in iter_records(str(tmp_path / "d.jsonl"))]
    assert got == [sample("a\u2028b\x1cc"), sample("d")]
