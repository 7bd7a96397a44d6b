"""fxclip.explain and `python -m fxclip inspect`: the report shows what the pass really did."""
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

import fxclip
from fxclip import cli
from fxclip.inspect_report import JSON_SCHEMA, Explanation, explain
from fxclip.passes import rule_counters

REPO = Path(__file__).resolve().parents[1]
SENTINEL = 1234.5678  # a parameter value that must never show up in any output


class Mix(nn.Module):
    """h @ tanh(W): a parameter no ghost rule covers (the fallback rule)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d)

    def forward(self, h):
        return h + torch.tanh(h @ torch.tanh(self.weight))


class Net(nn.Module):
    """linear (ghost), unreduce (biases, LayerNorm), fallback (Mix), a layer used twice, a frozen weight."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.shared = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.norm.weight.requires_grad_(False)
        self.mix = Mix(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.norm(self.enc(x))
        h = self.shared(torch.tanh(self.shared(h)))
        return self.head(self.mix(h))


def make_net():
    torch.manual_seed(0)
    net = Net().double()
    with torch.no_grad():
        net.head.bias.fill_(SENTINEL)
    return net


def inputs(batch=5):
    return (torch.randn(batch, 6, dtype=torch.float64),)


@pytest.fixture(scope="module")
def net_and_rep():
    net = make_net()
    return net, explain(net, *inputs(), max_grad_norm=0.5)


def _pm_report(model, x, **kw):
    pm = fxclip.privatize(model, **kw)
    pm(*x).sum().backward()
    return pm, pm.last_report


def test_every_parameter_with_the_rule_the_pass_used(net_and_rep):
    net, rep = net_and_rep
    assert isinstance(rep, Explanation)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert [r["name"] for r in rep.to_json()["parameters"]] == trainable
    assert rep.to_json()["frozen"] == ["norm.weight"]

    # same source of truth: the RewriteReport of a privatized run of the same model and shapes
    _, truth = _pm_report(make_net(), inputs(), max_grad_norm=0.5)
    by_name = {r.name: r for r in truth.params}
    for row in rep.to_json()["parameters"]:
        t = by_name[row["name"]]
        assert (row["rule"], row["strategy"], row["module"], row["ops"], row["uses"]) == \
            (t.rule, t.strategy, t.module, t.ops, t.uses), row["name"]
        assert (row["extra_flops"], row["extra_bytes"]) == (t.extra_flops, t.extra_bytes)
        assert row["shapes"] == {k: str(v) for k, v in t.shapes.items()}
        assert row["fallback"] == (t.rule == "fallback")
    # the rules this model exercises really fired (no silent fallback)
    rules = {r["name"]: r["rule"] for r in rep.to_json()["parameters"]}
    assert rules["enc.0.weight"] == "linear" and rules["shared.weight"] == "linear"
    assert rules["enc.0.bias"] == "unreduce" and rules["norm.bias"] == "unreduce"
    assert rules["mix.weight"] == "fallback"
    assert rep.report.route("shared.weight").uses == 2
    assert rep.fallback_params == [n for n, r in rules.items() if r == "fallback"]


def test_rule_counters_match_the_rows():
    before = Counter(rule_counters)
    rep = explain(make_net(), *inputs(3))
    fired = Counter(rule_counters) - before
    expected = Counter()
    for r in rep.report.params:
        expected[r.rule] += r.uses
    assert fired == expected


def test_text_table(net_and_rep):
    net, rep = net_and_rep
    text = str(rep)
    lines = text.splitlines()
    for row in rep.to_json()["parameters"]:
        line = next(ln for ln in lines if ln.startswith(row["name"] + " "))
        assert row["rule"] in line and row["strategy"] in line
    frozen = next(ln for ln in lines if ln.startswith("norm.weight "))
    assert "frozen" in frozen
    assert "summary:" in text and "R = min(1, C/(n+1e-6)) computed once in the backward" in text
    assert "backward keeps alive" in text
    assert "batch size 5" in text


def test_user_state_is_untouched():
    net = make_net()
    net.enc[0].weight.grad = torch.full_like(net.enc[0].weight, 3.0)
    grad_obj = net.enc[0].weight.grad
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x = inputs()
    rng = torch.get_rng_state()
    explain(net, *x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert net.enc[0].weight.grad is grad_obj and torch.all(grad_obj == 3.0)
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]), n
        if n != "enc.0.weight":
            assert p.grad is None, n


