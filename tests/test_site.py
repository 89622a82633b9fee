"""The static site (effedu.site) and the syllabus (effedu.syllabus): every chapter has a page, every link resolves,
nothing loads from the network, math and explorer figures are there; the syllabus is complete and its plans cover
the course. The site is built once per module into a temporary folder (about 25–40 s for 22 notebooks on 2 busy cores)."""
from __future__ import annotations

import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import nbformat
import pytest

from effedu import site, syllabus

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NB_PATHS = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


class _Collector(HTMLParser):
    """Every tag with its attributes, every id, and the text of <style> blocks."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.ids, self.styles, self._in_style = [], set(), [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        for key in ("id", "name"):
            if attrs.get(key):
                self.ids.add(attrs[key])
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def _parse(path):
    c = _Collector()
    c.feed(path.read_text(encoding="utf-8"))
    return c


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    pages = site.build_site(out, NOTEBOOKS)
    parsed = {name: _parse(path) for name, path in pages.items()}
    return out, pages, parsed


def test_every_notebook_has_a_page_and_index_syllabus_exist(built):
    out, pages, _ = built
    assert NB_PATHS, "no notebooks found"
    for nb in NB_PATHS:
        assert (out / f"{nb.stem}.html").is_file(), nb.stem
        assert f"{nb.stem}.html" in pages
    for name in ("index.html", "syllabus.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 1000
    index = (out / "index.html").read_text(encoding="utf-8")
    assert site.COURSE_TITLE in index
    assert "decision guide" in index.lower()


def test_every_relative_link_and_anchor_resolves(built):
    out, pages, parsed = built
    checked = 0
    for name, c in parsed.items():
        for tag, attrs in c.tags:
            if tag != "a" or "href" not in attrs:
                continue
            href = attrs["href"]
            if href.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = href.partition("#")
            target = (out / unquote(path)) if path else out / name
            assert target.is_file(), f"{name}: link {href!r} points to a missing file"
            assert target.resolve().is_relative_to(out.resolve()), f"{name}: {href!r} leaves the site"
            if anchor:
                ids = parsed[target.name].ids if target.name in parsed else _parse(target).ids
                assert anchor in ids or unquote(anchor) in ids, f"{name}: anchor {href!r} does not exist"
            checked += 1
    assert checked > 100


def test_each_chapter_page_has_the_nav_bar(built):
    out, _, parsed = built
    stems = [p.stem for p in NB_PATHS]
    for i, stem in enumerate(stems):
        hrefs = [a.get("href") for t, a in parsed[f"{stem}.html"].tags if t == "a"]
        assert "index.html" in hrefs
        if i > 0:
            assert f"{stems[i - 1]}.html" in hrefs
        if i + 1 < len(stems):
            assert f"{stems[i + 1]}.html" in hrefs


_REMOTE = re.compile(r"^\s*(?:https?:)?//", re.IGNORECASE)
_CSS_URL = re.compile(r"url\(\s*['\"]?([^'\")]+)", re.IGNORECASE)


def test_nothing_loads_from_the_network(built):
    out, pages, parsed = built
    css_files = [out / site.CSS]
    for name, c in parsed.items():
        for tag, attrs in c.tags:
            for key in ("src", "data-src", "srcset"):
                if attrs.get(key):
                    assert not _REMOTE.match(attrs[key]), f"{name}: <{tag} {key}={attrs[key]!r}> is remote"
            if tag == "link" and attrs.get("href"):
                assert not _REMOTE.match(attrs["href"]), f"{name}: <link href={attrs['href']!r}> is remote"
                if attrs["href"].endswith(".css"):
                    css_files.append(out / attrs["href"])
        for style in c.styles:
            for url in _CSS_URL.findall(style):
                assert not _REMOTE.match(url), f"{name}: CSS url({url}) is remote"
            assert "@import" not in style or not re.search(r"@import\s+(url\()?['\"]?https?:", style)
        text = pages[name].read_text(encoding="utf-8")
        # no script imports a module from a CDN (mermaid), no require.js, no widget manager
        assert not re.search(r"import\(\s*['\"]https?:", text), name
        assert "require.js" not in text and "require.min.js" not in text, name
        assert "@jupyter-widgets/html-manager" not in text, name
    for css in css_files:
        for url in _CSS_URL.findall(css.read_text(encoding="utf-8")):
            assert not _REMOTE.match(url), f"{css.name}: url({url}) is remote"


def test_math_is_there_with_the_local_mathjax(built):
    out, pages, parsed = built
    text = pages["01_transformer.html"].read_text(encoding="utf-8")
    assert "$n^2$" in text or "$n" in text  # inline math delimiters survive for MathJax
    srcs = [a["src"] for t, a in parsed["01_transformer.html"].tags if t == "script" and a.get("src")]
    mathjax = [s for s in srcs if "MathJax.js" in s]
    assert mathjax, srcs
    assert (out / mathjax[0].split("?")[0]).is_file()
    config = re.search(r"config=([^,&]+)", mathjax[0]).group(1)
    assert (out / site.MATHJAX_DIR / "config" / f"{config}.js").is_file()
    assert (out / site.MATHJAX_DIR / "jax" / "output" / "HTML-CSS" / "fonts" / "STIX-Web").is_dir()
    assert 'webFont: "STIX-Web"' in text  # the only web fonts jupyter-server-mathjax ships


def test_index_shows_the_decision_guide_or_how_to_make_it(monkeypatch):
    import effedu.capstone
    import effedu.capstone.guide

    monkeypatch.setattr(effedu.capstone, "load_results", lambda which="reference", path=None: None)
    assert "python -m effedu.capstone run" in site.guide_section()
    seen = {}

    def fake_guide(results, *, link_style="repo", chapter_results=None):
        seen["link_style"] = link_style
        return "| question | answer |\n|---|---|\n| long sequences | [15](15_sparse_attention.html) |"

    monkeypatch.setattr(effedu.capstone, "load_results", lambda which="reference", path=None: {"kind": "x"})
    monkeypatch.setattr(effedu.capstone.guide, "guide_markdown", fake_guide)
    assert "long sequences" in site.index_markdown({"15_sparse_attention"})
    assert seen["link_style"] == "site"


def _explorer_notebooks():
    return [p for p in NB_PATHS
            if any(site.WIDGET_VIEW in (o.get("data") or {})
                   for c in nbformat.read(p, as_version=4).cells for o in c.get("outputs", []))]


def test_explorer_cells_show_their_last_figure_and_no_widget_js(built):
    out, pages, _ = built
    explorers = _explorer_notebooks()
    assert explorers, "no committed notebook stores an explorer"
    for p in explorers:
        text = pages[f"{p.stem}.html"].read_text(encoding="utf-8")
        assert site.EXPLORER_CAPTION in text, p.stem
        before = text.split(site.EXPLORER_CAPTION)[0]
        assert "<img" in before[-200_000:] and "data:image/png;base64," in before, p.stem
        assert "application/vnd.jupyter.widget-state+json" not in text, p.stem
        assert "application/vnd.jupyter.widget-view+json" not in text, p.stem


def test_static_widgets_takes_the_last_figure_of_the_output_child():
    nb = nbformat.v4.new_notebook()
    view = {"output_type": "display_data", "metadata": {},
            "data": {site.WIDGET_VIEW: {"model_id": "box", "version_major": 2, "version_minor": 0},
                     "text/plain": "VBox(...)"}}
    bar = {"output_type": "display_data", "metadata": {},
           "data": {site.WIDGET_VIEW: {"model_id": "bar"}, "text/plain": "100%|####|"}}
    nb.cells.append(nbformat.v4.new_code_cell("explore()", outputs=[nbformat.from_dict(view),
                                                                     nbformat.from_dict(bar)]))
    state = {"box": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_slider", "IPY_MODEL_out"]}},
             "slider": {"model_name": "IntSliderModel", "state": {}},
             "out": {"model_name": "OutputModel", "state": {"outputs": [
                 {"output_type": "display_data", "data": {"image/png": "FIRST"}},
                 {"output_type": "display_data", "data": {"image/png": "LAST"}}]}},
             "bar": {"model_name": "FloatProgressModel", "state": {}}}
    nb.metadata["widgets"] = {site.WIDGET_STATE: {"state": state, "version_major": 2, "version_minor": 0}}
    static, n = site.static_widgets(nb)
    assert n == 1
    outs = static.cells[0].outputs
    assert outs[0]["data"]["image/png"] == "LAST"
    assert site.EXPLORER_CAPTION in outs[1]["data"]["text/html"]
    assert outs[2]["data"] == {"text/plain": "100%|####|"}  # no figure: only its text form, no caption
    assert "widgets" not in static.metadata
    assert "widgets" in nb.metadata  # the input is not changed


def test_rewrite_links():
    refs = set()
    stems = {"15_sparse_attention"}
    html = ('<a href="15_sparse_attention.ipynb#A-b">x</a><a href="../notebooks/15_sparse_attention.ipynb">y</a>'
            '<a href="21_capstone.ipynb#6.-The-decision-guide">z</a><a href="../effedu/general/checkpoint.py">w</a>'
            '<a href="https://arxiv.org/abs/2009.06732">s</a><a href="#local">l</a>')
    out = site.rewrite_links(html, stems, refs)
    assert 'href="15_sparse_attention.html#A-b"' in out
    assert 'href="15_sparse_attention.html"' in out
    assert 'href="syllabus.html#ch21"' in out  # a chapter not built (yet): its syllabus entry
    assert f'href="repository.html#{site.repo_anchor("effedu/general/checkpoint.py")}"' in out
    assert 'href="https://arxiv.org/abs/2009.06732"' in out and 'href="#local"' in out
    assert refs == {"effedu/general/checkpoint.py"}


def test_build_site_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="notebooks_dir"):
        site.build_site(tmp_path / "out", tmp_path / "missing")
    with pytest.raises(ValueError, match="notebooks_dir|notebook"):
        site.build_site(tmp_path / "out", tmp_path)
    with pytest.raises(TypeError, match="out"):
        site.build_site(3, NOTEBOOKS)


# ---------------------------------------------------------------------------------------------------------------
# Syllabus
# ---------------------------------------------------------------------------------------------------------------

def _committed_notebooks():
    """Stems of the notebooks git tracks (a chapter being written is not committed yet); all, without git."""
    try:
        files = subprocess.run(["git", "ls-files", "notebooks"], cwd=ROOT, capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return {p.stem for p in NB_PATHS}
    return {Path(f).stem for f in files if re.match(r"^notebooks/\d\d_[^/]+\.ipynb$", f)}


def test_syllabus_lists_every_chapter_completely():
    numbers = [c["number"] for c in syllabus.CHAPTERS]
    assert numbers == list(range(22))
    committed = _committed_notebooks()
    for ch in syllabus.CHAPTERS:
        assert ch["stem"].startswith(f"{ch['number']:02d}_")
        assert ch["title"] and ch["survey"]
        assert 2 <= len(ch["objectives"]) <= 4, ch["stem"]
        assert all(o.split()[0] in {"measure", "implement", "explain", "compute", "count", "compare", "read",
                                    "list", "train", "run", "show", "combine"} for o in ch["objectives"]), ch
        assert all(p in numbers and p < ch["number"] for p in ch["prerequisites"]), ch["stem"]
        if ch["stem"] in committed:
            assert ch["runtime_s"] is not None and 0 < ch["runtime_s"] < 3600, ch["stem"]
    assert committed
    for stem in {p.stem for p in NB_PATHS}:  # every notebook is in the syllabus
        assert stem in {c["stem"] for c in syllabus.CHAPTERS}, stem


def test_syllabus_page_shows_each_chapter(built):
    out, pages, _ = built
    text = pages["syllabus.html"].read_text(encoding="utf-8")
    for ch in syllabus.CHAPTERS:
        assert f'id="ch{ch["number"]:02d}"' in text
        assert ch["objectives"][0].split()[1] in text
    assert "12-week" in text and "2-day" in text


def test_plans_cover_the_course():
    numbers = [c["number"] for c in syllabus.CHAPTERS]
    weeks = [w["week"] for w in syllabus.PLAN_12_WEEKS]
    assert weeks == list(range(1, 13))
    in_weeks = [n for w in syllabus.PLAN_12_WEEKS for n in w["chapters"]]
    assert sorted(in_weeks) == numbers  # every chapter exactly once, in order
    assert in_weeks == sorted(in_weeks)
    assert all(w["lab"] for w in syllabus.PLAN_12_WEEKS)
    in_days = {n for b in syllabus.PLAN_2_DAYS for n in b["chapters"]}
    assert in_days == set(numbers)
    assert {(b["day"], b["block"]) for b in syllabus.PLAN_2_DAYS} == {
        (1, "morning"), (1, "afternoon"), (2, "morning"), (2, "afternoon")}


def test_notebook_runtime(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("1"), nbformat.v4.new_code_cell("2")]
    nb.cells[1].metadata["execution"] = {"iopub.status.busy": "2026-12-07T10:00:00.000000Z",
                                         "iopub.status.idle": "2026-12-07T10:00:05.000000Z"}
    nb.cells[2].metadata["execution"] = {"iopub.status.busy": "2026-12-07T10:00:05.500000Z",
                                         "iopub.status.idle": "2026-12-07T10:00:12.250000Z"}
    path = tmp_path / "00_x.ipynb"
    nbformat.write(nb, path)
    assert syllabus.notebook_runtime(path) == pytest.approx(12.25)
    assert syllabus.notebook_runtime(tmp_path / "missing.ipynb") is None
    nb.cells[1].metadata.pop("execution")
    nb.cells[2].metadata.pop("execution")
    nbformat.write(nb, path)
    assert syllabus.notebook_runtime(path) is None
    assert syllabus.format_runtime(None) == "—"
    assert syllabus.format_runtime(75.2) == "1 min 15 s"
    with pytest.raises(TypeError, match="path"):
        syllabus.notebook_runtime(3)
    with pytest.raises(ValueError, match="link_style"):
        syllabus.syllabus_markdown(link_style="pdf")
