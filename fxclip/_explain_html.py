"""Explanation.to_html(): one self-contained page (table + SVG graph), layout computed here.

The rewritten joint graph is shown as nested groups: inputs, forward and backward (each by module
path), and the nodes fxclip added (per-parameter norms, the clip factor R, the reweighted
gradients, each by module and parameter). Every group is one precomputed SVG view holding its
direct children, groups drawn as boxes: clicking a box opens it, the breadcrumb goes back. So a
graph with thousands of nodes never puts more than one level on screen. Layout: a layered
(Sugiyama-style) layout computed with networkx — longest-path layers of the DAG (edges against the
graph order drawn as back edges), barycenter ordering within layers, wide layers wrapped.

No external resources: a Content-Security-Policy `default-src 'none'` with hashes for the one
inline style and script blocks; the page makes no requests.
"""
from __future__ import annotations

import html
import math
from collections import Counter

import networkx as nx

from ._formatting import csp_hash, fmt_bytes, fmt_count

NODE_H, GROUP_H, GAP_X, GAP_Y, MAX_ROW = 38, 46, 18, 46, 24
CHAR_W = 6.6

_PHASES = [  # (key, label, css class)
    ("inputs", "inputs & parameters", "g-input"),
    ("forward", "forward", "g-fwd"),
    ("backward", "backward", "g-bwd"),
    ("norms", "fxclip: per-sample norms", "g-added"),
    ("clip", "fxclip: clip factor R", "g-added"),
    ("reweight", "fxclip: reweighted gradients", "g-added"),
]


def _esc(s) -> str:
    return html.escape(str(s), quote=True)


class _Group:
    __slots__ = ("key", "label", "cls", "children", "nodes", "parent", "view_id", "all_nodes")

    def __init__(self, key, label, cls, parent=None):
        self.key, self.label, self.cls, self.parent = key, label, cls, parent
        self.children: dict[str, _Group] = {}
        self.nodes: list[str] = []
        self.view_id = ""
        self.all_nodes: set[str] = set()

    def child(self, seg, cls, label=None):
        if seg not in self.children:
            self.children[seg] = _Group(self.key + (seg,), label or seg, cls, self)
        return self.children[seg]


def _group_path(d) -> tuple[str, list[str]]:
    """(phase key, path segments inside it) of one graph node."""
    if d["op"] == "output":
        return "", []
    if d["op"] == "placeholder":
        if d["role"] == "tangent":
            return "", []
        return "inputs", []
    mod = [s for s in (d["module"] or "").split(".") if s]
    if d["added"]:
        role = d["role"]
        if role == "clip" or not d["param"]:
            return "clip", []
        phase = "norms" if role == "norm" else "reweight"
        return phase, mod + ["⟨" + d["param"] + "⟩"]
    return d["phase"] if d["phase"] in ("forward", "backward") else "", mod


def _build_tree(g: nx.DiGraph, root_label: str) -> _Group:
    root = _Group((), root_label, "g-root")
    phases = {}
    for key, label, cls in _PHASES:
        phases[key] = root.child(key, cls, label)
    for n, d in g.nodes(data=True):
        phase, segs = _group_path(d)
        grp = phases[phase] if phase else root
        for s in segs:
            grp = grp.child(s, grp.cls if grp is not root else "g-fwd")
        grp.nodes.append(n)
    for key in list(root.children):
        if not _count(root.children[key]):
            del root.children[key]
    _compress(root)
    _fill_all(root)
    return root


def _count(grp) -> int:
    return len(grp.nodes) + sum(_count(c) for c in grp.children.values())


def _compress(grp: _Group) -> None:
    """Merge chains of single-child groups without nodes (layers -> 0 -> attn  =>  layers.0.attn)."""
    for seg, c in list(grp.children.items()):
        while len(c.children) == 1 and not c.nodes and grp.parent is not None:
            (_, only), = c.children.items()
            only.label = c.label + "." + only.label
            only.parent = grp
            c = only
        grp.children[seg] = c
        _compress(c)


