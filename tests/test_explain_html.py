"""Explanation.to_html() in a real headless browser (Debian's `chromium`).

Checks that the page draws the table and the graph, that navigation views exist for every group,
and that the page makes no request: a CSP `default-src 'none'` in the page, no URL in it, and
chromium's net log of the requests the page made (through a dead proxy, so nothing could leave
anyway) is empty; a control page shows the net log does see a page's requests.
"""
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from torch import nn

from fxclip.inspect_report import explain

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser") if shutil.which(b)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--disable-default-apps", "--no-default-browser-check", "--hide-scrollbars", "--mute-audio"]


def need_chromium():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed on CI (.ci/run must apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium)")


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return x + self.norm(torch.tanh(self.fc(x)))


class Model(nn.Module):
    def __init__(self, depth=3, d=8):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.blocks[0].norm.weight.requires_grad_(False)
        self.mix = nn.Parameter(torch.randn(d, d) / d)  # h @ tanh(mix): the fallback rule
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.blocks(self.inp(x))
        return self.head(h + torch.tanh(h @ torch.tanh(self.mix)))


@pytest.fixture(scope="module")
def rep():
    torch.manual_seed(0)
    return explain(Model(), torch.randn(4, 5))


@pytest.fixture(scope="module")
def page(rep, tmp_path_factory):
    path = tmp_path_factory.mktemp("html") / "explain.html"
    path.write_text(rep.to_html(), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- network log

@pytest.fixture
def netlog(tmp_path):
    """Where chromium's traffic goes: a dead local proxy (nothing can leave), and a net log.

    The net log attributes each URL request: those the page made carry the page's site
    (file://) in their isolation key; chromium's own background requests (updater, clock) do not.
    """
    return _NetLog(tmp_path / "netlog")


class _NetLog:
    def __init__(self, folder):
        folder.mkdir()
        self.folder, self.runs = folder, 0

    def next_file(self):
        self.runs += 1
        return self.folder / f"net-{self.runs}.json"

    def page_requests(self):
        found = []
        for f in sorted(self.folder.glob("net-*.json")):
            log = json.loads(f.read_text())
            start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
            for e in log["events"]:
                p = e.get("params") or {}
                if e["type"] != start or "url" not in p or p["url"].startswith(("file:", "data:", "chrome")):
                    continue
                if "file://" in p.get("network_isolation_key", "") + p.get("site_for_cookies", ""):
                    found.append(p["url"])
        return found

    @property
    def requests(self):
        return self.page_requests()


def chromium(url, tmp_path, netlog, *extra, window="1400,1000"):
    profile = tmp_path / f"profile-{netlog.runs}"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={window}",
           "--netlog-server=http://127.0.0.1:9", "--netlog-bypass-list=<-loopback>",
           f"--log-net-log={netlog.next_file()}", *extra, url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


class _Dom(HTMLParser):
    """Counts what the rendered DOM holds, tracking which <svg> view each element is in."""

    def __init__(self):
        super().__init__()
        self.html_attrs = {}
        self.views = {}  # id -> classes
        self.view_nodes = {}  # view id -> [data-node]
        self.view_groups = {}
        self.rows = {"param-row": 0, "frozen-row": 0, "unused-row": 0}
        self.row_params = []
        self._svg = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "html":
            self.html_attrs = a
        elif tag == "svg" and "view" in cls:
            self._svg = a["id"]
            self.views[a["id"]] = cls
            self.view_nodes[a["id"]] = []
            self.view_groups[a["id"]] = []
        elif tag == "g" and self._svg and "node" in cls:
            self.view_nodes[self._svg].append(a["data-node"])
        elif tag == "g" and self._svg and "group" in cls:
            self.view_groups[self._svg].append(a["data-open"])
        elif tag == "tr":
            for k in self.rows:
                if k in cls:
                    self.rows[k] += 1
                    if k == "param-row":
                        self.row_params.append(a["data-param"])

    def handle_endtag(self, tag):
        if tag == "svg":
            self._svg = None


def dump_dom(url, tmp_path, netlog):
    dom = _Dom()
    dom.feed(chromium(url, tmp_path, netlog, "--dump-dom").stdout)
    return dom


def screenshot_stats(png, box=None):
    from PIL import Image

    img = Image.open(png).convert("RGB")
    if box:
        w, h = img.size
        img = img.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))
    pixels = list(img.getdata())
    inked = sum(1 for p in pixels if min(p) < 200)
    return len(set(pixels)), inked / len(pixels)


