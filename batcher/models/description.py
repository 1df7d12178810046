"""What a model says it computes, read from its files the way sentence-transformers reads
them: `modules.json`, the Transformer's `sentence_bert_config.json`, `1_Pooling/config.json`
(the legacy `pooling_mode_*_token` flags and the current `pooling_mode` string), `Dense`,
`Normalize`, a SparseEncoder's `SpladePooling`, and the prompts and CrossEncoder settings
of `config_sentence_transformers.json` (and of `config.json` for older CrossEncoders).

Pure file reading, no torch: the numbers these describe are computed in
`batcher.models.heads`. A module that microbatch cannot reproduce exactly is refused here,
with its name: an approximation is never served.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

PoolingMode = Literal["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]
POOLING_MODES: tuple[PoolingMode, ...] = get_args(PoolingMode)

# sentence-transformers' legacy flags, in the order in which it concatenates the modes.
LEGACY_POOLING_FLAGS: dict[str, PoolingMode] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

Kind = Literal["sentence-transformers", "cross-encoder", "sparse-encoder", "transformers"]
SUPPORTED_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
TRANSFORMER_CONFIGS = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)
SENTENCE_EMBEDDING = "sentence_embedding"


class UnsupportedModel(Exception):
    """The model declares something microbatch cannot compute exactly; the message names
    it. (`batcher.models.loading` turns it into a `ModelLoadError`.)"""


@dataclass(frozen=True, slots=True)
class Pooling:
    """`1_Pooling/config.json`: how token embeddings become one vector."""

    modes: tuple[PoolingMode, ...]
    """Concatenated in this order (sentence-transformers allows several)."""
    embedding_dimension: int
    include_prompt: bool = True
    """False: the prompt's tokens are left out of the pooling (INSTRUCTOR-style models)."""


@dataclass(frozen=True, slots=True)
class Dense:
    """A `Dense` module: `activation(x @ weight.T + bias)` (+ a residual, when declared)."""

    path: str
    """The module's folder, relative to the model's root (its weights are there)."""
    in_features: int
    out_features: int
    bias: bool
    activation: str
    """A dotted `torch.nn` class name, as sentence-transformers stores it."""
    use_residual: bool = False


@dataclass(frozen=True, slots=True)
class Normalize:
    """A `Normalize` module that is not the last one (a last one is `Description.normalize`)."""


Step = Dense | Normalize


@dataclass(frozen=True, slots=True)
class Splade:
    """A SparseEncoder's `SpladePooling`: `pool(activation(logits))` over the tokens, one
    weight per vocabulary entry. `relu`: log(1 + relu(x)); `log1p_relu`: log of that + 1."""

    pooling: Literal["max", "sum"]
    activation: Literal["relu", "log1p_relu"]


