"""Start-up fix for real SGLang on a machine without CUDA; on the server's PYTHONPATH only.

SGLang 0.5.23 imports ``torchvision`` at start-up (multimodal configs) even for a text model. The
registry's torchvision is a CUDA build: its C++ extension does not load without the CUDA runtime,
so ``torchvision::nms``/``qnms`` are never defined, and ``torchvision/_meta_registrations.py``
then fails registering fake kernels for them. Defining the two schemas (no kernels: nothing here
calls them) just before that module loads lets the import finish. Nothing else changes; a
torchvision whose extension loads defines them itself and this does nothing.
"""

import importlib.abc
import sys

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries = []  # a torch Library undoes its definitions when garbage-collected


def _define_missing_torchvision_ops() -> None:
    import torch

    library = None
    for schema in _TORCHVISION_SCHEMAS:
        name = schema.split("(", 1)[0]
        if torch._C._dispatch_has_kernel(f"torchvision::{name}") or _has_schema(torch, name):
            continue
        library = library or torch.library.Library("torchvision", "FRAGMENT")
        library.define(schema)
    if library is not None:
        _libraries.append(library)


def _has_schema(torch, name: str) -> bool:
    try:
        torch._C._get_schema(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


class _BeforeTorchvisionMeta(importlib.abc.MetaPathFinder):
    """Runs the fix when ``torchvision._meta_registrations`` is first imported, then steps aside."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision._meta_registrations":
            sys.meta_path.remove(self)
            _define_missing_torchvision_ops()
        return None


sys.meta_path.insert(0, _BeforeTorchvisionMeta())