# --------------------------------------------------------------------------- static checks

def test_page_is_self_contained(page):
    text = page.read_text(encoding="utf-8")
    assert text.count("<!DOCTYPE html>") == 1
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', text).group(1)
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I)
    assert not re.search(r"<(link|img|iframe|object|embed|audio|video|source)\b", text, re.I)
    assert not re.search(r"\s(src|href|srcset|action)=", text, re.I)
    assert set(re.findall(r"url\((.)", text)) <= {"#"}
    for tag, kind in (("script", "script-src"), ("style", "style-src")):
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.S)
        assert len(bodies) == 1
        digest = base64.b64encode(hashlib.sha256(bodies[0].encode()).digest()).decode()
        assert f"{kind} 'sha256-{digest}'" in csp


# --------------------------------------------------------------------------- in the browser

def test_browser_draws_table_and_graph_without_requests(rep, page, tmp_path, netlog):
    need_chromium()
    dom = dump_dom(page.as_uri(), tmp_path, netlog)
    assert dom.html_attrs.get("data-ready") == "1"  # the script ran (its CSP hash matched)
    # the table: one row per routed parameter, frozen ones listed
    assert dom.row_params == [r.name for r in rep.report.params]
    assert dom.rows["frozen-row"] == len(rep.report.frozen) == 1
    # the graph: every node of the rewritten graph drawn exactly once in the grouped views
    hier = [v for v, cls in dom.views.items() if "hier" in cls]
    drawn = [n for v in hier for n in dom.view_nodes[v]]
    assert sorted(drawn) == sorted(rep.graph.nodes)
    assert "hidden" not in dom.views["v0"] and all("hidden" in dom.views[v] for v in dom.views if v != "v0")
    # every group box opens an existing view; every view but the root is reachable
    targets = [t for v in hier for t in dom.view_groups[v]]
    assert set(targets) == set(hier) - {"v0"}
    # the flat view has all nodes too
    assert sorted(dom.view_nodes["vflat"]) == sorted(rep.graph.nodes)

    shot = tmp_path / "page.png"
    chromium(page.as_uri(), tmp_path, netlog, f"--screenshot={shot}")
    colors, inked = screenshot_stats(shot)
    assert colors > 30 and inked > 0.02, (colors, inked)
    _, graph_ink = screenshot_stats(shot, box=(0.5, 0.3, 1.0, 0.95))  # the graph panel
    assert graph_ink > 0.01, graph_ink
    # a nested view (the fallback parameter's norm nodes, opened from its table row) draws too
    nested = tmp_path / "nested.png"
    chromium(page.as_uri() + "#param=mix", tmp_path, netlog, f"--screenshot={nested}")
    _, nested_ink = screenshot_stats(nested, box=(0.5, 0.3, 1.0, 0.95))
    assert nested_ink > 0.01, nested_ink
    assert netlog.requests == [], netlog.requests


def test_proxy_sees_requests_of_a_leaky_page(tmp_path, netlog):
    """Control: the no-request check above can fail."""
    need_chromium()
    leaky = tmp_path / "leaky.html"
    leaky.write_text('<!DOCTYPE html><html><body><img src="http://fxclip-probe.test/x.png">'
                     '<img src="https://fonts.googleapis.com/x.png"></body></html>')
    chromium(leaky.as_uri(), tmp_path, netlog, "--dump-dom")
    assert sorted(netlog.requests) == ["http://fxclip-probe.test/x.png", "https://fonts.googleapis.com/x.png"]


def test_large_graph_is_navigable(tmp_path, netlog):
    """Thousands of nodes: no view draws more than a small part of the graph at once."""
    torch.manual_seed(0)
    big = explain(Model(depth=24, d=6), torch.randn(3, 5))
    n = big.graph.number_of_nodes()
    assert n > 1500
    page = tmp_path / "big.html"
    page.write_text(big.to_html(flat_view_limit=500), encoding="utf-8")
    need_chromium()
    dom = dump_dom(page.as_uri(), tmp_path, netlog)
    assert dom.html_attrs.get("data-ready") == "1"
    assert "vflat" not in dom.views  # above the limit: grouped views only
    sizes = [len(dom.view_nodes[v]) + len(dom.view_groups[v]) for v in dom.views]
    assert sorted(sum(dom.view_nodes.values(), [])) == sorted(big.graph.nodes)
    assert max(sizes) < n / 8, (max(sizes), n)
    assert len(dom.rows and dom.row_params) == len(big.report.params)
    assert netlog.requests == []
