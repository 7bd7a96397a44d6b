"""Wiring of the joint-graph pass into torch.compile (Inductor) and the eager path."""
from __future__ import annotations

import hashlib
import pathlib
import weakref

from .passes import _torch, rewrite_joint_graph

_owners: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


def _pass_version() -> str:
    # Any change to the pass's source changes the cache keys of graphs it rewrote.
    root = pathlib.Path(__file__).resolve().parent / "passes"
    if not root.exists():
        import fxclip.passes as p

        root = pathlib.Path(p.__file__).resolve().parent
    digest = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        digest.update(f.read_bytes())
    return "fxclip-" + digest.hexdigest()[:16]


def joint_pass(graph) -> None:
    report = rewrite_joint_graph(graph)
    if report is not None:
        owner = _owners.get(report.key)
        if owner is not None:
            owner.last_report = report


def register(owner) -> None:
    """Lets the pass hand the privatized module its report."""
    _owners[owner._key] = owner


def install() -> None:
    _torch.install_inductor_joint_pass(joint_pass, _pass_version())


def is_compiling() -> bool:
    return _torch.is_compiling()


def compile_eager(fn, owner):
    return _torch.compile_with_backend(fn, _torch.aot_eager_backend(joint_pass))
