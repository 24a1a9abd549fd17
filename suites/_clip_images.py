"""CLIP images: the saved ``datasets`` splits' images, CLIP's preprocessing, and the on-disk uint8 store.

Shared by the real ``vit`` suites and the bring-your-own image kind: :class:`SplitImages` decodes and resizes on
access, :func:`store_images` writes a split once to a memory-mapped uint8 file (:class:`StoredImages`), and
:func:`normalise_images` turns a batch of either into CLIP's normalised float input.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_VERSION = 1  # bump when the image preprocessing changes, so cached input tensors are rebuilt


def load_split(folder: Path) -> Any:
    import datasets

    return datasets.load_from_disk(str(folder))


def clip_resize_crop(image: Any, size: int) -> np.ndarray:
    """CLIP's geometry: bicubic resize of the shorter side to ``size``, centre crop, RGB; uint8 [3, size, size].

    The same steps and rounding as CLIP's (and open_clip's) torchvision pipeline on PIL images; normalisation
    happens later on the uint8 result, which loses nothing since that pipeline also resizes in 8 bits.
    """
    from PIL import Image

    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size != (width, height):
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    width, height = image.size
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    return np.array(image, dtype=np.uint8).transpose(2, 0, 1)


def normalise_images(images: Tensor | SplitImages | StoredImages) -> Tensor:
    """uint8 [N, 3, H, W] -> CLIP-normalised float32 (a whole lazily read split is read first)."""
    if not isinstance(images, Tensor):
        images = images[:]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (torch.as_tensor(images).float() / 255.0 - mean) / std


def _as_index_list(index: Any, length: int) -> list[int]:
    if isinstance(index, slice):
        return list(range(*index.indices(length)))
    if isinstance(index, Tensor):
        return [int(i) for i in index.reshape(-1).tolist()]
    if isinstance(index, np.ndarray):
        return [int(i) for i in index.reshape(-1)]
    return [int(i) for i in index]


class SplitImages:
    """The images of a saved split, read and preprocessed on access: ``images[indices]`` -> uint8 tensor.

    Duck-types the tensor that :class:`DataSplit` holds (``shape`` and indexing by slice or index tensor), so
    splits far larger than memory work, and only what a sampler draws is decoded.
    """

    def __init__(self, dataset: Any, column: str, image_size: int) -> None:
        import datasets

        self.dataset = dataset.select_columns([column])
        if isinstance(self.dataset.features[column], datasets.Image):  # decode in the worker threads, not here
            self.dataset = self.dataset.cast_column(column, datasets.Image(decode=False))
        self.column = column
        self.image_size = image_size

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.dataset), 3, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Tensor:
        indices = _as_index_list(index, len(self))
        if not indices:
            return torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.uint8)
        images = self.dataset[indices][self.column]
        workers = min(8, os.cpu_count() or 1, len(images))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            arrays = list(pool.map(self._preprocess, images))
        return torch.from_numpy(np.stack(arrays))

    def _preprocess(self, item: Any) -> np.ndarray:
        return clip_resize_crop(decode_image(item), self.image_size)


def decode_image(item: Any) -> Any:
    """A PIL image from what an undecoded ``datasets.Image`` column holds (``{"bytes", "path"}``) or a PIL image."""
    if not isinstance(item, dict):
        return item
    from PIL import Image

    if item.get("bytes") is not None:
        return Image.open(io.BytesIO(item["bytes"]))
    return Image.open(item["path"])


class StoredImages:
    """Preprocessed images in a memory-mapped ``.npy`` (uint8 [N, 3, S, S]); same indexing as :class:`SplitImages`."""

    def __init__(self, path: Path) -> None:
        self.array = np.load(path, mmap_mode="r")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, index: Any) -> Tensor:
        if not isinstance(index, slice):
            index = np.asarray(_as_index_list(index, len(self)), dtype=np.int64)
        return torch.from_numpy(np.array(self.array[index]))  # a copy: the map is read-only


def store_images(source: SplitImages, path: Path, progress: bool, label: str, chunk: int = 256) -> StoredImages:
    """Write every preprocessed image of ``source`` to ``path`` once (atomically), then map it."""
    if path.is_file():
        try:
            stored = StoredImages(path)
            if stored.shape == source.shape:
                return stored
        except (OSError, ValueError):
            pass
    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy", dir=path.parent)
    os.close(handle)
    try:
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=source.shape)
        with tqdm(total=len(source), desc=label, disable=not progress, leave=False, file=sys.stderr) as bar:
            for start in range(0, len(source), chunk):
                stop = min(start + chunk, len(source))
                array[start:stop] = source[start:stop].numpy()
                bar.update(stop - start)
        array.flush()
        del array
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return StoredImages(path)
