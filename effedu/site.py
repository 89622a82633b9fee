"""The course as a static website, for instructors and learners who do not install anything.

    python -m effedu.site build [--out site] [--notebooks notebooks]      # also `make site`

One page per chapter (``NN_stem.html``, the committed, executed notebook rendered by nbconvert's HTML exporter with
the "lab" template — nothing is executed), an ``index.html`` (the course title, the chapters, the syllabus summary
and the decision guide computed from the committed capstone results), ``syllabus.html`` (objectives, survey
section, prerequisites and run time per chapter; a 12-week and a 2-day plan: :mod:`effedu.syllabus`),
``repository.html`` (the repository files the notebooks link to: they are not part of the site) and one small
shared stylesheet.

**Offline, by construction.** Every page works from ``file://`` with no network:

- math: MathJax 2 from the PyPI package ``jupyter-server-mathjax`` is copied into ``_static/mathjax/`` and every
  page points to that copy (``HTMLExporter.mathjax_url``), never a CDN;
- the lab template's remote includes are removed: require.js and mermaid.js (their blocks are overridden empty
  in a two-line template that extends ``lab/index.html.j2``), and the widget manager (only emitted when the
  notebook stores widget state — which we drop);
- widgets: each ipywidgets view (an explorer) is replaced by the last figure its Output widget held when the
  notebook was executed (walked from the view's ``model_id`` through the stored widget state), with the caption
  "explorer: run the notebook to move the sliders"; no widget JavaScript is needed;
- images are embedded (base64) and the lab CSS is inlined.

``tests/test_site.py`` checks it: no ``http(s)://`` in any ``<script src>``, ``<link href>``, ``<img src>`` or CSS
``url()``; every relative link resolves to a file of the site and every ``#anchor`` exists; ``tests/e2e/
test_site.py`` opens the pages in Chromium with every non-``file://`` request aborted.
"""
from __future__ import annotations

import argparse
import copy
import html as html_lib
import re
import shutil
import sys
import time
from pathlib import Path

from effedu import syllabus

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
STATIC = "_static"
MATHJAX_DIR = f"{STATIC}/mathjax"
MATHJAX_URL = f"{MATHJAX_DIR}/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"
CSS = f"{STATIC}/effedu-site.css"
COURSE_TITLE = "Faster and Lighter Transformers — the effedu course"
EXPLORER_CAPTION = "explorer: run the notebook to move the sliders"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_CHAPTER_RE = re.compile(r"^(\d\d)_[A-Za-z0-9_]+$")

# MathJax 2 as jupyter-server-mathjax ships it (the classic notebook's set-up): TeX input, HTML-CSS output with the
# STIX-Web fonts -- the only web fonts in that package (the TeX fonts' fontdata.js is not there)
MATHJAX_CONFIG = """<script type="text/x-mathjax-config">
MathJax.Hub.Config({
  tex2jax: { inlineMath: [ ['$','$'], ['\\\\(','\\\\)'] ], displayMath: [ ['$$','$$'], ['\\\\[','\\\\]'] ],
             processEscapes: true, processEnvironments: true },
  TeX: { equationNumbers: { autoNumber: "AMS", useLabelIds: true } },
  "HTML-CSS": { availableFonts: [], imageFont: null, preferredFont: null, webFont: "STIX-Web",
                linebreaks: { automatic: true } },
  "fast-preview": { disabled: true }, displayAlign: "center", messageStyle: "none"
});
</script>"""

# the lab template, less its two remote scripts (require.js, mermaid from a CDN); images get their text form as alt
_TEMPLATE_NAME = "effedu_site.html.j2"
_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_js_mathjax -%}
{% raw %}""" + MATHJAX_CONFIG + """{% endraw %}
<script src="{{ resources.mathjax_url }}"></script>
{%- endblock html_head_js_mathjax -%}
{%- block data_png scoped -%}
<div class="jp-RenderedImage jp-OutputArea-output {{ extra_class }}">
<img alt="{{ output.data.get('text/plain', 'figure') | string | escape_html }}" src="data:image/png;base64,{{ output.data['image/png'] | escape_html }}">
</div>
{%- endblock data_png -%}
"""

SITE_CSS = """/* effedu static site: the nav bar and the index/syllabus pages (chapter pages use nbconvert's lab CSS) */
.effedu-nav { display: flex; flex-wrap: wrap; gap: 0.4em 1.2em; align-items: baseline; padding: 0.6em 1em;
  margin: 0 0 1em 0; background: #f3f5f8; border-bottom: 1px solid #d0d7de; font-family: system-ui, sans-serif;
  font-size: 14px; }
