"""Images through a real `microbatch serve` (uvicorn on a free port) with tiny image
models: a CLIP and a ViT classifier, built here. Every way an image comes in (`/predict`
as base64 or a data URI, a multipart upload, `/predict/batch`, OpenAI's `input` through
the `openai` SDK, Cohere's SDK, the KServe v2 routes) answers what the reference model
computes; a bad image gets a 422 that names it and its reason, and harms no other
request; the metrics count images apart."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from batcher.models.vision_loading import image_processor
from tests.conftest import ServerProcess
from tests.tiny_models import IMAGE_LABELS, save_clip, save_image_classifier

transformers = pytest.importorskip("transformers")


def photo(seed: int, size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array, "RGB").save(out, format=fmt)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{b64(data)}"


PHOTOS = [photo(seed) for seed in range(6)]


def bomb() -> bytes:
    """A small PNG of 10,000 x 10,000 pixels: over the 50-megapixel limit."""
    out = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def clip_server(
    tmp_path_factory: pytest.TempPathFactory, clip_dir: Path
) -> Iterator[ServerProcess]:
    args = ["--model", str(clip_dir), "--no-compile", "--dtype", "float32"]
    server = ServerProcess(args, tmp_path_factory.mktemp("logs") / "clip.log", grpc=True).start()
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_image_classifier(tmp_path_factory.mktemp("vit") / "tiny-vit")


@pytest.fixture(scope="module")
def vit_server(tmp_path_factory: pytest.TempPathFactory, vit_dir: Path) -> Iterator[ServerProcess]:
    args = ["--model", str(vit_dir), "--no-compile", "--dtype", "float32"]
    server = ServerProcess(args, tmp_path_factory.mktemp("logs") / "vit.log").start()
    yield server
    assert server.stop() == 0, server.log()


def clip_reference(path: Path, photos: list[bytes], texts: list[str]) -> torch.Tensor:
    """CLIPModel's image features, then its text features, L2-normalised (the default of
    a plain transformers CLIP directory)."""
    model = transformers.CLIPModel.from_pretrained(path)
    processor = image_processor(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    load = transformers.image_utils.load_image
    with torch.no_grad():
        out = []
        if photos:
            pictures = processor([load(b64(p)) for p in photos], return_tensors="pt")
            out.append(model.get_image_features(**pictures))
        if texts:
            tokens = tokenizer(texts, padding=True, return_tensors="pt")
            ids, mask = tokens["input_ids"], tokens["attention_mask"]
            out.append(model.get_text_features(input_ids=ids, attention_mask=mask))
    rows = [o if isinstance(o, torch.Tensor) else o.pooler_output for o in out]
    return torch.nn.functional.normalize(torch.cat(rows))


def close(ours: object, expected: torch.Tensor) -> None:
    got = torch.tensor(ours, dtype=torch.float32)
    assert torch.nn.functional.cosine_similarity(got, expected).min() >= 0.9999
    assert torch.allclose(got, expected, atol=1e-5)


def test_predict_takes_base64_data_uris_and_texts(
    clip_server: ServerProcess, clip_dir: Path
) -> None:
    expected = clip_reference(clip_dir, PHOTOS[:2], ["a photo of a cat"])
    url = clip_server.url
    a = httpx.post(f"{url}/predict", json={"image": b64(PHOTOS[0])}).json()
    b = httpx.post(f"{url}/predict", json={"image": uri(PHOTOS[1])}).json()
    t = httpx.post(f"{url}/predict", json={"text": "a photo of a cat"}).json()
    close([a["embedding"], b["embedding"], t["embedding"]], expected)
    batch = httpx.post(f"{url}/predict/batch", json={"images": [b64(p) for p in PHOTOS[:2]]})
    close([r["embedding"] for r in batch.json()["results"]], expected[:2])
    model = httpx.get(f"{url}/model").json()
    assert model["modalities"] == ["image", "text"]
    assert model["image_shape"] == [3, 32, 32]


def test_the_openai_sdk_embeds_data_uris(clip_server: ServerProcess, clip_dir: Path) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{clip_server.url}/v1", api_key="unused")
    reply = client.embeddings.create(model="clip", input=[uri(p) for p in PHOTOS[:3]])
    close([d.embedding for d in reply.data], clip_reference(clip_dir, PHOTOS[:3], []))
    assert reply.usage.prompt_tokens == 3 * 17  # 16 patches and the class token each
    texts = client.embeddings.create(model="clip", input=["a dog", "a cat"])
    close([d.embedding for d in texts.data],
          clip_reference(clip_dir, PHOTOS[:0], ["a dog", "a cat"]))  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="separate requests"):
        client.embeddings.create(model="clip", input=[uri(PHOTOS[0]), "a dog"])


def test_tei_embed_takes_data_uris_and_a_text_model_refuses_them(
    clip_server: ServerProcess, clip_dir: Path, tmp_path: Path, tiny_encoder_dir: Path
) -> None:
    embedded = httpx.post(f"{clip_server.url}/embed", json={"inputs": [uri(PHOTOS[0])]})
    close(embedded.json(), clip_reference(clip_dir, PHOTOS[:1], []))
    args = ["--model", str(tiny_encoder_dir), "--no-compile", "--dtype", "float32"]
    text_server = ServerProcess(args, tmp_path / "text.log").start()
    try:
        openai = httpx.post(f"{text_server.url}/v1/embeddings",
                            json={"input": [uri(PHOTOS[0])], "model": "x"})  # fmt: skip
        tei = httpx.post(f"{text_server.url}/embed", json={"inputs": uri(PHOTOS[0])})
    finally:
        assert text_server.stop() == 0, text_server.log()
    for refused in (openai, tei):
        assert refused.status_code in (400, 422), refused.text
        assert "is a text model" in refused.text


def test_cohere_sdk_embeds_images(clip_server: ServerProcess, clip_dir: Path) -> None:
    cohere = pytest.importorskip("cohere")
    client = cohere.ClientV2(api_key="unused", base_url=clip_server.url)
    reply = client.embed(model="clip", input_type="image", embedding_types=["float"],
                         images=[uri(p) for p in PHOTOS[:2]])  # fmt: skip
    close(reply.embeddings.float_, clip_reference(clip_dir, PHOTOS[:2], []))


def test_kserve_v2_takes_an_image_tensor(clip_server: ServerProcess, clip_dir: Path) -> None:
    expected = clip_reference(clip_dir, PHOTOS[:2], [])
    url = f"{clip_server.url}/v2/models/clip"
    metadata = httpx.get(url).json()
    inputs = [i["name"] for i in metadata["inputs"]]
    assert inputs == ["image", "text"]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                        "data": [b64(PHOTOS[0]), uri(PHOTOS[1])]}]}  # fmt: skip
    reply = httpx.post(f"{url}/infer", json=body).json()
    broken = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                          "data": ["data:image/png;base64,\u00e9\u00e9"]}]}  # fmt: skip
    refused = httpx.post(f"{url}/infer", json=broken)
    assert refused.status_code == 400, refused.text  # the protocol's invalid input
    assert "not_an_image" in refused.text
    [out] = reply["outputs"]
    close(np.asarray(out["data"]).reshape(out["shape"]).tolist(), expected)
    tritonclient = pytest.importorskip("tritonclient.http")
    client = tritonclient.InferenceServerClient(clip_server.url.removeprefix("http://"))
    tensor = tritonclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(PHOTOS[:2], dtype=np.object_), binary_data=True)
    result = client.infer("clip", [tensor])
    close(result.as_numpy("embedding").tolist(), expected)
    grpcclient = pytest.importorskip("tritonclient.grpc")
    channel = grpcclient.InferenceServerClient(clip_server.grpc_target)
    tensor = grpcclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(PHOTOS[:2], dtype=np.object_))
    close(channel.infer("clip", [tensor]).as_numpy("embedding").tolist(), expected)


def test_a_multipart_upload_equals_base64(vit_server: ServerProcess) -> None:
    url = vit_server.url
    sent = httpx.post(f"{url}/predict", json={"image": b64(PHOTOS[0]), "all_scores": True})
    files = {"image": ("photo.jpg", PHOTOS[0], "image/jpeg")}
    uploaded = httpx.post(f"{url}/predict", files=files, data={"all_scores": "true"})
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["scores"] == sent.json()["scores"]
    assert sent.json()["label"] in IMAGE_LABELS.values()
    none = httpx.post(f"{url}/predict", files={"other": ("a.txt", b"x")})
    assert none.status_code == 422
    assert "field 'image'" in none.text


def test_the_classifier_equals_the_pipeline(vit_server: ServerProcess, vit_dir: Path) -> None:
    processor = image_processor(vit_dir)
    pipe = transformers.pipeline("image-classification", model=str(vit_dir), top_k=None,
                                 image_processor=processor, device="cpu")  # fmt: skip
    reply = httpx.post(f"{vit_server.url}/predict/batch",
                       json={"images": [b64(p) for p in PHOTOS], "all_scores": True})  # fmt: skip
    for data, answer in zip(PHOTOS, reply.json()["results"], strict=True):
        reference = {r["label"]: r["score"] for r in pipe(b64(data))}
        assert answer["label"] == max(reference, key=reference.__getitem__)
        assert answer["scores"] == pytest.approx(reference, abs=1e-5)


BAD = [
    ("not_an_image", b64(b"hello, I am text")),
    ("truncated", b64(photo(9)[:300])),
    ("too_many_pixels", b64(bomb())),
    ("unsupported_format", b64(photo(9, fmt="ICO"))),
    ("url_not_allowed", "https://example.com/cat.jpg"),
    ("not_an_image", "data:text/plain;base64,aGVsbG8="),
]


def test_bad_images_fail_alone_with_their_reason(vit_server: ServerProcess) -> None:
    url = vit_server.url
    good = [httpx.post(f"{url}/predict", json={"image": b64(p)}).json()["label"] for p in PHOTOS]

    async def burst() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            fine = [client.post("/predict", json={"image": b64(p)}) for p in PHOTOS]
            bad = [client.post("/predict", json={"image": image}) for _, image in BAD]
            replies = await asyncio.gather(*fine, *bad)
        return list(replies[: len(PHOTOS)]), list(replies[len(PHOTOS) :])

    fine, bad = asyncio.run(burst())
    assert [r.json()["label"] for r in fine] == good
    for (kind, _), reply in zip(BAD, bad, strict=True):
        assert reply.status_code == 422, reply.text
        [error] = reply.json()["detail"]
        assert (error["type"], error["loc"]) == (kind, ["body", "image"]), error
    batch = httpx.post(f"{url}/predict/batch", json={"images": [b64(PHOTOS[0]), BAD[0][1]]})
    assert batch.status_code == 422
    assert [e["loc"] for e in batch.json()["detail"]] == [["body", "images", 1]]
    metrics = httpx.get(f"{url}/metrics").text
    assert 'microbatch_images_total{model="' in metrics
    assert 'outcome="too_many_pixels"} 1.0' in metrics
    assert "microbatch_image_decode_seconds_count" in metrics
    assert "microbatch_image_preprocess_seconds_count" in metrics


def test_what_does_not_fit_the_model_is_refused(
    vit_server: ServerProcess, classifier_server: ServerProcess
) -> None:
    text = httpx.post(f"{vit_server.url}/predict", json={"text": "a cat"})
    assert text.status_code == 422
    assert "send an image" in text.text
    image = httpx.post(f"{classifier_server.url}/predict", json={"image": b64(PHOTOS[0])})
    assert image.status_code == 422
    assert "text model" in image.text
    both = httpx.post(f"{vit_server.url}/predict", json={"image": b64(PHOTOS[0]), "text": "x"})
    assert both.status_code == 422


def test_an_image_model_takes_photos_over_the_text_body_limit(
    vit_server: ServerProcess, classifier_server: ServerProcess
) -> None:
    big = photo(1, size=(1200, 1000), fmt="PNG")  # about 3.6 MB: over 2 MiB in base64
    assert len(b64(big)) > 2 * 1024 * 1024
    answered = httpx.post(f"{vit_server.url}/predict", json={"image": b64(big)}, timeout=60)
    assert answered.status_code == 200, answered.text
    text_server = httpx.post(f"{classifier_server.url}/predict", json={"image": b64(big)})
    assert text_server.status_code == 413


def test_front_ends_of_workers_decode_images(vit_dir: Path, vit_server: ServerProcess,
                                             tmp_path: Path) -> None:  # fmt: skip
    """With `--workers 2` each front-end decodes its own requests' images (its copy of the
    encoder holds the image processor) and answers what one process answers."""
    body = {"all_scores": True}
    expected = [httpx.post(f"{vit_server.url}/predict", json={"image": b64(p), **body})
                .json()["scores"] for p in PHOTOS]  # fmt: skip
    args = ["--model", str(vit_dir), "--no-compile", "--dtype", "float32", "--workers", "2"]
    workers = ServerProcess(args, tmp_path / "workers.log").start()
    try:
        for data, scores in zip(PHOTOS * 2, expected * 2, strict=True):
            with httpx.Client() as fresh:  # a new connection: either front-end may take it
                reply = fresh.post(f"{workers.url}/predict", json={"image": b64(data), **body})
            assert reply.json()["scores"] == pytest.approx(scores, abs=1e-6)
        upload = httpx.post(f"{workers.url}/predict", files={"image": ("a.jpg", PHOTOS[0])})
        assert upload.status_code == 200, upload.text
    finally:
        assert workers.stop() == 0, workers.log()


class Origin(http.server.BaseHTTPRequestHandler):
    """A real HTTP server's handler: `/photos/N.jpg` is PHOTOS[N], `/photos/moved.jpg`
    redirects to the first, anything else is 404."""

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        if self.path == "/photos/moved.jpg":
            self.send_response(302)
            self.send_header("Location", "/photos/0.jpg")
            self.end_headers()
            return
        if not self.path.startswith("/photos/") or not name.removesuffix(".jpg").isdigit():
            self.send_error(404)
            return
        data = PHOTOS[int(name.removesuffix(".jpg")) % len(PHOTOS)]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_urls_are_fetched_from_the_allowed_prefixes_only(vit_dir: Path, tmp_path: Path) -> None:
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    serving = threading.Thread(target=origin.serve_forever, daemon=True)
    serving.start()
    base = f"http://127.0.0.1:{origin.server_address[1]}"
    args = ["--model", str(vit_dir), "--no-compile", "--dtype", "float32",
            "--image-url-allow", f"{base}/photos/"]  # fmt: skip
    server = ServerProcess(args, tmp_path / "urls.log").start()
    try:
        url = server.url + "/predict"
        fetched = httpx.post(url, json={"image": f"{base}/photos/1.jpg", "all_scores": True})
        sent = httpx.post(url, json={"image": b64(PHOTOS[1]), "all_scores": True})
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["scores"] == sent.json()["scores"]
        refused = {
            f"{base}/secret/1.jpg": "url_not_allowed",
            f"{base}/photos/../secret/1.jpg": "url_not_allowed",
            f"{base}/photos/moved.jpg": "url_failed",  # a redirect could leave the list
            f"{base}/photos/missing.png": "url_failed",
        }
        for image, kind in refused.items():
            reply = httpx.post(url, json={"image": image})
            assert reply.status_code == 422, reply.text
            assert reply.json()["detail"][0]["type"] == kind, (image, reply.text)
        origin.shutdown()  # the origin dies mid-run: its URLs fail, nothing else does
        origin.server_close()
        gone = httpx.post(url, json={"image": f"{base}/photos/2.jpg"})
        assert gone.status_code == 422
        assert gone.json()["detail"][0]["type"] == "url_failed"
        assert httpx.post(url, json={"image": b64(PHOTOS[2])}).status_code == 200
    finally:
        assert server.stop() == 0, server.log()


def test_a_prefix_that_is_no_url_fails_at_start() -> None:
    from pydantic import ValidationError

    from server.settings import Settings

    with pytest.raises(ValidationError, match="--image-url-allow"):
        Settings(image_url_allow="images.example.com/public/")


def test_no_route_fails_on_an_image_model(
    clip_server: ServerProcess, vit_server: ServerProcess
) -> None:
    """Every prediction route, with texts and with images, and the describing routes, on
    both image models: each answers or refuses (4xx), never a 500."""
    image, data = b64(PHOTOS[0]), uri(PHOTOS[0])
    calls: list[tuple[str, str, object]] = [
        ("POST", "/predict", {"text": "hi"}), ("POST", "/predict", {"image": image}),
        ("POST", "/predict", {"image": image, "embedding_type": "int8"}),
        ("POST", "/predict", {"image": image, "encoding_format": "base64"}),
        ("POST", "/predict", {"image": image, "token_embeddings": True}),
        ("POST", "/predict", {"text": "hi", "token_embeddings": True}),
        ("POST", "/predict", {"image": image, "input_type": "query"}),
        ("POST", "/predict", {"text": "hi", "text_pair": "there"}),
        ("POST", "/predict/batch", {"images": [image, data]}),
        ("POST", "/v1/embeddings", {"input": [data], "model": "m"}),
        ("POST", "/v1/embeddings", {"input": "hello", "model": "m"}),
        ("POST", "/embed", {"inputs": [data]}), ("POST", "/embed", {"inputs": "hello"}),
        ("POST", "/embed_all", {"inputs": [data]}), ("POST", "/embed_all", {"inputs": "hello"}),
        ("POST", "/embed_sparse", {"inputs": "hello"}),
        ("POST", "/rerank", {"query": "q", "texts": ["a"]}),
        ("POST", "/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}}),
        ("POST", "/tokenize", {"inputs": "hello"}), ("POST", "/decode", {"ids": [1, 2]}),
        ("POST", "/", {"inputs": "hello"}), ("POST", "/", {"inputs": data}),
        ("POST", "/v1/rerank", {"query": "q", "documents": ["a"]}),
        ("POST", "/v2/embed", {"images": [data], "input_type": "image", "model": "m"}),
        ("POST", "/v2/embed", {"texts": ["a"], "model": "m", "embedding_types": ["float"]}),
        ("POST", "/v2/rerank", {"query": "q", "documents": ["a"], "model": "m"}),
        ("POST", "/v2/models/m/infer", {"inputs": [{"name": "text", "datatype": "BYTES",
                                                    "shape": [1], "data": ["hi"]}]}),
        ("GET", "/info", None), ("GET", "/model", None), ("GET", "/v1/models", None),
        ("GET", "/v2/models/m", None), ("GET", "/model/calibration", None),
        ("GET", "/dashboard/data", None), ("GET", "/admin/models", None),
    ]  # fmt: skip
    for server in (clip_server, vit_server):
        for method, path, body in calls:
            reply = httpx.request(method, server.url + path, json=body, timeout=30)
            assert reply.status_code < 500, (server.url, path, body, reply.text)
