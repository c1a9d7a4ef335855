"""The demo's HTML report: one self-contained page, every figure inlined as a PNG.

A page that embeds its figures opens anywhere (a laptop, a cluster's shared disk, an
artifact store) without a server or the workspace beside it. The figures come from the
stages' own plots (the cross-rank scatter, Δk over rounds, the budget curve) and from
two drawn here: the clusters' sizes and a word cloud of a few clusters' questions, as
PROGRESS's paper shows what a cluster holds.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.artifacts import Clustering, Pool
from engine.text import strip_answer_format
from engine.workspace import Workspace

# Words every question of the shapes world shares; they say nothing about a cluster.
_FILLER = frozenset(
    re.findall(
        r"\w+",
        """a an the is are there of in on to what which how many image object objects than
        or and it its this that located written from does do have has at holds""",
    )
)


@dataclass
class Figure:
    """One figure: a file name, a caption, the PNG bytes."""

    name: str
    caption: str
    png: bytes


@dataclass
class Section:
    """A heading, a paragraph, an optional table (header row first) and its figures."""

    title: str
    text: str = ""
    table: list[list[str]] | None = None
    figures: list[Figure] = field(default_factory=list)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def cluster_sizes_png(sizes: np.ndarray, title: str) -> bytes:
    """Bar chart of cluster sizes, largest first. sizes: int (K,)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.sort(np.asarray(sizes))[::-1]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(np.arange(len(order)), order, width=1.0, color="#4c72b0")
    ax.axhline(float(np.mean(order)), color="#c44e52", lw=1, label=f"mean {np.mean(order):.0f}")
    ax.set(xlabel="cluster (by size)", ylabel="rows", title=title)
    ax.legend(frameon=False)
    return _png(fig)


def word_frequencies(texts: Sequence[str], top: int = 40) -> dict[str, int]:
    """The ``top`` most frequent words of ``texts`` (lowercased, filler words dropped)."""
    words = Counter(
        w for t in texts for w in re.findall(r"[a-z0-9]+", t.lower()) if w not in _FILLER
    )
    return dict(words.most_common(top))


def cluster_words_png(questions: Mapping[int, Sequence[str]], sizes: np.ndarray) -> bytes:
    """A word cloud per cluster of its questions (one panel each, up to 6).

    questions: cluster id -> its rows' question texts; sizes: int (K,) rows per cluster.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from wordcloud import WordCloud

    items = list(questions.items())[:6]
    cols = min(3, len(items))
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (cluster, texts) in zip(axes.flat, items, strict=False):
        freqs = word_frequencies(texts)
        if freqs:
            cloud = WordCloud(
                width=400, height=240, background_color="white", random_state=0, max_words=40
            ).generate_from_frequencies(freqs)
            ax.imshow(cloud.to_array(), interpolation="bilinear")
        ax.set_title(f"cluster {cluster}: {int(sizes[cluster])} rows", fontsize=10)
    return _png(fig)


def cluster_questions(
    ws: Workspace, clustering: str, count: int, per_cluster: int = 300
) -> tuple[np.ndarray, dict[int, list[str]]]:
    """Sizes, int64 (K,), of ``clustering``'s clusters and the questions (at most
    ``per_cluster`` each, answer-format instructions stripped) of its ``count`` largest,
    largest first."""
    found = Clustering.open(ws, clustering)
    k = found.meta.k
    assigned = found.read_table(["id", "cluster"], under="assignments")
    sizes = np.bincount(assigned.column("cluster").to_numpy(), minlength=k).astype(np.int64)
    largest = np.argsort(-sizes, kind="stable")[:count].tolist()
    chosen = assigned.filter(pc.is_in(assigned.column("cluster"), pa.array(largest, pa.int32())))
    pool = Pool.open(ws).read_table(["id", "question"])
    joined = chosen.join(pool, "id")
    questions: dict[int, list[str]] = {c: [] for c in largest}
    cols = (joined.column("cluster").to_pylist(), joined.column("question").to_pylist())
    for c, q in zip(*cols, strict=True):
        if len(questions[c]) < per_cluster:
            questions[c].append(strip_answer_format(q))  # the format line is every row's
    return sizes, questions


def _table(rows: list[list[str]]) -> str:
    head, *body = rows
    th = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    cap = html.escape(f.caption)
    return (
        f'<figure><img class="figure" alt="{html.escape(f.name)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{cap}</figcaption></figure>'
    )


# Counts the figures the browser decoded into <body data-figures-loaded>: a headless
# browser's DOM dump then says whether every figure shows, not just that the tags exist.
_CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("img.figure")];
  document.body.dataset.figuresLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.figures = imgs.length;
});
</script>"""

_STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; max-width: 600px; }
code { background: #f6f6f6; padding: 0 3px; }
</style>"""


def render_html(title: str, sections: Sequence[Section]) -> str:
    """The whole page: a title, then each section's text, table and figures."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>{_STYLE}</head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        if s.table:
            parts.append(_table(s.table))
        parts.extend(_figure(f) for f in s.figures)
    parts.append(_CHECK + "</body></html>")
    return "".join(parts)
