"""Make ``import torchvision`` (and so ``open_clip`` and transformers' model modules) work beside a CPU torch.

torchvision 0.28.0 is published only as a CUDA build. Beside the CPU build of torch 2.13.0 its compiled ops fail
to load, and its Python side then dies registering meta kernels for ``torchvision::nms`` and
``torchvision::qnms`` ("operator torchvision::nms does not exist"). Defining those two op schemas first lets the
import finish; the compiled ops (nms, roi_align, image decoding) stay unavailable, and nothing here uses them.
Call :func:`ensure_torchvision_importable` before the first import of torchvision, open_clip or transformers.
"""

from __future__ import annotations

import importlib.util

import torch

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library: torch.library.Library | None = None


def _torchvision_ops_missing() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return False
    except RuntimeError:
        return True


def ensure_torchvision_importable() -> None:
    """Idempotent; does nothing when torchvision is absent or its compiled ops load."""
    global _library
    if _library is not None or importlib.util.find_spec("torchvision") is None:
        return
    try:
        # Loading the extension registers the real ops when the build matches this torch.
        from torchvision import extension  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure here means the ops are not there
        pass
    if _torchvision_ops_missing():
        _library = torch.library.Library("torchvision", "DEF")  # noqa: TID251 - kept alive for the process
        for schema in _SCHEMAS:
            _library.define(schema)