.effedu-nav a { color: #0b5cad; text-decoration: none; }
.effedu-nav a:hover { text-decoration: underline; }
.effedu-nav .effedu-home { font-weight: 600; }
.effedu-nav .effedu-here { color: #57606a; }
.effedu-explorer-caption { font-style: italic; color: #57606a; margin: 0.2em 0 0.8em 0; font-size: 13px; }
body.effedu-page { font-family: system-ui, sans-serif; line-height: 1.5; margin: 0; color: #1f2328; }
.effedu-content { max-width: 960px; margin: 0 auto; padding: 0 1.2em 3em 1.2em; }
.effedu-content table { border-collapse: collapse; margin: 0.8em 0; }
.effedu-content th, .effedu-content td { border: 1px solid #d0d7de; padding: 0.3em 0.6em; vertical-align: top; }
.effedu-content th { background: #f6f8fa; }
.effedu-content code { background: #f6f8fa; padding: 0.1em 0.3em; border-radius: 3px; }
.effedu-content a.anchor-link { display: none; }
"""


# ---------------------------------------------------------------------------------------------------------------
# Widgets → their last static figure
# ---------------------------------------------------------------------------------------------------------------

def _model_id(ref):
    return ref[len("IPY_MODEL_"):] if isinstance(ref, str) and ref.startswith("IPY_MODEL_") else ref


def _last_figure(state, model_id, seen=None):
    """The last image/png held by an Output widget under ``model_id`` (depth first, children in order)."""
    seen = set() if seen is None else seen
    if model_id in seen or model_id not in state:
        return None
    seen.add(model_id)
    model = state[model_id]
    inner = model.get("state", {})
    found = None
    for out in inner.get("outputs", []) or []:
        png = (out.get("data") or {}).get("image/png")
        if png:
            found = png
    children = inner.get("children", []) or []
    for child in children if isinstance(children, list) else []:
        png = _last_figure(state, _model_id(child), seen)
        if png:
            found = png
    return found


def static_widgets(nb):
    """A copy of notebook ``nb`` (an nbformat node) whose widget views are replaced by their last figure plus the
    caption :data:`EXPLORER_CAPTION` (a view without a figure, e.g. a progress bar, keeps only its text form), and
    without stored widget state. Returns ``(nb, n_explorers)``."""
    nb = copy.deepcopy(nb)
    state = (nb.metadata.get("widgets", {}) or {}).get(WIDGET_STATE, {}).get("state", {}) or {}
    n = 0
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        outputs = []
        for out in cell.get("outputs", []):
            data = out.get("data") or {}
            if WIDGET_VIEW not in data:
                outputs.append(out)
                continue
            png = _last_figure(state, data[WIDGET_VIEW].get("model_id"))
            if png:
                n += 1
                outputs.append({"output_type": "display_data", "metadata": {},
                                "data": {"image/png": png, "text/plain": "explorer: its last figure"}})
                outputs.append({"output_type": "display_data", "metadata": {},
                                "data": {"text/html": f'<p class="effedu-explorer-caption">{EXPLORER_CAPTION}</p>',
                                         "text/plain": EXPLORER_CAPTION}})
            elif data.get("text/plain"):
                outputs.append({"output_type": "display_data", "metadata": {},
                                "data": {"text/plain": data["text/plain"]}})
        cell["outputs"] = [_as_node(o) for o in outputs]
    nb.metadata.pop("widgets", None)
    return nb, n


def _as_node(out):
    import nbformat
    return nbformat.from_dict(out)


# ---------------------------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------------------------

_HREF_RE = re.compile(r'(<a\b[^>]*?\bhref=")([^"]*)(")', re.IGNORECASE)
_NB_LINK_RE = re.compile(r"^(?:\./)?(?:\.\./)*(?:notebooks/)?((\d\d)_[A-Za-z0-9_]+)\.(?:ipynb|html)$")


def repo_anchor(path):
    """The id of a repository file's entry on ``repository.html``."""
    return "repo-" + re.sub(r"[^A-Za-z0-9]+", "-", path).strip("-")


def _rewrite_href(href, stems, repo_refs):
    raw = html_lib.unescape(href)
    if raw.startswith(("http://", "https://", "mailto:", "#", "data:")) or not raw:
        return href
    path, _, anchor = raw.partition("#")
    if path in {"index.html", "syllabus.html", "repository.html"}:
        return href
    m = _NB_LINK_RE.match(path)
    if m:
        stem, number = m.group(1), m.group(2)
        if stem in stems:
            return f"{stem}.html" + (f"#{anchor}" if anchor else "")
        return f"syllabus.html#ch{number}"  # that chapter's notebook is not there (yet)
    rel = re.sub(r"^(?:\./)?(?:\.\./)+", "", path).lstrip("/")
    repo_refs.add(rel)
    return f"repository.html#{repo_anchor(rel)}"


def rewrite_links(html, stems, repo_refs):
    """Links to notebooks → their pages (anchors kept); to other repository files → ``repository.html``."""
    return _HREF_RE.sub(lambda m: m.group(1) + html_lib.escape(_rewrite_href(m.group(2), stems, repo_refs),
                                                               quote=True) + m.group(3), html)


# ---------------------------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------------------------

def _nav(stems, here=None):
    items = ['<a class="effedu-home" href="index.html">effedu course</a>', '<a href="syllabus.html">syllabus</a>']
    if here is not None:
        i = stems.index(here)
        if i > 0:
            items.append(f'<a class="effedu-prev" href="{stems[i - 1]}.html">← {stems[i - 1]}</a>')
        items.append(f'<span class="effedu-here">{here}</span>')
        if i + 1 < len(stems):
            items.append(f'<a class="effedu-next" href="{stems[i + 1]}.html">{stems[i + 1]} →</a>')
    return '<nav class="effedu-nav">' + "\n".join(items) + "</nav>"


def _exporter():
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    return HTMLExporter(
        template_name="lab", template_file=_TEMPLATE_NAME, extra_loaders=[DictLoader({_TEMPLATE_NAME: _TEMPLATE})],
        embed_images=True, mathjax_url=MATHJAX_URL, require_js_url="", jupyter_widgets_base_url="",
        widget_renderer_url="", html_manager_semver_range="", mermaid_js_url="", mermaid_layout_elk_js_url="")


def _markdown_html(text):
    from nbconvert.filters.markdown_mistune import markdown2html_mistune
    return markdown2html_mistune(text)


def _page(title, body_html, stems):
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8" />
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{html_lib.escape(title)}</title>
<link rel="stylesheet" href="{CSS}">
{MATHJAX_CONFIG}
<script src="{MATHJAX_URL}"></script>
</head>
<body class="effedu-page">
{_nav(stems)}
<div class="effedu-content">
{body_html}
</div>
</body>
</html>
"""


def guide_section():
    """The decision guide (markdown) from the committed reference results, or a line saying how to make it."""
    how = "Decision guide: run `python -m effedu.capstone run` (the capstone's measurements are not there yet)."
    try:
        from effedu.capstone import load_results
        from effedu.capstone.guide import guide_markdown
    except ImportError:
        return how
    try:
        results = load_results("reference")
        if results is None:
            return how
        text = guide_markdown(results, link_style="site")
    except Exception as exc:  # the site still builds; the index says what went wrong
        print(f"effedu.site: the decision guide could not be computed: {exc!r}", file=sys.stderr)
        return f"{how}\n\n(The decision guide could not be computed from the committed results: `{exc!r}`.)"
    return text if text else how


def index_markdown(stems):
    lines = [f"# {COURSE_TITLE}", "",
             "A hands-on course on *A Practical Survey on Faster and Lighter Transformers* (Fournier, Marceau Caron, "
             "Aloise, ACM Computing Surveys 2023): every technique written from scratch in the `effedu` package "
             "and **measured** — memory, time, quality — on the machine that executed the notebooks. These pages "
             "are the executed notebooks: the plots are the committed ones; the explorers show their last figure "
             "(run the notebook to move the sliders).", "",
             "Full syllabus, with learning objectives and a 12-week / 2-day plan: [syllabus](syllabus.html).", "",
             "## Chapters", "", "| # | chapter | survey | run time (2 cores) |", "|---|---|---|---|"]
    for ch in syllabus.CHAPTERS:
        name = (f"[{ch['title']}]({ch['stem']}.html)" if ch["stem"] in stems
                else f"{ch['title']} (not in this build)")
        lines.append(f"| {ch['number']:02d} | {name} | {ch['survey']} | {syllabus.format_runtime(ch['runtime_s'])} |")
    lines += ["", "## The decision guide", "", guide_section(), ""]
    return "\n".join(lines)


def _chapter_ids(html):
    """``syllabus.html#chNN``: an id before each chapter heading (``<h3 id="NN-…">``)."""
    return re.sub(r'(<h3 id=")(\d\d)(-)', r'<span id="ch\2"></span>\1\2\3', html)


def _repository_page(repo_refs, stems):
    lines = ["# Files in the repository", "",
             "The notebooks link to these files of the course's repository. They are not part of this website: "
             "open them in a clone of the repository (the path is relative to its root).", ""]
    html = _markdown_html("\n".join(lines))
    items = "\n".join(f'<li id="{repo_anchor(p)}"><code>{html_lib.escape(p)}</code> — in the repository</li>'
                      for p in sorted(repo_refs))
    return _page("Files in the repository", html + f"<ul>\n{items}\n</ul>", stems)


def _notebooks(notebooks_dir):
    paths = sorted(p for p in Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb") if _CHAPTER_RE.match(p.stem))
    return paths


def build_site(out="site", notebooks_dir=None, *, log=None) -> dict:
    """Render the course into ``out``: the chapter pages, ``index.html``, ``syllabus.html``, ``repository.html``,
    the stylesheet and a copy of MathJax. Returns ``{page name: Path}`` of the HTML pages written."""
    import nbformat

    if not isinstance(out, (str, Path)):
        raise TypeError(f"build_site: out must be a str or Path, got {type(out).__name__}")
    nb_dir = Path(notebooks_dir) if notebooks_dir is not None else NOTEBOOKS
    if not nb_dir.is_dir():
        raise ValueError(f"build_site: notebooks_dir {str(nb_dir)!r} is not a directory")
    paths = _notebooks(nb_dir)
    if not paths:
        raise ValueError(f"build_site: no NN_name.ipynb notebook in {str(nb_dir)!r}")
    out = Path(out)
    (out / STATIC).mkdir(parents=True, exist_ok=True)
    _copy_mathjax(out / MATHJAX_DIR)
    (out / CSS).write_text(SITE_CSS, encoding="utf-8")

    stems = [p.stem for p in paths]
    repo_refs: set[str] = set()
    written = {}
    exporter = _exporter()
    for path in paths:
        t0 = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        nb, _ = static_widgets(nb)
        nb.metadata["title"] = f"{path.stem} — effedu"
        body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": path.stem}})
        body = rewrite_links(body, set(stems), repo_refs)
        nav = _nav(stems, here=path.stem)
        body = body.replace("</head>", f'<link rel="stylesheet" href="{CSS}">\n</head>', 1)
        body = body.replace("<main>", f"<main>\n{nav}", 1).replace("</main>", f"{nav}\n</main>", 1)
        target = out / f"{path.stem}.html"
        target.write_text(body, encoding="utf-8")
        written[target.name] = target
        if log:
            log(f"{target.name}: {time.perf_counter() - t0:.1f} s")

    index = rewrite_links(_markdown_html(index_markdown(set(stems))), set(stems), repo_refs)
    written["index.html"] = out / "index.html"
    written["index.html"].write_text(_page(COURSE_TITLE, index, stems), encoding="utf-8")

    syl = _markdown_html(f"# Syllabus\n\n{syllabus.syllabus_markdown(link_style='site')}")
    syl = _chapter_ids(rewrite_links(syl, set(stems), repo_refs))
    written["syllabus.html"] = out / "syllabus.html"
    written["syllabus.html"].write_text(_page("Syllabus — effedu", syl, stems), encoding="utf-8")

    written["repository.html"] = out / "repository.html"
    written["repository.html"].write_text(_repository_page(repo_refs, stems), encoding="utf-8")
    return written


def _copy_mathjax(target):
    import jupyter_server_mathjax

    source = Path(jupyter_server_mathjax.__file__).resolve().parent / "static"
    if not (source / "MathJax.js").exists():
        raise FileNotFoundError(f"MathJax is missing from jupyter-server-mathjax ({source}); reinstall it")
    if (target / "MathJax.js").exists() and (target / "MathJax.js").stat().st_size == (source / "MathJax.js").stat().st_size:
        return
    shutil.copytree(source, target, dirs_exist_ok=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m effedu.site", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="render the executed notebooks, the syllabus and the decision guide")
    b.add_argument("--out", default="site", help="output folder (default: site)")
    b.add_argument("--notebooks", default=str(NOTEBOOKS), help="folder of NN_name.ipynb (default: notebooks)")
    b.add_argument("--quiet", action="store_true", help="no per-page timings")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    pages = build_site(args.out, args.notebooks, log=None if args.quiet else (lambda s: print(s, flush=True)))
    print(f"{len(pages)} pages in {time.perf_counter() - t0:.1f} s; open {Path(pages['index.html']).resolve()}")
    return 0


__all__ = ["build_site", "static_widgets", "rewrite_links", "guide_section", "index_markdown", "main",
           "EXPLORER_CAPTION", "MATHJAX_URL"]

if __name__ == "__main__":
    sys.exit(main())