def _fill_all(grp: _Group) -> set:
    s = set(grp.nodes)
    for c in grp.children.values():
        s |= _fill_all(c)
    grp.all_nodes = s
    return s


# --------------------------------------------------------------------------- layout

def layered_layout(items: dict, order: dict, edges: Counter, force_last=()):
    """items: id -> (w, h); order: id -> sort key (graph order); edges: Counter[(u, v)].

    Returns (positions id -> (x, y) top-left, back-edge set, width, height)."""
    dag = nx.DiGraph()
    dag.add_nodes_from(items)
    back = set()
    for (u, v) in edges:
        if u == v:
            continue
        if order[u] < order[v]:
            dag.add_edge(u, v)
        else:
            back.add((u, v))
    layers = [sorted(layer, key=lambda n: order[n]) for layer in nx.topological_generations(dag)]
    if force_last:
        layers = [[n for n in layer if n not in force_last] for layer in layers]
        layers = [layer for layer in layers if layer] + [list(force_last)]
    # barycenter ordering, a few sweeps down and up
    pos_index = {}

    def reindex():
        for layer in layers:
            for i, n in enumerate(layer):
                pos_index[n] = (i + 0.5) / len(layer)

    reindex()
    for _ in range(3):
        for li in range(1, len(layers)):
            layers[li].sort(key=lambda n: _bary(dag.predecessors(n), pos_index, order[n]))
            reindex()
        for li in range(len(layers) - 2, -1, -1):
            layers[li].sort(key=lambda n: _bary(dag.successors(n), pos_index, order[n]))
            reindex()
    # wrap wide layers into rows, then coordinates
    rows = []
    for layer in layers:
        for i in range(0, len(layer), MAX_ROW):
            rows.append(layer[i:i + MAX_ROW])
    pos, y, width = {}, 0.0, 0.0
    widths = [sum(items[n][0] for n in row) + GAP_X * (len(row) - 1) for row in rows]
    width = max(widths, default=0)
    for row, w in zip(rows, widths):
        x = (width - w) / 2
        h = max(items[n][1] for n in row)
        for n in row:
            pos[n] = (x, y + (h - items[n][1]) / 2)
            x += items[n][0] + GAP_X
        y += h + GAP_Y
    return pos, back, width, max(y - GAP_Y, 0)


def _bary(neigh, pos_index, tiebreak):
    vals = [pos_index[m] for m in neigh if m in pos_index]
    return (sum(vals) / len(vals) if vals else 0.5, tiebreak)


# --------------------------------------------------------------------------- svg

def _node_size(lines) -> tuple[float, float]:
    return max(70.0, max(len(s) for s in lines) * CHAR_W + 16), float(NODE_H)


def _node_lines(n, d):
    first = d["target"] if d["op"] not in ("placeholder", "output") else n
    if d["role"] == "param":
        first = d["param"]
    second = d["shape"] or d["op"]
    return [first[:48], second[:48]]


def _node_classes(d) -> str:
    cls = ["node", "ph-" + d["phase"]]
    if d["added"]:
        cls += ["added", "role-" + (d["role"] or "x")]
    elif d["role"]:
        cls.append("role-" + d["role"])
    return " ".join(cls)


def _node_svg(n, d, x, y, w, h) -> str:
    l1, l2 = _node_lines(n, d)
    title = (f"{n}: {d['target']}\nshape {d['shape'] or '-'} {d['dtype'] or ''}\n"
             f"module {d['module'] or '(root)'}\nphase {d['phase']}")
    if d["param"]:
        title += f"\nparameter {d['param']}"
    if d["added"]:
        title += f"\nadded by fxclip ({d['role']})"
    attrs = (f'class="{_node_classes(d)}" data-node="{_esc(n)}" data-target-op="{_esc(d["target"])}" '
             f'data-shape="{_esc(d["shape"] or "")}" data-module="{_esc(d["module"])}" '
             f'data-param="{_esc(d["param"] or "")}" data-role="{_esc(d["role"] or "")}"')
    return (f'<g {attrs} transform="translate({x:.1f},{y:.1f})"><title>{_esc(title)}</title>'
            f'<rect width="{w:.1f}" height="{h:.1f}" rx="5"/>'
            f'<text x="{w / 2:.1f}" y="15" class="l1">{_esc(l1)}</text>'
            f'<text x="{w / 2:.1f}" y="30" class="l2">{_esc(l2)}</text></g>')


