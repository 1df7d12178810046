"""How close microbatch's outputs are to the reference library's, for your own models.

    python -m benchmarks.lab.fidelity --model ./my-model [--model ./other] [--texts FILE]

Loads each model through microbatch's loader (eager, CPU) and through the reference:
`SentenceTransformer` for embedding models, `CrossEncoder` for rerankers, transformers'
text-classification pipeline for classifiers; runs both on the same texts (the built-in
corpus, or one text per line of FILE) and prints the worst agreement: the lowest cosine
and the largest norm ratio for vectors, the largest absolute difference for scores.
Needs sentence-transformers (the `dev` extra). Nothing here runs at serving time.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from benchmarks.corpus import builtin

PAIR_QUERY = "what does this text say?"
HARD_TEXTS = [
    "Ünïcödé façade — naïve café",
    "emoji 🎉🚀 and symbols ∑∞≈",
    "中文文本测试。日本語のテキスト。한국어",
    "x",
    "word " * 2000,  # past any model's token limit
]


@dataclass(frozen=True, slots=True)
class Agreement:
    model: str
    task: str
    computed: str
    """How microbatch computes it: the pooling and modules, or the head's activation."""
    texts: int
    worst_cosine: float | None = None
    worst_norm_ratio: float | None = None
    max_abs_diff: float | None = None


def _describe(described: dict[str, Any]) -> str:
    if described["task"] == "embed":
        parts = ["+".join(described["pooling"])]
        parts += [f"dense {d['in']}->{d['out']}" for d in described["dense"]]
        parts += ["normalize"] if described["normalize"] else []
        return f"{described['description']}: {', '.join(parts)}"
    return f"{described['description']}: {described['head_activation']}"


def measure(source: str, texts: list[str], batch_size: int = 16) -> Agreement:
    """Our outputs and the reference's for `texts`, in batches of `batch_size`."""
    from batcher.models import LoadOptions, TextModel

    model = TextModel.load(LoadOptions(source=source, device="cpu", compile=False))
    described = model.describe()

    def ours(items: list[Any]) -> list[Any]:
        out: list[Any] = []
        for start in range(0, len(items), batch_size):
            out += model.predict(items[start : start + batch_size])
        return out

    base = Agreement(source, model.task, _describe(described), len(texts))
    if model.task == "embed":
        from sentence_transformers import SentenceTransformer

        reference = SentenceTransformer(source, device="cpu").encode(texts, batch_size=batch_size)
        vectors = np.array(ours(model.encoder.encode_many(texts)))
        norms, ref_norms = np.linalg.norm(vectors, axis=1), np.linalg.norm(reference, axis=1)
        cosine = (vectors * reference).sum(axis=1) / norms / ref_norms
        ratio = np.maximum(norms / ref_norms, ref_norms / norms)
        return Agreement(**{**asdict(base), "worst_cosine": float(cosine.min()),
                            "worst_norm_ratio": float(ratio.max())})  # fmt: skip
    queries = [PAIR_QUERY] * len(texts)
    scored = ours(model.encoder.encode_many(queries, texts))
    if model.task == "rerank":
        from sentence_transformers import CrossEncoder

        expected = CrossEncoder(source, device="cpu").predict(
            list(zip(queries, texts, strict=True))
        )
        diff = np.abs(np.array([s.score for s in scored]) - expected)
    else:
        from transformers import pipeline

        pipe = pipeline("text-classification", model=source, device="cpu", top_k=None)
        inputs = [{"text": q, "text_pair": t} for q, t in zip(queries, texts, strict=True)]
        expected_rows = [pipe(i, truncation=True) for i in inputs]
        diff = np.array([
            abs(dict(zip(model.labels, s.scores, strict=True))[e["label"]] - e["score"])
            for s, row in zip(scored, expected_rows, strict=True) for e in row
        ])  # fmt: skip
    return Agreement(**{**asdict(base), "max_abs_diff": float(diff.max())})


def _row(a: Agreement) -> str:
    if a.worst_cosine is not None and a.worst_norm_ratio is not None:
        figure = f"cosine >= {a.worst_cosine:.7f}, norms within {a.worst_norm_ratio - 1:.1e}"
    else:
        figure = f"largest score difference {a.max_abs_diff:.1e}"
    return f"| {a.model} | {a.task} | {a.computed} | {a.texts} | {figure} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lab.fidelity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", action="append", required=True, help="a model (repeatable)")
    parser.add_argument(
        "--texts",
        help="one text per line; default: 200 of the built-in corpus, accents, emoji, CJK, "
        "one character, and a text past the token limit",
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.texts:
        with open(args.texts, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        texts = builtin(200).texts + HARD_TEXTS
    warnings.filterwarnings("ignore", category=FutureWarning)
    results = [measure(source, texts) for source in args.model]
    print("| model | task | computed as | texts | worst agreement with the reference |")
    print("|---|---|---|---|---|")
    for result in results:
        print(_row(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
