"""Report statistics and the index-side measurements (train→train, duplicates) against brute force."""

from xml.etree import ElementTree

import numpy as np
import pytest
from test_build_search import build, clustered, write_collection

from copyscan.indexing.store import layout
from copyscan.search.report import history, html, plots, stats
from copyscan.search.report.config import ReportConfig
from copyscan.search.report.neighbours import near_duplicates, sample_ids, train_train


def test_histogram_counts_everything_and_integrates_to_the_share_inside():
    values = np.array([-0.2, 0.0, 0.0049, 0.005, 0.5, 0.999, 1.0, 1.3, np.nan])
    h = stats.histogram(values)
    assert len(h["counts"]) == 200 and np.allclose(np.diff(h["edges"]), 0.005)
    assert h["below"] == 1 and h["above"] == 1
    assert h["counts"].sum() == 6  # 1.0 falls in the last (closed) bin; NaN is not a value
    assert h["counts"][0] == 2 and h["counts"][1] == 1 and h["counts"][100] == 1 and h["counts"][199] == 2
    assert np.isclose((h["density"] * 0.005).sum(), 6 / 8)


def test_describe_and_its_fraction_interval_cover_the_truth():
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(100):
        values = rng.uniform(0, 1, 400)  # true P(value >= 0.9) = 0.1
        lo, hi = stats.describe(values, [0.9])["above"]["0.9"]["ci95"]
        covered += lo <= 0.1 <= hi
    assert 88 <= covered <= 100  # a 95 % interval: ~95 of 100 (binomial spread)
    d = stats.describe(np.array([-0.3, 0.1, 0.2, 0.3, 0.4, 1.2, 1.5, np.nan]), [0.25])
    assert d["below_0"] == 1 and d["above_1"] == 2  # outside the histograms' [0, 1], counted here
    d = stats.describe(np.array([0.1, 0.2, 0.3, 0.4, np.nan]), [0.25])
    assert d["n"] == 4 and d["missing"] == 1 and np.isclose(d["mean"], 0.25)
    assert np.isclose(d["p75"], np.percentile([0.1, 0.2, 0.3, 0.4], 75))
    assert d["above"]["0.25"]["count"] == 2 and d["above"]["0.25"]["fraction"] == 0.5
    assert stats.describe(np.array([np.nan]), [0.5])["mean"] is None


def test_shift_interval_contains_the_difference_and_excludes_zero_when_shifted():
    rng = np.random.default_rng(2)
    s = stats.shift(rng.normal(0.4, 0.1, 500), rng.normal(0.3, 0.1, 500), resamples=400)
    assert s["method"] == "bootstrap" and s["ci95"][0] < s["mean_difference"] < s["ci95"][1]
    assert s["ci95"][0] > 0.05 and s["ci95"][1] < 0.15
    big = stats.shift(rng.normal(0.3, 0.1, 300_000), rng.normal(0.3, 0.1, 1000))
    assert big["method"] == "normal" and big["ci95"][0] < 0 < big["ci95"][1]


@pytest.fixture(scope="module")
def dup_index(tmp_path_factory):
    """An IVF-PQ index whose collection holds planted groups of near-identical vectors."""
    rng = np.random.default_rng(0)
    d = 64
    xb = clustered(3_000, d, 150, rng)
    group_sizes = [2, 3, 4, 6, 9]
    start = 0
    for size in group_sizes:  # vectors start..start+size-1 become near-copies of vector `start`
        base = xb[start]
        for i in range(start + 1, start + size):
            v = base + 0.01 * rng.standard_normal(d).astype(np.float32)
            xb[i] = v / np.linalg.norm(v)
        start += size
    rng.shuffle(xb)  # spread the groups over shards
    out = str(tmp_path_factory.mktemp("dup") / "idx")
    stats_ = write_collection(out, xb, 700)
    plan, manifest = build(out, stats_, d, flat_threshold=0, max_shard_vectors=1_500, max_code_bytes=32)
    assert plan.factory.startswith("IVF") and len(manifest["index_shards"]) >= 2
    ids = np.concatenate(
        [layout.pack_ids(e["shard"], np.arange(e["count"])) for e in manifest["embedding_shards"]]
    )
    return out, manifest, xb, ids


