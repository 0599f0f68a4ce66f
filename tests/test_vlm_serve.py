"""`tessera serve` of a `tessera vlm` checkpoint, driven by the official `openai` client: chat messages
with inline images, streamed and not, answer as `generate_with_images` does; remote URLs, bad
base64, non-images and too many images are a 400, never a 500."""
from __future__ import annotations

import base64
import contextlib
import io
import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from tessera.cli.interop import vision_model_for_serving  # noqa: E402
from tessera.cli.main import main  # noqa: E402
from tessera.core.generate import Sampling  # noqa: E402
from tessera.interop.serve import create_app, serving  # noqa: E402
from tessera.multimodal.vlm_inference import generate_with_images, image_pixels, load_vlm  # noqa: E402
from test_vlm import scene_data, vlm_args  # noqa: E402, F401  (scene_data is a fixture)


@contextlib.contextmanager
def running(app):
    """The app served in a uvicorn thread (`tessera.interop.serve.serving`); an openai client pointed at it."""
    with serving(app) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served(scene_data, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("serve")
    config = root / "vlm.toml"
    config.write_text("")
    run = root / "run"
    assert main(["vlm", str(config), *vlm_args(scene_data, run, "--train.steps=2")]) == 0
    model, tokenizer, name, embedder = vision_model_for_serving(str(run), "cpu")
    with running(create_app(model, tokenizer, model_name=name, embedder=embedder)) as client:
        yield client, run, scene_data


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def message(url: str, text: str = "what colour is the circle?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


def test_chat_with_an_image_answers_as_generate_does(served):
    client, run, data = served
    image = data[0].parent / "scenes" / "images" / "000003.png"
    reply = client.chat.completions.create(model="step_000002", messages=message(data_url(image)),
                                           max_tokens=8, temperature=0)
    text = reply.choices[0].message.content
    model, cfg = load_vlm(run, "cpu")
    from tessera.core.tokenizer import load_tokenizer

    tok = load_tokenizer(data[2])
    prompt = "user: <image>what colour is the circle?\nassistant:"
    pixels = image_pixels(image.read_bytes(), "image", cfg)[None]
    out = [t[0] for t in generate_with_images(model, tok, [prompt], [pixels], 8, Sampling(temperature=0))
           if t[0] is not None and t[0] != tok.eos_id]
    assert text == tok.decode(out)
    assert reply.usage.prompt_tokens == len(tok.encode("user: ")) + model.image_tokens + len(
        tok.encode("what colour is the circle?\nassistant:"))
    stream = client.chat.completions.create(model="step_000002", messages=message(data_url(image)), max_tokens=8,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text
    plain = client.chat.completions.create(model="step_000002", messages=[{"role": "user", "content": "a red"}],
                                           max_tokens=3, temperature=0)
    assert plain.choices[0].finish_reason in ("length", "stop")  # text alone: the decoder's own path


def png_of(size: tuple[int, int]) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize("url,message_part", [
    ("https://example.com/cat.png", "remote URLs are not fetched"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:text/plain;base64,aGk=", "must be a data URL"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "image_url:"),
])
def test_bad_images_are_400(served, url, message_part):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="step_000002", messages=message(url), max_tokens=2)
    assert e.value.status_code == 400 and message_part in json.dumps(e.value.body), e.value.body
    many = [{"type": "image_url", "image_url": {"url": png_of((8, 8))}}] * 5
    with pytest.raises(openai.BadRequestError, match="5 images exceed the limit of 4"):
        client.chat.completions.create(model="step_000002", messages=[{"role": "user", "content": many}], max_tokens=2)


def test_a_text_model_refuses_images(served):
    _, run, _ = served
    model, tokenizer, name, _ = vision_model_for_serving(str(run), "cpu")
    with running(create_app(model, tokenizer, model_name=name)) as text_only:
        with pytest.raises(openai.BadRequestError, match="this model takes no images"):
            text_only.chat.completions.create(model=name, messages=message(png_of((8, 8))), max_tokens=2)
