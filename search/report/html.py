"""Render the report as one self-contained HTML file: no external script, style, font or image (its
Content-Security-Policy forbids them, and any script but its own).

Plots are inline SVG (``copyscan.search.report.plots``); the gallery is a JSON array in the page, rendered 100
rows at a time by a small script (sort, filter by column and threshold, pages), so a report with 10,000
matches opens as fast as one with ten. Every string from the data (captions, keys, URLs) reaches the page as
JSON or escaped text and is inserted with ``textContent``: a caption cannot inject markup. A URL becomes a
link only when it is http(s) (``LINK_PATTERN``, the same test here and in the script), opened in a new tab
with ``rel="noopener noreferrer"``; any other scheme (``javascript:``, ``data:``, ``s3://``) stays text.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from copyscan.search.report.plots import histogram_svg, trend_svg

PAGE_SIZE = 100
# http:// or https:// and a host character: the only URLs that become links. Anchored at the first
# character, so no leading blank or control character can hide another scheme from the browser.
LINK_PATTERN = r"^https?://[^\s/?#]"
_LINK = re.compile(LINK_PATTERN, re.IGNORECASE)


def csp(script: str) -> str:
    """The page's Content-Security-Policy: nothing loads from anywhere (no script, style, font, image or
    request leaves the file) but its own inline style, ``data:`` images, and the one inline ``script``, by
    its hash: a script or event handler that got into the page some other way would not run."""
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    return (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
        "base-uri 'none'; form-action 'none'"
    )


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def link(url: Any) -> str:
    """``url`` as an ``<a>`` (new tab, ``rel="noopener noreferrer"``) when it matches ``LINK_PATTERN``,
    else as escaped text; None and "" give ""."""
    if url is None:
        return ""
    text = str(url)
    if not _LINK.match(text):
        return _e(text)
    return f'<a href="{_e(text)}" target="_blank" rel="noopener noreferrer">{_e(text)}</a>'


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _json_for_script(obj: Any) -> str:
    """JSON safe inside <script>: NaN → null, and no "<" at all (escaped ``\\u003c``, the same string to
    JSON.parse): neither a "</script" that would close the element nor a "<!--" that would keep it open."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return clean(v.item())
        return v

    text = json.dumps(clean(obj), ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def memorized_section(
    url: str,
    prompts: Sequence[dict[str, Any]],
    thumbs: dict[tuple[str | None, str], dict[str, str | None]],
    per_prompt: int,
) -> str:
    """Flagged prompts of ``copyscan memorized``
    (``copyscan.search.memorized.discover.memorized_for_report``), each with its clique's images; ``thumbs``:
    (source, key) → {"src", "reason"}."""
    if not prompts:
        return f"<h2>Memorised prompts</h2><p>No prompt of {link(url)} has a clique large enough to flag.</p>"
    first = prompts[0]
    blocks = []
    for p in prompts:
        cells = []
        for m in p["members"][:per_prompt]:
            t = thumbs.get((m["source"], m["key"])) or {}
            inner = (
                f'<img src="{_e(t["src"])}" alt="{_e(m["key"])}">'
                if t.get("src")
                else f'<span class="missing">{_e(t.get("reason") or "not shown")}</span>'
            )
            cells.append(
                f'<figure class="member"><div class="thumb">{inner}</div><figcaption>{_e(m["key"])}<br>'
                f"{_num(m['mean_distance'], 3)}</figcaption></figure>"
            )
        exact = "" if p["clique_exact"] else " (search budget reached: a lower bound)"
        blocks.append(
            f'<div class="clique"><h3>#{p["rank"]}: {_e(p["prompt"])}</h3><p>clique of {p["clique_size"]}'
            f"{exact} among {p['n_generations']} generations; mean tiled ℓ2 {_num(p['mean_distance'], 4)}, "
            f"max {_num(p['max_distance'], 4)}</p>{''.join(cells)}</div>"
        )
    return (
        f"<h2>Memorised prompts</h2><p>{len(prompts)} prompt(s) of {link(url)} whose generations contain a "
        f"clique of near-identical images (tiled ℓ2 at {_e(first['graph_size'])} px below "
        f"{_e(first['edge_threshold'])}; Carlini et al.), closest first.</p>{''.join(blocks)}"
    )


def scores_section(url: str, prompts: Sequence[dict[str, Any]]) -> str:
    """The prompts of ``copyscan generate`` with the highest memorisation scores
    (``copyscan.search.generate.scores.top_prompts``), next to their clique and best training match."""
    if not prompts:
        return f"<h2>Memorisation scores</h2><p>{link(url)} holds no per-prompt score.</p>"
    rows = []
    for p in prompts:
        m = p["best_match"] or {}
        match = f"{_e(m['train_key'])} ({_num(m['score'])}): {_e(m['caption'])}" if m else "none"
        clique = "" if p["clique_size"] is None else f"{p['clique_size']}{' flagged' if p['flagged'] else ''}"
        rows.append(
            f"<tr><td>{_e(p['prompt'])}</td><td>{_num(p['score'])}</td><td>{_num(p['score_max'])}</td>"
            f"<td>{_e(clique)}</td><td>{match}</td></tr>"
        )
    return (
        f"<h2>Memorisation scores</h2><p>Prompts of {link(url)} by mean ‖ε(x_t, c) − ε(x_t, ∅)‖ over their "
        "generations (Wen et al.), highest first.</p><table><tr><th>prompt</th><th>score</th><th>max</th>"
        f"<th>clique</th><th>best training match</th></tr>{''.join(rows)}</table>"
    )


def _stats_table(per_column: dict[str, Any]) -> str:
    head = (
        "<tr><th>column</th><th>distribution</th><th>n</th><th>mean</th><th>std</th><th>p75</th>"
        "<th>p90</th><th>p95</th><th>fraction ≥ threshold [95% Wilson CI]</th></tr>"
    )
    body = []
    for column, block in per_column.items():
        for name in ("gen_train", "train_train"):
            d = block[name]
            above = "; ".join(
                f"≥{a['threshold']:.3g}: {a['fraction']:.2%} [{a['ci95'][0]:.2%}, {a['ci95'][1]:.2%}]"
                for a in d.get("above", {}).values()
            )
            body.append(
                f"<tr><td>{_e(column)}</td><td>{_e(name.replace('_', '→'))}</td><td>{d['n']}</td>"
                f"<td>{_num(d['mean'])}</td><td>{_num(d['std'])}</td><td>{_num(d['p75'])}</td>"
                f"<td>{_num(d['p90'])}</td><td>{_num(d['p95'])}</td><td>{_e(above)}</td></tr>"
            )
    return f'<table class="stats">{head}{"".join(body)}</table>'


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th.sortable{cursor:pointer;background:#f3f3f3}th.sortable:hover{background:#e6e6e6}
.kv td:first-child{color:#666}.card{display:inline-block;margin:0 18px 8px 0}.big{font-size:22px;font-weight:600}
.thumb{position:relative;display:inline-block;min-width:64px;min-height:32px;background:#f3f3f3}
.thumb img{display:block;max-width:128px;max-height:128px}.box{position:absolute;border:2px solid #e67e22}
.missing{color:#999;font-size:12px}.copy{color:#c0392b;font-weight:600}.controls>*{margin-right:12px}
.member{display:inline-block;margin:0 6px 6px 0;font-size:11px;color:#555;text-align:center}
.caption{max-width:320px;font-size:12px;color:#444;word-break:break-word}
.provenance{max-width:220px;font-size:11px;color:#555;word-break:break-all}
.hist rect.bin:hover{fill-opacity:.12}
"""

SCRIPT = r"""
(function(){
  const ROWS = JSON.parse(document.getElementById('gallery-data').textContent);
  const THUMBS = JSON.parse(document.getElementById('thumb-data').textContent);
  const PAGE = %(page)d;
  const LINK = new RegExp(%(link)s, 'i');
  let state = {column: %(column)s, min: -Infinity, onlyCopies: false, sortKey: %(column)s, desc: true, page: 0,
               prov: 'pwatermark', provMin: -Infinity, provMax: Infinity, license: ''};
  const body = document.getElementById('gallery-body');
  const counter = document.getElementById('gallery-count');
  function fmt(v){ return (v === null || v === undefined) ? '–' : Number(v).toFixed(4); }
  function thumb(src, box, alt){
    const cell = document.createElement('div'); cell.className = 'thumb';
    if (src) {
      const img = document.createElement('img'); img.src = src; img.alt = alt;
      cell.appendChild(img);
      if (box && box.length === 4) {
        const b = document.createElement('div'); b.className = 'box';
        b.style.left = (100*box[0])+'%%'; b.style.top = (100*box[1])+'%%';
        b.style.width = (100*(box[2]-box[0]))+'%%'; b.style.height = (100*(box[3]-box[1]))+'%%';
        cell.appendChild(b);
      }
    } else {
      const s = document.createElement('span'); s.className = 'missing';
      s.textContent = 'no thumbnail'; cell.appendChild(s);
    }
    return cell;
  }
  function link(url){
    if (!LINK.test(url)) { const s = document.createElement('span'); s.textContent = url; return s; }
    const a = document.createElement('a'); a.href = url; a.textContent = url;
    a.target = '_blank'; a.rel = 'noopener noreferrer'; return a;
  }
  function td(row, content){
    const c = document.createElement('td');
    if (content instanceof Node) c.appendChild(content); else c.textContent = content;
    row.appendChild(c); return c;
  }
  function filtered(){
    const col = state.column;
    // a provenance bound or a license filter keeps only the rows whose source metadata has the value
    const p = state.prov, bounded = state.provMin > -Infinity || state.provMax < Infinity;
    const lic = state.license.toLowerCase();
    const out = ROWS.filter(r => (r[col] !== null && r[col] >= state.min) && (!state.onlyCopies || r.is_copy)
      && (!bounded || (r[p] !== null && r[p] !== undefined && r[p] >= state.provMin && r[p] <= state.provMax))
      && (!lic || String(r.license || '').toLowerCase().includes(lic)));
    const k = state.sortKey, sign = state.desc ? -1 : 1;
    out.sort((a, b) => {
      const x = a[k], y = b[k];
      if (x === y) return 0; if (x === null) return 1; if (y === null) return -1;
      return (x < y ? -1 : 1) * sign;
    });
    return out;
  }
  function render(){
    const rows = filtered();
    const pages = Math.max(1, Math.ceil(rows.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    body.textContent = '';
    const frag = document.createDocumentFragment();
    for (const r of rows.slice(state.page * PAGE, (state.page + 1) * PAGE)) {
      const tr = document.createElement('tr'); tr.className = 'gallery-row';
      td(tr, thumb(THUMBS[r.query_thumb], r.query_box, 'generation ' + r.query_id));
      td(tr, thumb(THUMBS[r.train_thumb], r.train_box, 'training image ' + r.train_key));
      const s = td(tr, fmt(r[state.column])); if (r.is_copy) s.className = 'copy';
      td(tr, fmt(r.score)); td(tr, fmt(r.score_norm)); td(tr, fmt(r.score_raw));
      td(tr, r.is_copy === null ? '–' : (r.is_copy ? 'yes' : 'no'));
      td(tr, r.query_id); td(tr, r.train_key);
      const cap = td(tr, r.caption || ''); cap.className = 'caption';
      if (r.train_url) { const u = document.createElement('div'); u.appendChild(link(String(r.train_url))); cap.appendChild(u); }
      const prov = [['license', r.license], ['pwatermark', r.pwatermark], ['punsafe', r.punsafe],
                    ['clip_similarity', r.clip_similarity], ['sha256', r.sha256]]
        .filter(([, v]) => v !== null && v !== undefined)
        .map(([k, v]) => k + ' ' + (typeof v === 'number' ? v.toFixed(3) : String(v)));
      td(tr, prov.join('; ')).className = 'provenance';
      frag.appendChild(tr);
    }
    body.appendChild(frag);
    counter.textContent = rows.length + ' of ' + ROWS.length + ' matches; page ' + (state.page + 1) + ' of ' + pages;
  }
  document.getElementById('f-column').addEventListener('change', e => {
    state.column = e.target.value; state.sortKey = e.target.value; state.page = 0; render(); });
  document.getElementById('f-min').addEventListener('input', e => {
    const v = parseFloat(e.target.value); state.min = isNaN(v) ? -Infinity : v; state.page = 0; render(); });
  function bound(id, key, none){
    document.getElementById(id).addEventListener('input', e => {
      const v = parseFloat(e.target.value); state[key] = isNaN(v) ? none : v; state.page = 0; render(); });
  }
  bound('f-prov-min', 'provMin', -Infinity); bound('f-prov-max', 'provMax', Infinity);
  document.getElementById('f-prov').addEventListener('change', e => { state.prov = e.target.value; state.page = 0; render(); });
  document.getElementById('f-license').addEventListener('input', e => {
    state.license = e.target.value.trim(); state.page = 0; render(); });
  document.getElementById('f-copies').addEventListener('change', e => {
    state.onlyCopies = e.target.checked; state.page = 0; render(); });
  document.getElementById('f-prev').addEventListener('click', () => { state.page = Math.max(0, state.page - 1); render(); });
  document.getElementById('f-next').addEventListener('click', () => { state.page += 1; render(); });
  for (const th of document.querySelectorAll('th.sortable')) {
    th.addEventListener('click', () => {
      const key = th.dataset.key === 'current' ? state.column : th.dataset.key;
      if (state.sortKey === key) state.desc = !state.desc; else { state.sortKey = key; state.desc = true; }
      render();
    });
  }
  render();
  document.body.dataset.ready = '1';
})();
"""


def _shared_thumbnails(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each distinct thumbnail once (a training image matched by many generations is inlined once):
    rows get an index into the returned list instead of the data URL (None stays None)."""
    thumbs: list[str] = []
    position: dict[str, int] = {}
    out = []
    for row in rows:
        row = dict(row)
        for name in ("query_thumb", "train_thumb"):
            src = row.get(name)
            if src is not None:
                if src not in position:
                    position[src] = len(thumbs)
                    thumbs.append(src)
                row[name] = position[src]
        out.append(row)
    return out, thumbs


def render(
    result: dict[str, Any],
    distributions: dict[str, tuple[np.ndarray, np.ndarray]],
    rows: list[dict[str, Any]],
    history: Sequence[dict[str, Any]] = (),
    extra_sections: Sequence[str] = (),
) -> str:
    """The report page. ``result``: stats.json content; ``distributions``: column → (gen, train) values;
    ``rows``: gallery rows (matches columns + ``query_thumb``/``train_thumb`` data URLs or None)."""
    column = result["column"]
    script = SCRIPT % {"page": PAGE_SIZE, "column": json.dumps(column), "link": json.dumps(LINK_PATTERN)}
    parts = [
        f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>copyscan report: {_e(result["run"])}</title>
<meta http-equiv="Content-Security-Policy" content="{csp(script)}">
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body>
<h1>copyscan report</h1>""",
        _overview(result),
        _summary(result["columns"][column], column),
        f"<h2>Distributions</h2>\n{_stats_table(result['columns'])}",
        "".join(
            f"<h3>{_e(c)}</h3>{histogram_svg(g, t, f'density of {c}', x_label=c)}"
            for c, (g, t) in distributions.items()
        ),
        _duplicates(result["duplicates"]),
        _trend(history),
        "".join(extra_sections),
        _gallery(result, rows),
        f"""<script>{script}</script>
</body></html>
""",
    ]
    return "\n".join(parts)


def _overview(result: dict[str, Any]) -> str:
    """The table of what was reported: run, index, generations, the run's threshold, sample, date."""
    threshold = result.get("run_threshold") or {}
    threshold_text = (
        f"{threshold['column']} ≥ {threshold['value']:.4f} ({threshold.get('name')})"
        if "column" in threshold
        else "none (no is_copy flag)"
    )
    return f"""<table class="kv">
<tr><td>run</td><td>{link(result["run"])}</td></tr>
<tr><td>index</td><td>{link(result["index"])} (build {_e(result.get("index_build_id"))}, {_e(result["embedder"])})</td></tr>
<tr><td>generations</td><td>{result["generations"]} ({result["generations_matched"]} with a match)</td></tr>
<tr><td>is_copy threshold of the run</td><td>{_e(threshold_text)}</td></tr>
<tr><td>train→train sample</td><td>{result["train_sample"]} training images</td></tr>
<tr><td>created</td><td>{_e(result["created_at"])}</td></tr>
</table>"""


def _summary(block: dict[str, Any], column: str) -> str:
    """The lead column's fractions above each threshold as cards, and the mean shift."""
    cards = []
    for name, label in (("gen_train", "generations (top-1)"), ("train_train", "training sample (2nd-NN)")):
        d = block[name]
        for a in d.get("above", {}).values():
            cards.append(
                f'<div class="card"><div>{_e(label)}: {_e(column)} ≥ {a["threshold"]:.3g}</div>'
                f'<div class="big">{a["fraction"]:.2%}</div><div>95% Wilson CI [{a["ci95"][0]:.2%}, '
                f"{a['ci95'][1]:.2%}] · {a['count']} of {d['n']}</div></div>"
            )
    shift = block["shift"]
    return f"""<h2>Summary ({_e(column)})</h2>
{"".join(cards)}
<p>Mean shift gen→train − train→train: {_num(shift["mean_difference"], 4)}
(95% CI [{_num(shift["ci95"][0], 4)}, {_num(shift["ci95"][1], 4)}]). A rightward shift of the generations'
top-1 similarity against training images' nearest other training image signals copying (Somepalli et al.).</p>"""


def _duplicates(dup: dict[str, Any]) -> str:
    """Near-duplicate counts of the matched and of random training images."""

    def row(name: str) -> str:
        d = dup[name]
        return (
            f"<tr><td>{_e(name)}</td><td>{d['images']}</td><td>{_num(d['mean'], 2)}</td>"
            f"<td>{_num(d['median'], 1)}</td><td>{d['max'] if d['max'] is not None else '–'}</td>"
            f"<td>{_num(d['with_duplicates'], 3)}</td></tr>"
        )

    return f"""<h2>Duplicates</h2>
<p>Near-duplicates in the index of each training image (score ≥ {dup["radius"]}); matched = {_e(dup["matched_rule"])}.</p>
<table><tr><th>images</th><th>n</th><th>mean duplicates</th><th>median</th><th>max</th>
<th>share with ≥ 1</th></tr>{row("matched")}{row("random")}</table>"""


def _trend(history: Sequence[dict[str, Any]]) -> str:
    """The replication rate across checkpoints (plot and table); "" without a history."""
    if not history:
        return ""
    rows = "".join(
        f"<tr><td>{_e(r['checkpoint'])}</td><td>{_e(r['finished_at'])}</td><td>{r['queries']}</td>"
        f"<td>{r['flagged']}</td><td>{r['rate']:.2%} [{r['rate_low']:.2%}, {r['rate_high']:.2%}]</td></tr>"
        for r in history
    )
    return (
        f"<h2>Trend across checkpoints</h2>{trend_svg(history)}<table><tr><th>checkpoint</th>"
        f"<th>finished</th><th>generations</th><th>flagged</th><th>rate [95% CI]</th></tr>{rows}</table>"
    )


def _gallery(result: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The gallery's controls, its empty table and its data (rows and thumbnails as JSON); ``SCRIPT``
    fills the table."""
    column = result["column"]
    options = "".join(
        f'<option value="{c}"{" selected" if c == column else ""}>{c}</option>' for c in result["columns"]
    )
    rows, thumbs = _shared_thumbnails(rows)
    missing = ", ".join(f"{k}: {v}" for k, v in sorted(result.get("gallery_missing", {}).items())) or "none"
    return f"""<h2>Gallery</h2>
<p>{result["gallery_rows"]} best matches; thumbnails inlined for the first {result["gallery_thumbnails"]};
images not shown: {_e(missing)}.</p>
<div class="controls">
<label>column <select id="f-column">{options}</select></label>
<label>minimum <input id="f-min" type="number" step="0.01" placeholder="any"></label>
<label><input id="f-copies" type="checkbox"> is_copy only</label>
<label>source <select id="f-prov"><option>pwatermark</option><option>punsafe</option>
<option>clip_similarity</option></select> from <input id="f-prov-min" type="number" step="0.01" placeholder="any">
to <input id="f-prov-max" type="number" step="0.01" placeholder="any"></label>
<label>license contains <input id="f-license" type="text" placeholder="any"></label>
<button id="f-prev">previous</button><button id="f-next">next</button>
<span id="gallery-count"></span>
</div>
<table id="gallery"><thead><tr><th>generation</th><th>training image</th>
<th class="sortable" data-key="current">selected column</th><th class="sortable" data-key="score">score</th>
<th class="sortable" data-key="score_norm">score_norm</th><th class="sortable" data-key="score_raw">score_raw</th>
<th>is_copy</th><th class="sortable" data-key="query_id">query_id</th><th>train_key</th><th>caption / URL</th>
<th>source metadata</th></tr>
</thead><tbody id="gallery-body"></tbody></table>
<script type="application/json" id="gallery-data">{_json_for_script(rows)}</script>
<script type="application/json" id="thumb-data">{_json_for_script(thumbs)}</script>"""