@dataclass(frozen=True, slots=True)
class Description:
    """Everything about a model that decides what its outputs are."""

    kind: Kind
    """Where the description came from: a SentenceTransformer's modules, a CrossEncoder's
    settings, or nothing (a plain transformers directory)."""
    transformer_path: str = ""
    """The folder holding the transformer, relative to the model's root."""
    pooling: Pooling | None = None
    steps: tuple[Step, ...] = ()
    """The modules after pooling, in order, without a trailing Normalize."""
    normalize: bool = False
    """The model ends with a Normalize module: its vectors are unit length by default."""
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: Mapping[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    activation: str | None = None
    """A CrossEncoder's declared `activation_fn` (dotted name), if any."""
    splade: Splade | None = None
    """A SparseEncoder's pooling of its masked-language-model logits."""
    static_query: str | None = None
    """An inference-free SparseEncoder: the folder of the `SparseStaticEmbedding` its
    queries go through (a weight per token, no model), where documents take the
    Transformer and SpladePooling."""

    @property
    def embedding_dimension(self) -> int | None:
        """The length of the vectors before any `dimensions` truncation."""
        for step in reversed(self.steps):
            if isinstance(step, Dense):
                return step.out_features
        if self.pooling is None:
            return None
        return self.pooling.embedding_dimension * len(self.pooling.modes)

    @property
    def default_prompt(self) -> str:
        if self.default_prompt_name is None:
            return ""
        return self.prompts[self.default_prompt_name]


PLAIN = Description(kind="transformers")


def read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnsupportedModel(f"{path.name} is not valid JSON: {exc}") from None


def class_name(entry: Mapping[str, Any]) -> str:
    kind = str(entry.get("type", ""))
    if not kind.startswith("sentence_transformers."):
        raise UnsupportedModel(
            f"module {entry.get('name', '?')} is {kind!r}, code that is not part of "
            "sentence-transformers; microbatch does not run it"
        )
    return kind.rsplit(".", 1)[-1]


def sentence_transformer(
    root: Path, modules: list[dict[str, Any]], st_config: Mapping[str, Any]
) -> Description:
    if not modules or class_name(modules[0]) != "Transformer":
        first = class_name(modules[0]) if modules else "nothing"
        raise UnsupportedModel(
            f"the first module is {first}; microbatch serves models whose first module is a "
            "Hugging Face Transformer"
        )
    transformer = transformer_of(root, modules[0], task="feature-extraction")
    pooling: Pooling | None = None
    steps: list[Step] = []
    for entry in modules[1:]:
        name = class_name(entry)
        path = str(entry.get("path", ""))
        if name == "Pooling" and pooling is None and not steps:
            pooling = _pooling(root / path)
        elif name == "Dense" and pooling is not None:
            steps.append(_dense(root, path))
        elif name == "Normalize" and pooling is not None:
            _check_io(read_json(root / path / "config.json") or {}, f"Normalize module {path!r}")
            steps.append(Normalize())
        else:
            raise UnsupportedModel(_refusal(entry, name, path))
    if pooling is None:
        raise UnsupportedModel(
            "the model has no Pooling module (it returns token embeddings); microbatch "
            "serves one vector per text"
        )
    normalize = bool(steps) and isinstance(steps[-1], Normalize)
    if normalize:
        steps.pop()
    prompts, default_prompt_name = prompts_of(st_config)
    return Description(
        kind="sentence-transformers",
        transformer_path=transformer.path,
        pooling=pooling,
        steps=tuple(steps),
        normalize=normalize,
        max_seq_length=transformer.max_seq_length,
        do_lower_case=transformer.do_lower_case,
        prompts=prompts,
        default_prompt_name=default_prompt_name,
    )


def _refusal(entry: Mapping[str, Any], name: str, path: str) -> str:
    where = f"module {entry.get('name')} ({entry.get('type')}, in {path or 'the root'!r})"
    if name in ("Dense", "Normalize"):
        return f"{where} comes before the Pooling module; microbatch applies it to pooled vectors"
    if name == "Pooling":
        return f"{where} is a second Pooling module; microbatch pools once"
    return (
        f"{where} cannot be computed exactly by microbatch, which reproduces "
        f"{', '.join(SUPPORTED_MODULES)} modules only"
    )


@dataclass(frozen=True, slots=True)
class _Transformer:
    path: str
    max_seq_length: int | None
    do_lower_case: bool


def transformer_of(root: Path, entry: Mapping[str, Any], *, task: str) -> _Transformer:
    path = str(entry.get("path", ""))
    config: dict[str, Any] = {}
    for name in TRANSFORMER_CONFIGS:
        found = read_json(root / path / name)
        if found is not None:
            config = found
            break
    declared = config.get("transformer_task", task)
    if declared != task:
        raise UnsupportedModel(
            f"the Transformer module runs the task {declared!r}; microbatch computes {task!r} here"
        )
    text = (config.get("modality_config") or {}).get("text", {})
    logits = task in ("sequence-classification", "fill-mask")
    expected_output = "logits" if logits else "last_hidden_state"
    output = text.get("method_output_name", expected_output)
    if text.get("method", "forward") != "forward" or output != expected_output:
        raise UnsupportedModel(
            f"the Transformer module reads {output!r} of {text.get('method')!r}; microbatch "
            f"reads {expected_output!r} of the forward pass"
        )
    max_seq_length = config.get("max_seq_length")
    return _Transformer(
        path=path,
        max_seq_length=int(max_seq_length) if max_seq_length is not None else None,
        do_lower_case=bool(config.get("do_lower_case", False)),
    )


def _pooling(folder: Path) -> Pooling:
    config = read_json(folder / "config.json")
    if config is None:
        raise UnsupportedModel(f"the Pooling module has no config.json in {folder.name!r}")
    dimension = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    if not isinstance(dimension, int):
        raise UnsupportedModel(f"{folder.name}/config.json gives no embedding dimension")
    raw = config.get("pooling_mode")
    modes: tuple[str, ...]
    if raw is None:
        modes = tuple(mode for flag, mode in LEGACY_POOLING_FLAGS.items() if config.get(flag))
        modes = modes or ("mean",)
    else:
        modes = (raw,) if isinstance(raw, str) else tuple(raw)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown or not modes:
        raise UnsupportedModel(
            f"pooling mode {unknown or modes!r} is not one of {', '.join(POOLING_MODES)}"
        )
    return Pooling(
        modes=modes,  # type: ignore[arg-type]
        embedding_dimension=dimension,
        include_prompt=bool(config.get("include_prompt", True)),
    )


def _check_io(config: Mapping[str, Any], what: str) -> None:
    for key in ("module_input_name", "module_output_name"):
        value = config.get(key, SENTENCE_EMBEDDING)
        if value not in (None, SENTENCE_EMBEDDING):
            raise UnsupportedModel(
                f"the {what} works on {value!r}; microbatch applies modules to the "
                "sentence embedding only"
            )


def _dense(root: Path, path: str) -> Dense:
    config = read_json(root / path / "config.json")
    if config is None:
        raise UnsupportedModel(f"the Dense module has no config.json in {path!r}")
    _check_io(config, f"Dense module {path!r}")
    activation = str(config.get("activation_function", "torch.nn.modules.activation.Tanh"))
    if not activation.startswith("torch.nn."):
        raise UnsupportedModel(
            f"the Dense module {path!r} uses the activation {activation!r}; microbatch "
            "runs torch.nn activations only"
        )
    return Dense(
        path=path,
        in_features=int(config["in_features"]),
        out_features=int(config["out_features"]),
        bias=bool(config.get("bias", True)),
        activation=activation,
        use_residual=bool(config.get("use_residual", False)),
    )


def prompts_of(st_config: Mapping[str, Any]) -> tuple[dict[str, str], str | None]:
    prompts = st_config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise UnsupportedModel(
            "config_sentence_transformers.json has prompts that are not plain text "
            f"({prompts!r}); microbatch serves text prompts"
        )
    default = st_config.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise UnsupportedModel(
            f"default_prompt_name {default!r} is not one of the prompts {sorted(prompts)}"
        )
    return dict(prompts), default


def is_legacy_cross_encoder(root: Path) -> bool:
    config = read_json(root / "config.json") or {}
    return "sentence_transformers" in config or "sbert_ce_default_activation_function" in config


def cross_encoder(
    root: Path, modules: list[dict[str, Any]] | None, st_config: Mapping[str, Any]
) -> Description:
    transformer = _Transformer(path="", max_seq_length=None, do_lower_case=False)
    if modules is not None:
        if len(modules) != 1 or class_name(modules[0]) != "Transformer":
            names = ", ".join(str(m.get("type")) for m in modules)
            raise UnsupportedModel(
                f"this CrossEncoder is made of {names}; microbatch serves CrossEncoders "
                "that are one sequence-classification Transformer"
            )
        transformer = transformer_of(root, modules[0], task="sequence-classification")
    prompts, default_prompt_name = prompts_of(st_config)
    if default_prompt_name is not None and prompts[default_prompt_name]:
        raise UnsupportedModel(
            f"this CrossEncoder prepends the prompt {default_prompt_name!r} to its inputs; "
            "microbatch does not serve CrossEncoder prompts"
        )
    config = read_json(root / transformer.path / "config.json") or {}
    activation = st_config.get("activation_fn")
    if activation is None:
        activation = (config.get("sentence_transformers") or {}).get("activation_fn")
    if activation is None:
        activation = config.get("sbert_ce_default_activation_function")
    if activation is not None and not str(activation).startswith("torch."):
        raise UnsupportedModel(
            f"this CrossEncoder's activation {activation!r} is not a torch function; "
            "microbatch runs torch.nn activations only"
        )
    return Description(
        kind="cross-encoder",
        transformer_path=transformer.path,
        max_seq_length=transformer.max_seq_length,
        do_lower_case=transformer.do_lower_case,
        activation=str(activation) if activation is not None else None,
    )
