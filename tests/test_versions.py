"""The torch versions fxclip supports (issue 23): the tested range, what happens outside it, and
a light `import fxclip` (the pass, the accountant, the audit load at first use)."""
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import per_sample_reference
from torch import nn

import fxclip
from fxclip.passes import _torch

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, check=True)


def test_the_tested_range_is_pyprojects():
    assert f'"{_torch.TESTED_RANGE}"' in (ROOT / "pyproject.toml").read_text()
    major, minor = _torch.TESTED_TORCH[-1].split(".")
    assert _torch.TESTED_RANGE == f"torch>={_torch.TESTED_TORCH[0]}.0,<{major}.{int(minor) + 1}"


@pytest.mark.parametrize("version,release",
                         [("2.15.0+cu130", "2.15"), ("2.13.0+cpu", "2.13"), ("2.16.0.dev20261101", "2.16")])
def test_release_of_a_version(version, release):
    assert _torch.torch_release(version) == release


def test_this_torch_is_tested_and_import_does_not_warn():
    assert _torch.untested_torch_note() == "", f"CI runs on torch {torch.__version__}: add it to TESTED_TORCH"
    _run("import fxclip", "-W", "error")


def test_import_on_an_untested_torch_warns_once_naming_the_range():
    code = ("import warnings, torch; torch.__version__ = '2.99.0'\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import fxclip, fxclip.passes, fxclip.privatize\n"
            "    import fxclip\n"
            "print(len(w)); print(w[0].message)")
    count, message = _run(code).stdout.strip().split("\n", 1)
    assert count == "1"
    assert "torch 2.99.0" in message and "torch>=2.13.0,<2.16" in message


def _batchnorm_model():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_refusal_on_an_untested_torch_names_the_version(monkeypatch, compiled):
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    torch._dynamo.reset()
    pm = fxclip.privatize(_batchnorm_model(), max_grad_norm=1.0)
    run = torch.compile(pm) if compiled else pm
    with pytest.raises(fxclip.PrivacyError,
                       match=r"(?s)aten::var_mean.*BatchNorm1d.*torch 2\.99\.0 is outside") as info:
        run(torch.randn(5, 3)).sum().backward()  # the mixing check still ran: nothing silently wrong
    assert type(info.value).__name__ == "PrivacyError" and isinstance(info.value, RuntimeError)


def test_the_pass_still_gives_exact_gradients_on_an_untested_torch(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    pm = fxclip.privatize(model, max_grad_norm=0.5)
    (pm(x) - y).square().sum(1).mean().backward()
    expected, _ = per_sample_reference(model, (x,), y, lambda o, t: (o - t).square().sum(), 0.5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-10, rtol=1e-7)


@pytest.mark.parametrize("version", ["2.99.0", None], ids=["untested", "tested"])
def test_an_internal_error_of_the_pass_names_an_untested_version(monkeypatch, version):
    if version:
        monkeypatch.setattr(torch, "__version__", version)
    import fxclip.passes.pipeline as pipeline

    def broken(graph):
        raise KeyError("an internal that moved")

    monkeypatch.setattr(pipeline, "rewrite_joint_graph", broken)
    pm = fxclip.privatize(nn.Linear(3, 2), max_grad_norm=1.0)
    with pytest.raises(Exception, match="an internal that moved") as info:
        pm(torch.randn(4, 3)).sum().backward()
    assert ("torch 2.99.0 is outside" in str(info.value)) == bool(version)


def test_a_privacy_error_crossing_dynamo_keeps_its_class_and_pickles():
    e = _torch.passthrough(fxclip.PrivacyError("refused"))
    assert isinstance(e, fxclip.PrivacyError) and isinstance(e, torch._dynamo.exc.ShortenTraceback)
    assert type(e).__name__ == "PrivacyError" and str(e) == "refused"
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is fxclip.PrivacyError and str(back) == "refused"


def test_import_fxclip_is_light():
    heavy = ["scipy", "dp_accounting", "transformers", "fxclip.audit", "fxclip.accounting", "fxclip.passes.pipeline",
             "torch._inductor.lowering", "torch._dynamo", "torch._inductor"]
    loaded = _run(f"import sys, fxclip; print([m for m in {heavy!r} if m in sys.modules])").stdout.strip()
    assert loaded == "[]", f"import fxclip loaded {loaded}"


def test_lazy_names_load_on_first_use():
    code = ("import sys, fxclip\n"
            "assert fxclip.make_private and fxclip.DPOptimizer and fxclip.Accountant and fxclip.explain\n"
            "assert fxclip.audit.__name__ == 'fxclip.audit' and 'dp_accounting' in sys.modules\n"
            "from fxclip import noise_multiplier_for, Explanation\n"
            "import fxclip.make_private, fxclip.inspect_report\n"
            "assert callable(fxclip.make_private) and callable(fxclip.explain)\n"
            "assert set(fxclip.__all__) <= set(dir(fxclip))")
    _run(code)


def test_layout_and_rules_imported_first_find_inductors_prims():
    # The rules name Inductor's prims at import; importing them before anything else loads those.
    code = ("import torch\nfrom fxclip.passes.layout import registered_layout_rules\nimport fxclip.passes.rules\n"
            "assert any('low_memory_max_pool' in str(op) for op in registered_layout_rules())")
    _run(code)
