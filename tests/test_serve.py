"""`mixtune serve`, spoken to with the official `openai` client on 127.0.0.1: greedy answers equal `mixtune
predict`'s, streaming yields the same text, concurrent clients are batched and all answered, every bad
request gets its 4xx with an OpenAI error body and the next good request still succeeds, the API key holds."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from PIL import Image

from mixtune.infer.engine import Engine, GenerationOptions
from mixtune.infer.predict import predict, read_prompts
from mixtune.data.dataset import DatasetEntry
from mixtune.serve.openai import ServeSettings, create_app

KEY = "test-key"
N_VAL = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    import uvicorn

    media = tmp_path_factory.mktemp("media")
    Image.new("RGB", (64, 48), (10, 200, 10)).save(media / "green.png")
    engine = Engine.load(tiny_model_dir("qwen2_vl"))
    settings = ServeSettings(api_key=KEY, allowed_local_media_path=str(media), served_model_name="tiny",
                             max_images=2, max_body_bytes=3_000_000, max_image_bytes=1_000_000,
                             default_max_tokens=16, batch_window_s=0.05)
    app = create_app(engine, settings)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "engine": engine, "app": app, "media": str(media)}
    srv.should_exit = True
    thread.join(timeout=30)


def client(server, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


def data_uri(path) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def val_requests(demo_data_dir):
    """The first demo val samples, as chat messages (image part + question), with their image files."""
    with open(os.path.join(demo_data_dir, "val.json")) as f:
        samples = json.load(f)[:N_VAL]
    out = []
    for s in samples:
        question = s["conversations"][0][0].replace("<image>", "")
        out.append([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(os.path.join(demo_data_dir, s["image"]))}},
            {"type": "text", "text": question}]}])
    return out


def ask(c, messages, **kw):
    return c.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=6, **kw)


@pytest.fixture(scope="module")
def predicted(server, demo_data_dir, tmp_path_factory):
    items = read_prompts([DatasetEntry(name="chatml_dataset", data_files=os.path.join(demo_data_dir, "val.json"),
                                       max_samples=N_VAL)])
    out = tmp_path_factory.mktemp("pred")
    predict(server["engine"], items, GenerationOptions(max_new_tokens=6), str(out), batch_size=4, progress=False)
    with open(out / "predictions.jsonl") as f:
        return [json.loads(line)["prediction"] for line in f]


def test_greedy_answers_equal_predict_and_stream_the_same(server, demo_data_dir, predicted):
    c = client(server)
    requests = val_requests(demo_data_dir)
    replies = [ask(c, m) for m in requests]
    assert [r.choices[0].message.content.strip() for r in replies] == predicted
    assert all(r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length" for r in replies)
    prompt_tokens = [r.usage.prompt_tokens for r in replies]
    engine_tokens = []
    for m in requests:  # usage counts what the model read: the prompt with its image tokens
        reply = ask(c, m, stream=True, stream_options={"include_usage": True})
        chunks = list(reply)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text.strip() == predicted[len(engine_tokens)]
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
        assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) >= 2  # really streamed
        engine_tokens.append(chunks[-1].usage.prompt_tokens)
    assert engine_tokens == prompt_tokens and min(prompt_tokens) > 20


def test_stop_strings_and_sampling_options(server, demo_data_dir):
    c = client(server)
    (messages, *_) = val_requests(demo_data_dir)
    full = c.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
    text = full.choices[0].message.content
    stop = text[3:5]
    assert len(stop) == 2
    cut = c.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = c.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12, stop=stop,
                                         stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == text[: text.find(stop)]
    a, b = (c.chat.completions.create(model="tiny", messages=messages, temperature=1.0, top_p=0.9, seed=7,
                                      max_tokens=8).choices[0].message.content for _ in range(2))
    assert a == b  # the same seed samples the same reply


def test_concurrent_clients_are_batched(server, demo_data_dir, predicted):
    requests = val_requests(demo_data_dir)
    batcher = server["app"].state.batcher
    before = len(batcher.batches)

    def one_client(k):
        c = client(server)
        return [(i, ask(c, requests[i]).choices[0].message.content.strip())
                for i in ((k + j) % len(requests) for j in range(5))]

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(one_client, range(8)) for r in rs]
    assert len(results) == 40
    assert all(answer == predicted[i] for i, answer in results)
    sizes = batcher.batches[before:]
    assert sum(sizes) == 40 and max(sizes) > 1  # requests shared generate() calls


def raw_post(server, body: bytes, key=KEY):
    req = urllib.request.Request(server["url"] + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def announce_body(server, length: int):
    """Send only the headers of a request announcing a body of `length` bytes; return the reply."""
    import http.client

    host, port = server["url"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    for key, value in (("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY}"),
                       ("Content-Length", str(length))):
        conn.putheader(key, value)
    conn.endheaders()
    reply = conn.getresponse()
    status, body = reply.status, json.loads(reply.read())
    conn.close()
    return status, body


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": "What colour is it?"}


def test_bad_requests_get_4xx_and_the_server_carries_on(server, demo_data_dir, tmp_path):
    c = client(server)
    good = val_requests(demo_data_dir)[0]
    expected = ask(c, good).choices[0].message.content
    png = data_uri(os.path.join(demo_data_dir, json.load(open(os.path.join(demo_data_dir, "val.json")))[0]["image"]))
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    big = "data:image/png;base64," + base64.b64encode(os.urandom(1_200_000)).decode()
    cases = [
        ("missing messages", dict(messages=[]), 400),
        ("message without content", dict(messages=[{"role": "user"}]), 400),
        ("unknown role", dict(messages=[{"role": "wizard", "content": "hi"}]), 400),
        ("ends on the assistant", dict(messages=[{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "yo"}]), 400),
        ("undecodable image", dict(messages=user(image_part("data:image/png;base64,aGVsbG8="), TEXT)), 400),
        ("not base64", dict(messages=user(image_part("data:image/png;base64,%%%"), TEXT)), 400),
        ("too many images", dict(messages=user(image_part(png), image_part(png), image_part(png), TEXT)), 400),
        ("remote URL", dict(messages=user(image_part("http://example.com/a.png"), TEXT)), 400),
        ("file outside the media path", dict(messages=user(image_part(f"file://{outside}"), TEXT)), 403),
        ("image over the size limit", dict(messages=user(image_part(big), TEXT)), 413),
        ("prompt too long", dict(messages=[{"role": "user", "content": "colour shape " * 2000}]), 400),
        ("negative max_tokens", dict(messages=good, max_tokens=-1), 400),
        ("temperature out of range", dict(messages=good, temperature=5), 400),
        ("unknown model", dict(messages=good, model="gpt-9"), 404),
    ]
    for name, kwargs, status in cases:
        kwargs = {"model": "tiny", "max_tokens": 4, **kwargs}
        with pytest.raises(openai.APIStatusError) as info:
            c.chat.completions.create(**kwargs)
        assert info.value.status_code == status, name
        error = info.value.body if isinstance(info.value.body, dict) else {}
        assert error.get("message") and error.get("type"), name  # OpenAI's error body
        assert ask(c, good).choices[0].message.content == expected, f"after {name}"
    assert raw_post(server, b"{not json")[0] == 400
    assert raw_post(server, b"[1, 2]")[0] == 400
    status, body = announce_body(server, 3_100_000)  # refused from its Content-Length, before it is sent
    assert status == 413 and "limit" in body["error"]["message"]
    ok = c.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=user(
        image_part(f"file://{os.path.join(server['media'], 'green.png')}"), TEXT))
    assert ok.choices[0].message.content is not None  # a local file under the allowed path is read
    assert ask(c, good).choices[0].message.content == expected


def test_api_key_enforced(server, demo_data_dir):
    good = val_requests(demo_data_dir)[0]
    with pytest.raises(openai.AuthenticationError) as info:
        ask(client(server, key="wrong"), good)
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    req = urllib.request.Request(server["url"] + "/v1/chat/completions", method="POST", headers={
        "Content-Type": "application/json"}, data=json.dumps({"model": "tiny", "messages": good}).encode())
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(req, timeout=30)
    assert missing.value.code == 401 and json.loads(missing.value.read())["error"]["code"] == "invalid_api_key"
    assert [m.id for m in client(server).models.list().data] == ["tiny"]
    assert ask(client(server), good).choices[0].message.content  # the right key still works
    with urllib.request.urlopen(server["url"] + "/health", timeout=30) as r:  # health needs no key
        assert r.status == 200