def _group_svg(grp, x, y, w, h, added: int) -> str:
    n = len(grp.all_nodes)
    sub = f"{n} node{'s' if n != 1 else ''}" + (f", {added} added" if added else "")
    badge = " has-added" if added else ""
    return (f'<g class="group {grp.cls}{badge}" data-open="{grp.view_id}" tabindex="0" '
            f'transform="translate({x:.1f},{y:.1f})"><title>{_esc(grp.label)}: click to open</title>'
            f'<rect class="shadow" x="4" y="4" width="{w:.1f}" height="{h:.1f}" rx="7"/>'
            f'<rect width="{w:.1f}" height="{h:.1f}" rx="7"/>'
            f'<text x="{w / 2:.1f}" y="19" class="l1">▸ {_esc(grp.label[:56])}</text>'
            f'<text x="{w / 2:.1f}" y="36" class="l2">{_esc(sub)}</text></g>')


def _edge_path(p, q, back=False) -> str:
    (x1, y1), (x2, y2) = p, q
    if back:
        dx = 60 + abs(y1 - y2) * 0.15
        return f"M{x1:.1f},{y1:.1f} C{x1 + dx:.1f},{y1:.1f} {x2 + dx:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
    my = (y1 + y2) / 2
    return f"M{x1:.1f},{y1:.1f} C{x1:.1f},{my:.1f} {x2:.1f},{my:.1f} {x2:.1f},{y2:.1f}"


def _render_view(view_id, label, parent_id, g, members: dict, extra_cls="") -> str:
    """members: item id -> ("node", name) | ("group", _Group) | ("stub", text)."""
    data = g.nodes
    owner = {}
    items, order, added_count = {}, {}, {}
    for item, (kind, obj) in members.items():
        if kind == "node":
            owner[obj] = item
            items[item] = _node_size(_node_lines(obj, data[obj]))
            order[item] = data[obj]["order"]
        elif kind == "group":
            for n in obj.all_nodes:
                owner[n] = item
            added_count[item] = sum(1 for n in obj.all_nodes if data[n]["added"])
            sub = f"{len(obj.all_nodes)} nodes, {added_count[item]} added"
            items[item] = (max(110.0, (max(len(obj.label[:56]) + 2, len(sub))) * CHAR_W + 20), float(GROUP_H))
            order[item] = min(data[n]["order"] for n in obj.all_nodes)
    edges = Counter()
    stub_in = stub_out = False
    for n, item in owner.items():
        for u in g.predecessors(n):
            src = owner.get(u)
            if src is None:
                edges[("__in", item)] += 1
                stub_in = True
            elif src != item:
                edges[(src, item)] += 1
        for v in g.successors(n):
            if v not in owner:
                edges[(item, "__out")] += 1
                stub_out = True
    for flag, sid, text, key in ((stub_in, "__in", "from outside", -1), (stub_out, "__out", "to outside", math.inf)):
        if flag:
            members[sid] = ("stub", text)
            items[sid] = (110.0, 26.0)
            order[sid] = key
    pos, back, width, height = layered_layout(items, order, edges, force_last=("__out",) if stub_out else ())
    pad = 30
    parts = []
    for (u, v), k in edges.items():
        if u == v:
            continue
        (xu, yu), (wu, hu) = pos[u], items[u]
        (xv, yv), (wv, hv) = pos[v], items[v]
        is_back = (u, v) in back
        if is_back:
            path = _edge_path((xu + wu, yu + hu / 2), (xv + wv, yv + hv / 2), back=True)
        else:
            path = _edge_path((xu + wu / 2, yu + hu), (xv + wv / 2, yv))
        cls = "edge" + (" back" if is_back else "")
        tgt = members.get(v, ("", None))
        if tgt[0] == "node" and data[tgt[1]]["added"]:
            cls += " to-added"
        sw = 1.0 + math.log2(k) * 0.6
        parts.append(f'<path class="{cls}" d="{path}" stroke-width="{sw:.2f}" marker-end="url(#arrow)">'
                     f"<title>{k} edge{'s' if k != 1 else ''}</title></path>")
    for item, (kind, obj) in members.items():
        x, y = pos[item]
        w, h = items[item]
        if kind == "node":
            parts.append(_node_svg(obj, data[obj], x, y, w, h))
        elif kind == "group":
            parts.append(_group_svg(obj, x, y, w, h, added_count[item]))
        else:
            parts.append(f'<g class="stub" transform="translate({x:.1f},{y:.1f})"><rect width="{w:.1f}" '
                         f'height="{h:.1f}" rx="13"/><text x="{w / 2:.1f}" y="17" class="l2">{_esc(obj)}</text></g>')
    vb = f"{-pad} {-pad} {width + 2 * pad + 80:.0f} {height + 2 * pad:.0f}"
    return (f'<svg class="view{extra_cls}" id="{view_id}" data-label="{_esc(label)}" data-parent="{parent_id}" '
            f'data-vb="{vb}" viewBox="{vb}" preserveAspectRatio="xMidYMin meet" role="img" '
            f'aria-label="{_esc(label)}"><g class="content">{"".join(parts)}</g></svg>')


