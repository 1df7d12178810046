"""Image models against the reference libraries: an image classifier's labels and scores
against `pipeline("image-classification")`; CLIP's and SigLIP's image and text embeddings
against `get_image_features` / `get_text_features`; sentence-transformers' CLIP layout
against `SentenceTransformer.encode`. Tiny random-weight models built here, images of
many sizes, modes and formats (EXIF-rotated JPEGs among them), all at float32."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from batcher.models import (
    BadImage,
    ImageLimits,
    InvalidOption,
    LoadOptions,
    ModelLoadError,
    Options,
    Pixels,
)
from batcher.models.vision import VisionModel, load_model
from batcher.models.vision_loading import image_processor
from tests.batcher.models.test_images import CASES, encoded, picture
from tests.tiny_models import IMAGE_LABELS, save_clip, save_image_classifier, save_st_clip

transformers = pytest.importorskip("transformers")
load_image = transformers.image_utils.load_image


def images() -> list[str]:
    """Every mode and format of the decoding tests, at three sizes, and EXIF-rotated
    JPEGs: base64, as a client sends them."""
    out = []
    for i, (mode, fmt) in enumerate(CASES):
        size = [(40, 30), (17, 90), (300, 200)][i % 3]
        out.append(base64.b64encode(encoded(picture(mode, size, seed=i), fmt)).decode())
    for orientation in (3, 6, 8):
        exif = picture("RGB", (48, 24), seed=orientation).getexif()
        exif[0x0112] = orientation
        data = encoded(picture("RGB", (48, 24), seed=orientation), "JPEG", exif=exif.tobytes())
        out.append(base64.b64encode(data).decode())
    return out


IMAGES = images()


def served(path: Path, **options: Any) -> VisionModel:
    model = load_model(LoadOptions(source=str(path), device="cpu", compile=False,
                                   dtype="float32", **options))  # fmt: skip
    assert isinstance(model, VisionModel)
    return model


def pixels(model: VisionModel, inputs: list[str], options: Options | None = None) -> list[Pixels]:
    items = model.encoder.encode_images(inputs, options or Options())
    assert all(isinstance(item, Pixels) for item in items), items
    return items  # type: ignore[return-value]


def features(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def cosines(a: Any, b: Any) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b))


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_image_classifier(tmp_path_factory.mktemp("vit") / "vit")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_clip(tmp_path_factory.mktemp("siglip") / "siglip", "siglip")


def test_classifier_equals_the_pipeline(classifier_dir: Path) -> None:
    model = served(classifier_dir)
    assert model.task == "classify"
    assert model.encoder.labels == tuple(IMAGE_LABELS.values())
    ours = model.predict(pixels(model, IMAGES))
    pipe = transformers.pipeline("image-classification", model=str(classifier_dir),
                                 image_processor=image_processor(classifier_dir),
                                 device="cpu", top_k=None)  # fmt: skip
    for image, answer in zip(IMAGES, ours, strict=True):
        reference = {r["label"]: r["score"] for r in pipe(image)}
        assert answer.label == max(reference, key=reference.__getitem__)
        scores = dict(zip(model.encoder.labels, answer.scores, strict=True))
        assert scores == pytest.approx(reference, abs=1e-5)


def test_raw_scores_are_the_logits(classifier_dir: Path) -> None:
    model = served(classifier_dir)
    reference = transformers.AutoModelForImageClassification.from_pretrained(classifier_dir)
    processor = image_processor(classifier_dir)
    [answer] = model.predict(pixels(model, IMAGES[:1], Options(raw_scores=True)))
    with torch.no_grad():
        logits = reference(**processor(load_image(IMAGES[0]), return_tensors="pt")).logits[0]
    assert answer.scores == pytest.approx(logits.tolist(), abs=1e-5)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_image_and_text_embeddings_equal_the_reference(
    family: str, clip_dir: Path, siglip_dir: Path
) -> None:
    path = clip_dir if family == "clip" else siglip_dir
    model = served(path)
    assert model.encoder.modalities == ("image", "text")
    raw = Options(normalize=False)
    texts = ["a photo of a cat", "two dogs", "x" * 500]  # the last is cut at the tower's length
    ours = model.predict(
        [*pixels(model, IMAGES, raw), *model.encoder.encode_many(texts, options=raw)]
    )
    reference = transformers.AutoModel.from_pretrained(path)
    processor = image_processor(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        batch = processor([load_image(i) for i in IMAGES], return_tensors="pt")
        image_features = features(reference.get_image_features(**batch))
        if family == "siglip":  # as SigLIP was trained: padded to the length, no mask
            tokens = tokenizer(texts, padding="max_length", max_length=64, truncation=True,
                               return_tensors="pt")  # fmt: skip
            text_features = features(reference.get_text_features(input_ids=tokens["input_ids"]))
        else:
            tokens = tokenizer(texts, padding=True, truncation=True, max_length=77,
                               return_tensors="pt")  # fmt: skip
            text_features = features(reference.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ))  # fmt: skip
    expected = torch.cat([image_features, text_features])
    assert cosines(ours, expected).min() >= 0.9999
    assert torch.allclose(torch.tensor(ours), expected, atol=1e-4)
    normalized = model.predict(pixels(model, IMAGES[:2]))  # the default: normalised
    assert torch.allclose(torch.tensor(normalized),
                          torch.nn.functional.normalize(image_features[:2]), atol=1e-5)  # fmt: skip


@pytest.mark.reference
@pytest.mark.parametrize("normalize", [False, True])
def test_sentence_transformers_clip_equals_encode(tmp_path: Path, normalize: bool) -> None:
    from sentence_transformers import SentenceTransformer

    path = save_st_clip(tmp_path / "st-clip", normalize=normalize)
    model = served(path)
    reference = SentenceTransformer(str(path), device="cpu")
    texts = ["a photo of a cat", "a diagram"]
    ours = model.predict([*pixels(model, IMAGES), *model.encoder.encode_many(texts)])
    expected = np.concatenate([
        reference.encode([load_image(i) for i in IMAGES]), reference.encode(texts)
    ])  # fmt: skip
    assert cosines(ours, expected).min() >= 0.9999
    assert np.allclose(np.asarray(ours), expected, atol=1e-4)


def test_images_and_texts_in_one_batch_answer_as_alone(clip_dir: Path) -> None:
    model = served(clip_dir)
    image = pixels(model, IMAGES[:3])
    text = model.encoder.encode_many(["a cat", "a longer text about dogs"])
    mixed = [image[0], text[0], image[1], text[1], image[2]]
    together = model.predict(mixed)
    alone = [model.predict([item])[0] for item in mixed]
    assert torch.allclose(torch.tensor(together), torch.tensor(alone), atol=1e-5)


def test_dimensions_and_options(clip_dir: Path, classifier_dir: Path) -> None:
    model = served(clip_dir)
    [full] = model.predict(pixels(model, IMAGES[:1], Options(normalize=False)))
    [cut] = model.predict(pixels(model, IMAGES[:1], Options(dimensions=4, normalize=False)))
    assert cut == pytest.approx(full[:4], abs=1e-6)
    for bad in (Options(prompt="x"), Options(dimensions=17), Options(raw_scores=True)):
        with pytest.raises(InvalidOption):
            model.encoder.encode_images(IMAGES[:1], bad)
    with pytest.raises(InvalidOption, match="pooled embeddings only"):
        model.encoder.encode_many(["a text"], options=Options(token_embeddings=True))
    classifier = served(classifier_dir)
    with pytest.raises(InvalidOption, match="send an image"):
        classifier.encoder.encode_many(["a text"])
    with pytest.raises(InvalidOption):
        classifier.encoder.encode_images(IMAGES[:1], Options(normalize=True))


def test_a_bad_image_fails_alone(clip_dir: Path) -> None:
    model = served(clip_dir)
    out = model.encoder.encode_images([IMAGES[0], "bm90IGFuIGltYWdl", IMAGES[1][:120]])
    assert isinstance(out[0], Pixels)
    assert [getattr(o, "kind", None) for o in out] == [None, "not_an_image", "truncated"]
    assert all(isinstance(o, BadImage) for o in out[1:])


def test_identity_is_the_pixels(clip_dir: Path) -> None:
    model = served(clip_dir)
    png = picture("RGB", (40, 30))
    same = [base64.b64encode(encoded(png, "PNG")).decode(),
            base64.b64encode(encoded(png, "BMP")).decode()]  # fmt: skip
    a, b = pixels(model, same)
    assert a.identity() == b.identity()  # two files of one picture compute the same
    [c] = pixels(model, same[:1], Options(dimensions=8))
    assert c.identity() != a.identity()


def test_unservable_image_models_are_refused_at_load(tmp_path: Path, classifier_dir: Path) -> None:
    # A processor that keeps each image's size: a batch would not be one tensor.
    keeps = save_image_classifier(tmp_path / "keeps-size")
    config_path = keeps / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "do_resize": False}))
    with pytest.raises(ModelLoadError, match="several sizes"):
        served(keeps)
    # An image backbone without a head: nothing it answers is defined by a reference.
    backbone = tmp_path / "backbone"
    transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=64, image_size=32,
                          patch_size=8)).save_pretrained(backbone)  # fmt: skip
    with pytest.raises(ModelLoadError, match="not served"):
        served(backbone)
    with pytest.raises(ModelLoadError, match="does not fit"):
        served(classifier_dir, task="embed")


@pytest.mark.slow
def test_compiled_batches_of_any_size_never_recompile(classifier_dir: Path, clip_dir: Path) -> None:
    for path in (classifier_dir, clip_dir):
        model = load_model(LoadOptions(source=str(path), device="cpu", compile=True,
                                       dtype="float32"))  # fmt: skip
        model.warm_up(8)
        assert model.compile_state.enabled, model.compile_state
        eager = served(path)
        texts = [] if path == classifier_dir else eager.encoder.encode_many(["a", "b c", "d"])
        for size in (1, 3, 5, 8, 2, 7):
            batch = [*pixels(model, IMAGES[:size]), *texts[: size % 4]]
            got, want = model.predict(batch), eager.predict(batch)
            if path == classifier_dir:
                assert [g.label for g in got] == [w.label for w in want]
            else:
                assert cosines(got, want).min() >= 0.9999
        assert model.compile_state.graphs_since_warm_up == 0


def test_a_sliver_that_the_resize_would_blow_up_is_refused(clip_dir: Path) -> None:
    # CLIP resizes the shortest edge to 32 here, keeping the aspect ratio: a 1 x 40,000
    # picture would become 32 x 1,280,000 before its crop.
    model = served(clip_dir)
    sliver = base64.b64encode(encoded(picture("RGB", (40_000, 1)), "PNG")).decode()
    limits = ImageLimits(max_pixels=1_000_000)
    [refused] = model.encoder.encode_images([sliver], Options(), limits)
    assert isinstance(refused, BadImage)
    assert refused.kind == "too_many_pixels"
    assert "shortest edge of 32" in str(refused)
    [fine] = model.encoder.encode_images([IMAGES[0]], Options(), limits)
    assert isinstance(fine, Pixels)