def test_near_duplicates_match_brute_force(dup_index, tmp_path):
    out, manifest, xb, ids = dup_index
    cfg = ReportConfig(run="unused", cache_dir=str(tmp_path / "cache"), nprobe=16)
    sims = xb @ xb.T
    np.fill_diagonal(sims, -1)
    truth = (sims >= cfg.duplicate_radius).sum(axis=1)
    assert sorted(np.unique(truth))[-1] == 8  # the 9-group
    chosen = np.concatenate([np.nonzero(truth > 0)[0], np.arange(0, 3_000, 97)])
    got = near_duplicates(cfg, out, manifest, ids[chosen])
    np.testing.assert_array_equal(got, truth[chosen])


def test_train_train_is_the_best_other_image(dup_index, tmp_path):
    out, manifest, xb, ids = dup_index
    cfg = ReportConfig(run="unused", cache_dir=str(tmp_path / "cache"), nprobe=32, candidates=200)
    chosen = sample_ids(manifest, 300, seed=5)
    assert len(np.unique(chosen)) == 300 and np.isin(chosen, ids).all()
    assert not np.array_equal(chosen, sample_ids(manifest, 300, seed=6))
    rows = np.searchsorted(ids, chosen)
    got = train_train(cfg, out, manifest, chosen)
    sims = xb[rows] @ xb.T
    sims[np.arange(len(rows)), rows] = -np.inf
    best = sims.max(axis=1)
    assert (got["neighbour"] != chosen).all()
    # IVF-PQ + exact re-ranking: the best other image, found for nearly all, scored exactly
    exact = np.einsum("nd,nd->n", xb[rows], xb[np.searchsorted(ids, got["neighbour"])])
    np.testing.assert_allclose(got["score"], exact, atol=2e-3)  # fp16 stored vectors
    assert np.mean(np.isclose(got["score"], best, atol=1e-3)) >= 0.95
    assert np.isfinite(got["score_norm"]).all() and (got["score_norm"] <= got["score"] + 1e-6).all()


def test_script_data_cannot_close_the_script_element():
    text = html._json_for_script([{"caption": "</script><script>alert(1)</script>", "x": float("nan")}])
    assert "</script" not in text and '"x":null' in text


def test_fraction_intervals_are_wilson_and_do_not_collapse_at_zero_hits():
    values = np.random.default_rng(4).uniform(0, 0.8, 1000)
    d = stats.describe(values, [0.5, 0.9, 0.0])
    none, some, every = d["above"]["0.9"], d["above"]["0.5"], d["above"]["0"]
    # 0 of 1,000: the bootstrap gave [0, 0]; Wilson's upper bound is z²/(n + z²) ≈ 0.38 %
    assert none["count"] == 0 and none["ci95"][0] == 0.0
    assert none["ci95"][1] == pytest.approx(1.959964**2 / (1000 + 1.959964**2), rel=1e-9)
    assert every["count"] == 1000 and every["ci95"][1] == 1.0 and every["ci95"][0] < 1.0
    lo, hi = stats.wilson_interval(some["count"], 1000)
    assert some["ci95"] == [lo, hi] and lo < some["fraction"] < hi
    # Wilson's score interval: the p whose score test |p̂ − p| / sqrt(p(1 − p)/n) = z, at both ends
    for bound in (lo, hi):
        z = abs(some["fraction"] - bound) / np.sqrt(bound * (1 - bound) / 1000)
        assert z == pytest.approx(1.959964, rel=1e-9)
    assert {a["method"] for a in d["above"].values()} == {"wilson"}
    assert history.wilson_interval is stats.wilson_interval  # the old import path still works


def _svg(text):
    """An SVG string parsed as XML (fails on malformed markup, e.g. a split entity)."""
    return ElementTree.fromstring(text)