def render_views(expl, flat_view_limit: int):
    g = expl.graph
    root = _build_tree(g, expl.model_class)
    groups = []

    def number(grp):
        grp.view_id = f"v{len(groups)}"
        groups.append(grp)
        for c in grp.children.values():
            number(c)

    number(root)
    svgs = []
    for grp in groups:
        members = {}
        for c in grp.children.values():
            members["g:" + c.view_id] = ("group", c)
        for n in grp.nodes:
            members["n:" + n] = ("node", n)
        parent = grp.parent.view_id if grp.parent is not None else ""
        svgs.append(_render_view(grp.view_id, grp.label, parent, g, members,
                                 extra_cls=" hier" + ("" if grp is root else " hidden")))
    flat = None
    if g.number_of_nodes() <= flat_view_limit:
        members = {"n:" + n: ("node", n) for n in g.nodes}
        flat = _render_view("vflat", "all nodes", "v0", g, members, extra_cls=" flat hidden")
        svgs.append(flat)
    # where each parameter's added nodes live: the innermost group holding its norm nodes
    param_view = {}
    for grp in groups:
        for n in grp.nodes:
            d = g.nodes[n]
            if d["added"] and d["param"] and d["role"] == "norm":
                param_view[d["param"]] = grp.view_id
    return svgs, param_view, flat is not None


