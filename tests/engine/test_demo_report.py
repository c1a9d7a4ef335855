"""The demo report's pieces without Ray: figures are real PNGs, the page inlines each one."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
from PIL import Image

from engine.demo_report import (
    Figure,
    Section,
    cluster_sizes_png,
    cluster_words_png,
    render_html,
    word_frequencies,
)


def _image(png: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(png))
    im.load()
    return im


def test_word_frequencies_keep_the_words_that_tell_clusters_apart():
    freqs = word_frequencies(
        ["How many circles are there?", "How many squares are there?", "Is the red circle left?"]
    )
    assert freqs["circles"] == 1 and freqs["red"] == 1 and freqs["left"] == 1
    assert not {"how", "many", "are", "there", "the", "is"} & set(freqs)


def test_cluster_figures_are_png_images():
    sizes = np.array([50, 7, 20, 0, 3])
    bars = _image(cluster_sizes_png(sizes, "5 clusters"))
    clouds = _image(
        cluster_words_png(
            {0: ["How many circles are there?"] * 5, 2: ["What color is the square?"]}, sizes
        )
    )
    assert bars.format == clouds.format == "PNG"
    assert bars.width > 300 and clouds.width > 300
    # a word cloud draws words: the panel is not one flat colour
    assert len(set(np.asarray(clouds.convert("L")).ravel().tolist())) > 10


def test_page_inlines_every_figure_and_escapes_text():
    png = cluster_sizes_png(np.array([3, 2, 1]), "three")
    page = render_html(
        "demo <run>",
        [
            Section(
                "Sizes & words", "a < b", [["k", "rows"], ["0", "3"]], [Figure("a.png", "A", png)]
            ),
            Section("More", figures=[Figure("b.png", "B", png), Figure("c.png", "C", png)]),
        ],
    )
    sources = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(s) for s in sources] == [png, png, png]
    assert page.count('class="figure"') == 3
    assert "demo &lt;run&gt;" in page and "Sizes &amp; words" in page and "a &lt; b" in page
    assert "<td>3</td>" in page
    assert "figuresLoaded" in page  # the count a headless browser reads back