def test_histogram_svg_has_axis_titles_ticks_hover_values_and_out_of_range_counts():
    gen = np.array([0.5012, 0.5012, 0.5012, -0.2, 1.3, 1.5, np.nan])
    train = np.array([0.5012, 0.9])
    svg = _svg(plots.histogram_svg(gen, train, "density of score_norm", x_label="score_norm"))
    texts = {t.get("class"): [] for t in svg.iter("text")}
    for t in svg.iter("text"):
        texts[t.get("class")].append(t)
    titles = [t.text for t in texts["axis-title"]]
    assert titles == ["score_norm (bins of 0.005)", "density"]
    x_ticks = [t.text for t in texts[None] if t.get("text-anchor") == "middle"]
    assert x_ticks == [f"{x:.1f}" for x in np.linspace(0, 1, 11)]
    # gen's density peaks at 3 / (6 · 0.005) = 100: the y ticks are 0, 20, …, 100, the top one at the top
    y_ticks = [t for t in texts[None] if t.get("text-anchor") == "end"]
    assert [t.text for t in y_ticks] == ["0", "20", "40", "60", "80", "100"]
    assert float(y_ticks[-1].get("y")) - 3.5 == pytest.approx(46.0)
    # hover: one rect per non-empty bin, its <title> holding both distributions' counts
    bins = [r for r in svg.iter("rect") if r.get("class") == "bin"]
    assert len(bins) == 2
    hover = bins[0].find("title").text
    assert hover.startswith("score_norm in [0.500, 0.505): ")
    assert "gen→train top-1: 3 (density 100)" in hover and "train→train: 1 (density 100)" in hover
    legend = [t.text for t in texts["legend"]]
    assert legend == [
        "gen→train top-1 (n = 6); outside [0, 1], not plotted: 1 below 0, 2 above 1",
        "train→train (n = 2); outside [0, 1], not plotted: 0 below 0, 0 above 1",
    ]