CSS = """
*{box-sizing:border-box}
body{margin:0;font:13px/1.4 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1f2328;background:#fff}
header{padding:10px 16px 6px;border-bottom:1px solid #d0d7de;background:#f6f8fa}
h1{font-size:18px;margin:0 0 2px}
h2{font-size:14px;margin:8px 0 6px}
.meta{color:#57606a;margin:0}
#summary ul{margin:4px 0 4px 18px;padding:0}
#summary li{margin:1px 0}
main{display:grid;grid-template-columns:minmax(560px,54%) 1fr;height:calc(100vh - var(--head,150px))}
#params{overflow:auto;padding:0 12px 12px 16px;border-right:1px solid #d0d7de}
#graph{display:flex;flex-direction:column;min-width:0;min-height:0;padding:0 12px 8px}
table{border-collapse:collapse;width:100%;font-size:12px}
th,td{padding:3px 6px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}
th{position:sticky;top:0;background:#f6f8fa;cursor:pointer;user-select:none}
td.nw{white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.param-row{cursor:pointer}
tr.param-row:hover{background:#fff8e6}
tr.param-row.sel{background:#ffe7b8}
tr.frozen-row td,tr.unused-row td{color:#8c959f}
.pill{display:inline-block;padding:0 6px;border-radius:9px;font-size:11px;font-weight:600}
.s-ghost{background:#dafbe1;color:#116329}
.s-instantiate{background:#fff1c2;color:#7d4e00}
.s-fallback{background:#ffd8d3;color:#a40e26}
.why{margin:2px 0 0 0;padding-left:14px;font-size:11px;color:#57606a}
.s-frozen{background:#eaeef2;color:#57606a}
code{font-size:11px}
.toolbar{display:flex;gap:8px;align-items:center;flex-wrap:wrap;margin-bottom:6px}
#crumbs a{color:#0969da;cursor:pointer;text-decoration:none}
#crumbs span.sep{color:#8c959f;margin:0 4px}
button,input{font:inherit;font-size:12px}
.legend{display:flex;gap:8px;color:#57606a;font-size:11px}
.legend i{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:3px;vertical-align:-1px;border:1px solid #8c959f}
#canvas{flex:1;min-height:0;border:1px solid #d0d7de;border-radius:6px;background:#fcfcfd;position:relative;overflow:hidden}
#canvas svg{width:100%;height:100%;display:block;cursor:grab}
#canvas svg.hidden{display:none}
#details{font-size:12px;color:#57606a;min-height:18px;margin-top:4px;white-space:pre-wrap}
.node rect{fill:#fff;stroke:#8c959f;stroke-width:1}
.node.ph-forward rect{fill:#e8f1fb;stroke:#54aeff}
.node.ph-backward rect{fill:#eef7ee;stroke:#4ac26b}
.node.ph-input rect,.node.ph-output rect{fill:#f6f8fa;stroke:#8c959f}
.node.role-param rect{fill:#f3e8ff;stroke:#a475f9}
.node.added rect{fill:#ffd591;stroke:#d46b08;stroke-width:2}
.node.added.role-clip rect{fill:#ff9c6e;stroke:#ad2102}
.node.hl rect{stroke:#cf222e;stroke-width:3}
.node{cursor:pointer}
text{font:11px Menlo,Consolas,monospace;text-anchor:middle;fill:#1f2328}
text.l2{fill:#57606a;font-size:10px}
.group rect{fill:#fff;stroke:#57606a;stroke-width:1.3}
.group rect.shadow{fill:#d0d7de;stroke:none}
.group.g-fwd rect:not(.shadow){fill:#dcecfb}
.group.g-bwd rect:not(.shadow){fill:#dff3e4}
.group.g-input rect:not(.shadow){fill:#f3e8ff}
.group.g-added rect:not(.shadow){fill:#ffe2b3;stroke:#d46b08}
.group.has-added rect:not(.shadow){stroke:#d46b08;stroke-width:2}
.group{cursor:pointer}
.group:hover rect:not(.shadow){stroke:#0969da;stroke-width:2.5}
.group.hl rect:not(.shadow){stroke:#cf222e;stroke-width:3}
.stub rect{fill:#f6f8fa;stroke:#8c959f;stroke-dasharray:4 3}
.edge{fill:none;stroke:#8c959f;opacity:.75}
.edge.to-added{stroke:#d46b08}
.edge.back{stroke-dasharray:5 4;stroke:#bf8700}
#arrowhead{fill:#8c959f}
"""

