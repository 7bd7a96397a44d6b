"""A node's module path as the user names it (model.named_modules()). A leaf module."""
from __future__ import annotations

import re

_PATH_ROOT = re.compile(r"^L\['[^']*'\]")


def clean_module_path(path: str) -> str:
    """Dynamo's module path (L['self'].module.layers[0].fc, ..._modules['x']) -> layers.0.fc."""
    path = _PATH_ROOT.sub("", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]|\[(\d+)\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    path = path.lstrip(".")
    # the PrivatizedModule wraps the user's model as `.module`
    if path == "module":
        return ""
    if path.startswith("module."):
        path = path[len("module."):]
    return path


def module_of(node) -> tuple[str, str]:
    """(module path, module class name) of the innermost module a node was traced in; ("", "")
    where unknown. Backward nodes carry their forward node's stack as fwd_nn_module_stack."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack")
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return clean_module_path(path), name.rsplit(".", 1)[-1]