def test_accepts_a_privatized_module_and_leaves_it_alone():
    net = make_net()
    pm, report = _pm_report(net, inputs(), max_grad_norm=0.25, loss_reduction="sum")
    norms = pm.per_sample_norms.clone()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    rep = explain(pm, *inputs(7))
    assert pm.last_report is report
    assert torch.equal(pm.per_sample_norms, norms)
    for n, p in net.named_parameters():
        if n in grads:
            assert torch.equal(p.grad, grads[n]), n
    j = rep.to_json()
    assert j["model"]["max_grad_norm"] == 0.25 and j["model"]["loss_reduction"] == "sum"
    assert j["model"]["batch_size"] == "7"
    assert {r["name"]: r["rule"] for r in j["parameters"]} == {r.name: r.rule for r in report.params}


def test_json_validates_against_the_schema(net_and_rep):
    _, rep = net_and_rep
    doc = json.loads(json.dumps(rep.to_json()))
    jsonschema.Draft202012Validator.check_schema(JSON_SCHEMA)
    jsonschema.validate(doc, JSON_SCHEMA, cls=jsonschema.Draft202012Validator)
    nodes = doc["graph"]["nodes"]
    ids = {n["id"] for n in nodes}
    assert len(ids) == len(nodes) == len(list(rep.report.graph.nodes))
    assert all(e["source"] in ids and e["target"] in ids for e in doc["graph"]["edges"])
    added = {n["id"]: (n["param"], n["role"]) for n in nodes if n["added"]}
    assert added == {k: (v["param"], v["role"]) for k, v in rep.report.added.items()}
    # every routed parameter has norm and reweight nodes; R is one of the clip nodes
    for r in rep.report.params:
        assert {"norm", "reweight"} <= {role for p, role in added.values() if p == r.name}, r.name
    assert added[doc["summary"]["r"]["node"]][1] == "clip"
    params = {n["param"] for n in nodes if n["role"] == "param"}
    assert params == {r.name for r in rep.report.params}
    # a broken document is refused
    bad = json.loads(json.dumps(doc))
    bad["parameters"][0]["strategy"] = "maybe"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, JSON_SCHEMA)


def test_no_tensor_values_in_any_output(net_and_rep):
    _, rep = net_and_rep
    for text in (str(rep), json.dumps(rep.to_json()), rep.to_dot(), rep.to_html()):
        assert "1234.5" not in text and "tensor(" not in text


def test_dot_highlights_added_nodes_by_parameter(net_and_rep):
    _, rep = net_and_rep
    dot = rep.to_dot()
    assert dot.startswith("digraph fxclip {") and dot.rstrip().endswith("}")
    clusters = dot.count("subgraph cluster_")
    assert clusters == len({v["param"] for v in rep.report.added.values()})
    for r in rep.report.params:
        assert f'label="{r.name}: {r.rule}, {r.strategy}"' in dot
    for name in rep.report.added:
        assert f'"{name}" [label=' in dot
    assert dot.count('fillcolor="#ffd591"') == len(rep.report.added)


# --------------------------------------------------------------------------- CLI

FACTORIES = textwrap.dedent("""
    import torch
    from torch import nn

    def mlp():
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def bilinear():
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.bl = nn.Bilinear(6, 6, 3)
            def forward(self, x):
                return self.bl(x, x.tanh())
        return M()

    def tokens():
        return nn.Sequential(nn.Embedding(30, 4), nn.Flatten(), nn.Linear(20, 2))

    def not_a_model():
        return 3
""")