def test_nice_ticks_cover_the_maximum_in_round_steps():
    assert plots.nice_ticks(2.4) == [0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert plots.nice_ticks(200) == [0, 50, 100, 150, 200]
    assert plots.nice_ticks(0.0) == [0.0, 1.0]


def test_trend_cuts_checkpoint_names_before_escaping():
    name = "x" * 16 + "&<b>tail"  # escaping first, then cutting at 18, left "&am" in the page
    rows = [
        {"checkpoint": name, "rate": 0.02, "rate_low": 0.01, "rate_high": 0.03, "flagged": 2, "queries": 100}
    ]
    svg = _svg(plots.trend_svg(rows))
    group = next(g for g in svg.iter("g") if g.get("class") == "checkpoint")
    assert group.find("text").text == "x" * 16 + "&…"
    assert group.find("title").text == f"{name}: 2.00% [1.00%, 3.00%], 2 of 100"
    assert plots.shorten("short", 18) == "short" and len(plots.shorten("y" * 40, 18)) == 18


def test_only_http_and_https_urls_become_links():
    assert html.link('https://example.org/a?x=1&y="2"') == (
        '<a href="https://example.org/a?x=1&amp;y=&quot;2&quot;" target="_blank" '
        'rel="noopener noreferrer">https://example.org/a?x=1&amp;y=&quot;2&quot;</a>'
    )
    assert html.link("HTTP://EXAMPLE.ORG/").startswith('<a href="HTTP://EXAMPLE.ORG/"')
    for url in (
        "javascript:alert(1)",
        " https://leading.blank/",
        "data:text/html,<b>x</b>",
        "s3://b/k",
        "http://",
    ):
        assert "<a" not in html.link(url) and html.link(url) == html._e(url)
    assert html.link(None) == ""


def _page(column="score"):
    """A report's ``result`` and distributions, built from seeded values (no scan, no index)."""
    rng = np.random.default_rng(3)
    gen, train = rng.uniform(0, 1, 50), rng.uniform(-0.1, 0.6, 40)
    block = {
        "thresholds": [0.5],
        "gen_train": stats.describe(gen, [0.5]),
        "train_train": stats.describe(train, [0.5]),
        "shift": stats.shift(gen, train, resamples=50),
    }
    empty = {"images": 0, "mean": None, "median": None, "max": None, "with_duplicates": None}
    result = {
        "run": "https://runs.example.org/scan-1",
        "index": "s3://bucket/index",
        "index_build_id": "b1",
        "embedder": "sscd",
        "generations": 50,
        "generations_matched": 50,
        "train_sample": 40,
        "run_threshold": {},
        "column": column,
        "columns": {column: block},
        "duplicates": {"radius": 0.95, "matched_rule": "none", "matched": empty, "random": empty},
        "gallery_rows": 0,
        "gallery_thumbnails": 0,
        "gallery_missing": {},
        "created_at": "2024-01-01T00:00:00Z",
    }
    return result, {column: (gen, train)}


def _gallery_page(open_page, tmp_path, rows):
    """The report of ``_page()`` with gallery ``rows``, loaded in Chromium (no console errors)."""
    result, distributions = _page()
    path = tmp_path / "report.html"
    path.write_text(html.render(dict(result, gallery_rows=len(rows)), distributions, rows), encoding="utf-8")
    loaded = open_page(str(path))
    assert loaded.console_errors == []
    return loaded.page


def test_gallery_and_overview_link_only_http_urls_in_chromium(open_page, tmp_path):
    urls = [
        "https://example.org/a.jpg?x=1&y=<b>",
        "javascript:alert(1)",
        " https://leading.blank/",
        "s3://bucket/k.jpg",
        "HTTP://UPPER.example/b.jpg",
    ]
    rows = [
        {
            "query_id": f"gen-{i}",
            "rank": 0,
            "train_key": f"k{i}",
            "train_url": url,
            "caption": f"caption {i}",
            "score": 0.9 - i / 100,
            "score_norm": None,
            "score_raw": None,
            "is_copy": True,
            "query_thumb": None,
            "train_thumb": None,
        }
        for i, url in enumerate(urls)
    ]
    page = _gallery_page(open_page, tmp_path, rows)
    links = page.locator("#gallery-body a").evaluate_all(
        "e => e.map(a => [a.getAttribute('href'), a.textContent, a.rel, a.target])"
    )
    assert links == [[u, u, "noopener noreferrer", "_blank"] for u in (urls[0], urls[4])]
    captions = page.locator("#gallery-body td.caption").all_text_contents()
    assert captions == [f"caption {i}{url}" for i, url in enumerate(urls)]  # the others stay text
    overview = page.locator("table.kv a").evaluate_all("e => e.map(a => [a.getAttribute('href'), a.rel])")
    assert overview == [["https://runs.example.org/scan-1", "noopener noreferrer"]]  # s3:// index: text
    assert page.locator("svg.hist title").count() > 1  # the histogram's bins have hover values


def test_gallery_filters_by_source_metadata_in_chromium(open_page, tmp_path):
    """The gallery's source-metadata filters: a pwatermark / punsafe / clip_similarity range keeps only rows
    whose source had the value; license contains is a case-insensitive substring."""
    provenance = [  # (license, pwatermark, punsafe, clip_similarity, sha256)
        ("CC-BY-4.0", 0.95, 0.01, 0.31, "a" * 64),
        ("?", 0.10, 0.80, 0.28, "b" * 64),
        (None, None, None, None, None),  # an index built without the source's columns
        ("cc-by-nc", 0.60, 0.02, 0.35, "c" * 64),
    ]
    rows = [
        {
            "query_id": f"gen-{i}",
            "rank": 0,
            "train_key": f"k{i}",
            "train_url": None,
            "caption": f"caption {i}",
            "score": 0.9 - i / 100,
            "score_norm": None,
            "score_raw": None,
            "is_copy": True,
            "license": lic,
            "pwatermark": wm,
            "punsafe": unsafe,
            "clip_similarity": sim,
            "sha256": digest,
            "query_thumb": None,
            "train_thumb": None,
        }
        for i, (lic, wm, unsafe, sim, digest) in enumerate(provenance)
    ]
    page = _gallery_page(open_page, tmp_path, rows)

    def shown() -> list[str]:
        return page.locator("#gallery-body tr td:nth-child(8)").all_text_contents()

    assert shown() == ["gen-0", "gen-1", "gen-2", "gen-3"]
    cells = page.locator("#gallery-body td.provenance").all_text_contents()
    assert (
        cells[0]
        == f"license CC-BY-4.0; pwatermark 0.950; punsafe 0.010; clip_similarity 0.310; sha256 {'a' * 64}"
    )
    assert cells[2] == ""
    page.fill("#f-prov-min", "0.5")  # watermarked: pwatermark >= 0.5
    assert shown() == ["gen-0", "gen-3"]
    page.fill("#f-license", "CC-BY")  # and a CC-BY licence, any case
    assert shown() == ["gen-0", "gen-3"]
    page.fill("#f-license", "nc")
    assert shown() == ["gen-3"]
    page.fill("#f-license", "")
    page.fill("#f-prov-min", "")
    page.select_option("#f-prov", "punsafe")
    page.fill("#f-prov-max", "0.05")  # safe images only
    assert shown() == ["gen-0", "gen-3"]
    page.fill("#f-prov-max", "")
    assert shown() == ["gen-0", "gen-1", "gen-2", "gen-3"]


HOSTILE = [
    "</script><script>window.__pwned = 1</script>",
    '<img src=x onerror="window.__pwned = 2">',
    '"><svg onload="window.__pwned = 3">',
    '<a href="javascript:window.__pwned = 4">click</a>',
    '<iframe src="https://evil.example/"></iframe><script src="https://evil.example/x.js"></script>',
]


def test_hostile_captions_prompts_keys_and_urls_stay_text_in_chromium(open_page, tmp_path):
    """Captions, prompts, keys and URLs that try to inject markup, scripts, event handlers or
    ``javascript:`` links are shown as the text they are; nothing runs, nothing loads; the page's policy
    allows its own script only."""
    rows = [
        {
            "query_id": f"{bad}-q{i}",
            "rank": 0,
            "train_key": f"{bad}-k{i}",
            "train_url": ("javascript:window.__pwned=5", f"https://x.example/{bad}")[i % 2],
            "caption": bad,
            "score": 0.9 - i / 100,
            "score_norm": None,
            "score_raw": None,
            "is_copy": True,
            "query_thumb": None,
            "train_thumb": None,
        }
        for i, bad in enumerate(HOSTILE)
    ]
    prompts = [
        {
            "rank": i + 1,
            "prompt": bad,
            "clique_size": 2,
            "clique_exact": True,
            "n_generations": 4,
            "mean_distance": 0.1,
            "max_distance": 0.2,
            "graph_size": 64,
            "edge_threshold": 0.15,
            "members": [{"source": None, "key": bad, "mean_distance": 0.1}],
        }
        for i, bad in enumerate(HOSTILE)
    ]
    result, distributions = _page()
    result = dict(result, gallery_rows=len(rows), run=HOSTILE[0], index=HOSTILE[1])
    section = html.memorized_section("javascript:window.__pwned=6", prompts, {}, per_prompt=4)
    page_html = html.render(result, distributions, rows, extra_sections=[section])
    assert page_html.count("<script") == 3  # the page's script and its two JSON blocks
    path = tmp_path / "report.html"
    path.write_text(page_html, encoding="utf-8")
    dialogs: list[str] = []
    loaded = open_page(str(path))
    page = loaded.page
    page.on("dialog", lambda d: dialogs.append(d.message))
    page.locator("#gallery-body tr").first.wait_for()
    assert loaded.console_errors == []  # its own script ran under its policy: no violation reported
    assert page.evaluate("window.__pwned") is None and dialogs == []
    assert page.evaluate("document.scripts.length") == 3
    assert page.evaluate("document.querySelectorAll('iframe, embed, object').length") == 0
    handlers = (
        "[...document.querySelectorAll('*')].filter(e => [...e.attributes].some(a => /^on/i.test(a.name)))"
    )
    assert page.evaluate(f"{handlers}.length") == 0
    hrefs = page.evaluate("[...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'))")
    assert hrefs and all(h.startswith(("https://", "#")) for h in hrefs), hrefs
    assert page.evaluate("performance.getEntriesByType('resource').length") == 0  # nothing loaded
    captions = page.locator("#gallery-body td.caption").all_text_contents()
    assert len(captions) == len(HOSTILE)
    assert {bad for bad in HOSTILE if any(c.startswith(bad) for c in captions)} == set(HOSTILE)
    headings = page.locator("div.clique h3").all_text_contents()
    assert headings == [f"#{i + 1}: {bad}" for i, bad in enumerate(HOSTILE)]
    assert page.title() == f"copyscan report: {HOSTILE[0]}"