JS = r"""
(function(){
  var head=document.querySelector('header');
  function sizeMain(){document.documentElement.style.setProperty('--head',head.offsetHeight+'px');}
  sizeMain(); window.addEventListener('resize',sizeMain);
  var views={}; Array.prototype.forEach.call(document.querySelectorAll('svg.view'),function(s){views[s.id]=s;});
  var current='v0', crumbs=document.getElementById('crumbs'), details=document.getElementById('details');
  function vb(s){return s.getAttribute('viewBox').split(' ').map(Number);}
  function setvb(s,b){s.setAttribute('viewBox',b.join(' '));}
  function clearHl(){Array.prototype.forEach.call(document.querySelectorAll('.hl'),function(e){e.classList.remove('hl');});}
  function show(id){
    if(!views[id])return; views[current].classList.add('hidden'); views[id].classList.remove('hidden'); current=id;
    var chain=[], v=views[id];
    while(v){chain.unshift(v); v=views[v.getAttribute('data-parent')]; if(chain.length>64)break;}
    if(id==='vflat')chain=[views.v0,views.vflat];
    crumbs.textContent='';
    chain.forEach(function(s,i){
      if(i){var sp=document.createElement('span');sp.className='sep';sp.textContent='›';crumbs.appendChild(sp);}
      var a=document.createElement('a'); a.textContent=s.getAttribute('data-label'); a.setAttribute('data-go',s.id);
      crumbs.appendChild(a);
    });
  }
  crumbs.addEventListener('click',function(e){var go=e.target.getAttribute&&e.target.getAttribute('data-go'); if(go)show(go);});
  document.getElementById('fit').addEventListener('click',function(){var s=views[current]; s.setAttribute('viewBox',s.getAttribute('data-vb'));});
  var flat=document.getElementById('flat'); if(flat)flat.addEventListener('click',function(){show(views.vflat?'vflat':'v0');});
  var drag=null, moved=false;
  Object.keys(views).forEach(function(id){
    var s=views[id];
    s.addEventListener('wheel',function(e){
      e.preventDefault(); var b=vb(s), r=s.getBoundingClientRect();
      var k=e.deltaY>0?1.15:1/1.15, px=b[0]+(e.clientX-r.left)/r.width*b[2], py=b[1]+(e.clientY-r.top)/r.height*b[3];
      setvb(s,[px-(px-b[0])*k, py-(py-b[1])*k, b[2]*k, b[3]*k]);
    },{passive:false});
    s.addEventListener('mousedown',function(e){drag={x:e.clientX,y:e.clientY,b:vb(s)}; moved=false;});
    s.addEventListener('click',function(e){
      if(moved)return; var g=e.target.closest('g.group');
      if(g){show(g.getAttribute('data-open'));return;}
      var n=e.target.closest('g.node');
      if(n){clearHl(); n.classList.add('hl');
        details.textContent=n.getAttribute('data-node')+'  '+n.getAttribute('data-target-op')+'  '+n.getAttribute('data-shape')+
          '  module '+(n.getAttribute('data-module')||'(root)')+(n.getAttribute('data-param')?'  param '+n.getAttribute('data-param'):'')+
          (n.classList.contains('added')?'  [added by fxclip: '+n.getAttribute('data-role')+']':'');}
    });
    s.addEventListener('keydown',function(e){var g=e.target.closest&&e.target.closest('g.group'); if(g&&e.key==='Enter')show(g.getAttribute('data-open'));});
  });
  window.addEventListener('mousemove',function(e){
    if(!drag)return; var s=views[current], r=s.getBoundingClientRect(), dx=e.clientX-drag.x, dy=e.clientY-drag.y;
    if(Math.abs(dx)+Math.abs(dy)>3)moved=true;
    var sc=Math.max(drag.b[2]/r.width,drag.b[3]/r.height);
    setvb(s,[drag.b[0]-dx*sc, drag.b[1]-dy*sc, drag.b[2], drag.b[3]]);
  });
  window.addEventListener('mouseup',function(){drag=null;});
  function reveal(sel,view){
    show(view); clearHl(); var hits=views[view].querySelectorAll(sel);
    Array.prototype.forEach.call(hits,function(e){e.classList.add('hl');}); return hits.length;
  }
  Array.prototype.forEach.call(document.querySelectorAll('tr.param-row'),function(tr){
    tr.addEventListener('click',function(){
      Array.prototype.forEach.call(document.querySelectorAll('tr.sel'),function(t){t.classList.remove('sel');});
      tr.classList.add('sel'); var v=tr.getAttribute('data-view'); if(!v)return;
      reveal('g.node[data-param="'+CSS.escape(tr.getAttribute('data-param'))+'"]',v);
      details.textContent=tr.getAttribute('data-param')+': added nodes highlighted';
    });
  });
  document.getElementById('search').addEventListener('keydown',function(e){
    if(e.key!=='Enter')return; var q=this.value.trim(); if(!q)return;
    var hit=document.querySelector('svg.hier g.node[data-node="'+CSS.escape(q)+'"]')||
            document.querySelector('svg.hier g.node[data-target-op*="'+CSS.escape(q)+'"]');
    if(!hit){details.textContent='no node matches '+q;return;}
    var s=hit.closest('svg'); show(s.id); clearHl(); hit.classList.add('hl'); details.textContent='found '+hit.getAttribute('data-node')+' in '+s.getAttribute('data-label');
  });
  Array.prototype.forEach.call(document.querySelectorAll('th[data-sort]'),function(th,ci){
    th.addEventListener('click',function(){
      var tb=document.querySelector('#param-table tbody'), rows=Array.prototype.slice.call(tb.querySelectorAll('tr.param-row'));
      var num=th.getAttribute('data-sort')==='num', dir=th.getAttribute('data-dir')==='1'?-1:1; th.setAttribute('data-dir',dir===1?'1':'0');
      var idx=Array.prototype.indexOf.call(th.parentNode.children,th);
      rows.sort(function(a,b){var x=a.children[idx].getAttribute('data-v')||a.children[idx].textContent, y=b.children[idx].getAttribute('data-v')||b.children[idx].textContent;
        return dir*(num?(Number(x)-Number(y)):x.localeCompare(y));});
      var rest=tb.querySelector('tr:not(.param-row)'); rows.forEach(function(r){tb.insertBefore(r,rest);});
    });
  });
  var start=decodeURIComponent(location.hash.slice(1));
  show(views[start]?start:'v0');
  if(start.indexOf('param=')===0){var tr=document.querySelector('tr.param-row[data-param="'+CSS.escape(start.slice(6))+'"]'); if(tr)tr.click();}
  document.documentElement.setAttribute('data-ready','1');
})();
"""