@pytest.fixture(scope="module")
def factory_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("factories")
    (d / "explain_factories.py").write_text(FACTORIES)
    return d


def run_cli(factory_dir, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "fxclip", "inspect", *args], cwd=factory_dir, env=env,
                          capture_output=True, text=True, timeout=240)


def test_cli_json_on_a_factory_in_a_temp_module(factory_dir):
    out = factory_dir / "mlp.json"
    res = run_cli(factory_dir, "explain_factories:mlp", "--input-shape", "4,6", "--format", "json",
                  "-o", str(out), "--fail-on-fallback")
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, JSON_SCHEMA)
    assert [p["name"] for p in doc["parameters"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert not any(p["fallback"] for p in doc["parameters"])
    assert doc["model"]["inputs"] == ["(4, 6) float32"]


def test_cli_fail_on_fallback_exit_codes(factory_dir, monkeypatch, capsys):
    res = run_cli(factory_dir, "explain_factories:bilinear", "--input-shape", "3,6", "--fail-on-fallback")
    assert res.returncode == 1, res.stderr
    assert "bl.weight" in res.stderr and "fallback" in res.stderr
    row = next(ln for ln in res.stdout.splitlines() if ln.startswith("bl.weight"))
    assert "fallback" in row and "instantiate" in row
    # without the flag the same model passes
    monkeypatch.syspath_prepend(str(factory_dir))
    assert cli.main(["inspect", "explain_factories:bilinear", "--input-shape", "3,6", "--format", "dot"]) == 0
    assert capsys.readouterr().out.startswith("digraph")


def test_cli_int64_token_inputs_follow_the_report(factory_dir, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(factory_dir))
    rc = cli.main(["inspect", "explain_factories:tokens", "--input-shape", "4,5", "--input-dtype", "int64",
                   "--vocab-size", "30", "--format", "json", "--fail-on-fallback"])
    doc = json.loads(capsys.readouterr().out)
    jsonschema.validate(doc, JSON_SCHEMA)
    assert doc["model"]["inputs"] == ["(4, 5) int64"]
    assert doc["parameters"][0]["name"] == "0.weight"
    # exit code 1 exactly when some row uses the fallback rule
    assert rc == (1 if any(p["fallback"] for p in doc["parameters"]) else 0)


def test_cli_errors_exit_2(factory_dir, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(factory_dir))
    assert cli.main(["inspect", "explain_factories:not_a_model", "--input-shape", "2,6"]) == 2
    assert "not an nn.Module" in capsys.readouterr().err
    assert cli.main(["inspect", "no_such_module_xyz:f", "--input-shape", "2,6"]) == 2
    assert cli.main(["inspect", "explain_factories", "--input-shape", "2,6"]) == 2  # no :FACTORY
    for argv in (["inspect", "explain_factories:mlp"], ["inspect", "explain_factories:mlp", "--input-shape", "2,x"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2


def test_cli_in_process_forced_fallback(monkeypatch, factory_dir, capsys):
    """With every rule but the fallback removed, --fail-on-fallback must fail on a plain MLP."""
    from fxclip.passes.stages import routing

    monkeypatch.setattr(routing, "RULES", tuple(r for r in routing.RULES if r[0] == "fallback"))
    monkeypatch.syspath_prepend(str(factory_dir))
    assert cli.main(["inspect", "explain_factories:mlp", "--input-shape", "3,6", "--fail-on-fallback"]) == 1
    out = capsys.readouterr()
    assert all(f"{n} " in out.out for n in ("0.weight", "0.bias", "2.weight", "2.bias"))
    assert "4 parameter(s) use the fallback rule" in out.err


def test_docs_show_the_schema_in_force():
    import re

    doc = (REPO / "docs" / "inspect.md").read_text()
    block = re.search(r"## JSON schema.*?```json\n(.*?)```", doc, re.S).group(1)
    assert json.loads(block) == json.loads(json.dumps(JSON_SCHEMA))