def _declines_html(row) -> str:
    """Under a parameter's rule: each rule that applied and declined, with its reason."""
    if not row["declines"]:
        return ""
    items = "".join(f"<li>{_esc(d['rule'])}: {_esc(d['reason'])}</li>" for d in row["declines"])
    return f'<ul class="why" title="rules tried first, and why each declined">{items}</ul>'


def render_html(expl, flat_view_limit: int = 1500) -> str:

    svgs, param_view, has_flat = render_views(expl, flat_view_limit)
    rep = expl.report
    rows = []
    for r in expl.rows():
        strat = "fallback" if r["fallback"] else r["strategy"]
        shapes = " ".join(f"{k}={v}" for k, v in r["shapes"].items())
        rows.append(
            f'<tr class="param-row{" fallback" if r["fallback"] else ""}" data-param="{_esc(r["name"])}" '
            f'data-view="{param_view.get(r["name"], "")}">'
            f'<td><code>{_esc(r["name"])}</code></td><td>{_esc(r["module"] or "(root)")}</td>'
            f'<td>{"<br>".join(_esc(o) for o in r["ops"])}</td><td>{_esc(r["rule"])}{_declines_html(r)}</td>'
            f'<td data-v="{_esc(r["strategy"])}"><span class="pill s-{strat}">{_esc(r["strategy"])}</span></td>'
            f'<td class="nw">{_esc(shapes)}</td>'
            f'<td class="num" data-v="{r["extra_flops"]}">{_esc(fmt_count(r["extra_flops"]))}</td>'
            f'<td class="num" data-v="{r["extra_bytes"]}">{_esc(fmt_bytes(r["extra_bytes"]))}</td>'
            f'<td class="num" data-v="{r["uses"]}">{r["uses"]}</td></tr>')
    for name in rep.frozen:
        rows.append(f'<tr class="frozen-row" data-param="{_esc(name)}"><td><code>{_esc(name)}</code></td><td></td>'
                    f'<td></td><td>-</td><td><span class="pill s-frozen">frozen</span></td><td></td><td></td><td></td><td></td></tr>')
    for name in rep.unused:
        rows.append(f'<tr class="unused-row" data-param="{_esc(name)}"><td><code>{_esc(name)}</code></td><td></td>'
                    f'<td></td><td>-</td><td><span class="pill s-frozen">unused</span></td><td>(no gradient)</td>'
                    f'<td></td><td></td><td></td></tr>')
    heads = [("parameter", "str"), ("module", "str"), ("op", "str"), ("rule", "str"), ("strategy", "str"),
             ("decided by", "str"), ("+FLOPs", "num"), ("+memory", "num"), ("uses", "num")]
    thead = "".join(f'<th data-sort="{k}">{_esc(h)}</th>' for h, k in heads)
    summary = "".join(f"<li>{_esc(s)}</li>" for s in expl.summary_lines())
    legend = ('<span class="legend">'
              '<span><svg width="11" height="11"><rect width="11" height="11" fill="#e8f1fb" stroke="#54aeff"/></svg> forward</span>'
              '<span><svg width="11" height="11"><rect width="11" height="11" fill="#eef7ee" stroke="#4ac26b"/></svg> backward</span>'
              '<span><svg width="11" height="11"><rect width="11" height="11" fill="#ffd591" stroke="#d46b08"/></svg> added by fxclip</span>'
              '<span><svg width="11" height="11"><rect width="11" height="11" fill="#f3e8ff" stroke="#a475f9"/></svg> parameter</span>'
              '<span>▸ group: click to open · wheel: zoom · drag: pan</span></span>')
    css, js = CSS, JS
    csp = (f"default-src 'none'; style-src {csp_hash(css)}; script-src {csp_hash(js)}; "
           "img-src 'none'; connect-src 'none'; font-src 'none'; form-action 'none'; base-uri 'none'")
    inputs = ", ".join(expl.inputs)
    title = f"fxclip explain: {expl.model_class}"
    flat_btn = '<button id="flat" type="button">all nodes</button>' if has_flat else ""
    arrow = ('<svg width="0" height="0" class="defs" aria-hidden="true"><defs><marker id="arrow" viewBox="0 0 10 10" '
             'refX="9" refY="5" markerWidth="9" markerHeight="9" orient="auto-start-reverse" markerUnits="userSpaceOnUse">'
             '<path id="arrowhead" d="M0,0 L10,5 L0,10 z"/></marker></defs></svg>')
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>{_esc(title)}</h1>
<p class="meta">batch size {_esc(rep.batch_size)} · max_grad_norm {expl.max_grad_norm} · loss_reduction {_esc(expl.loss_reduction)} · inputs {_esc(inputs)}</p>
<section id="summary"><ul>{summary}</ul></section>
</header>
<main>
<section id="params"><h2>Parameters ({len(rep.params)} routed, {len(rep.frozen)} frozen)</h2>
<table id="param-table"><thead><tr>{thead}</tr></thead><tbody>
{"".join(rows)}
</tbody></table></section>
<section id="graph"><h2>Rewritten joint graph ({expl.graph.number_of_nodes()} nodes, {expl.summary["added_nodes"]} added)</h2>
<div class="toolbar"><nav id="crumbs"></nav><input id="search" type="search" placeholder="find node (name or op), Enter">
<button id="fit" type="button">fit</button>{flat_btn}{legend}</div>
{arrow}
<div id="canvas">
{chr(10).join(svgs)}
</div>
<div id="details"></div>
</section>
</main>
<script>{js}</script>
</body>
</html>
"""
