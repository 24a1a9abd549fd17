"""The weights of a merge: the base and each expert as a reader that yields one tensor at a time.

A merge of K experts must not hold K whole models: a data-free method asks each expert for one tensor, uses it
and drops it, so its working memory is the merged model plus K × the largest tensor whatever K is. Readers:

- :class:`InMemoryWeights`: a state dict already in memory (embedded suites, tiny fixtures);
- :class:`SafetensorsWeights`: a ``.safetensors`` file or a sharded checkpoint (``*.index.json``). Shapes and
  dtypes come from the headers without reading data; a tensor is read with one large positional read into
  memory of its own, so it leaves the process when dropped and the disk streams at full speed (the
  ``safetensors`` package maps the file instead: every page it touches stays resident while the file is open,
  and page-fault reads of a 24 GB merge ran ~3x slower than the floor here);
- :class:`MappedWeights`: another reader under new names, cast or transposed on read.

:class:`KeyReader` reads every source's tensor of the next key in the background while the current one is
merged, so a merge's reading overlaps its arithmetic.

Readers are read-only ``Mapping[str, Tensor]``s, so every function written for a state dict accepts one.
"""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.errors import BenchError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Weights(Mapping[str, Tensor]):
    """One model's tensors by name; ``shape``/``dtype`` answer without reading the tensor."""

    label: str = "weights"
    streamed = False  # whether reading a tensor goes to a file
    _keys: Mapping[str, Any]  # what each subclass indexes its tensors by (its key set)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._keys

    def shape(self, key: str) -> torch.Size:
        return self[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self[key].dtype

    def numel(self, key: str) -> int:
        return math.prod(self.shape(key))

    def nbytes(self) -> int:
        return sum(self.numel(key) * _element_size(self.dtype(key)) for key in self)

    def read_flat(self, key: str, start: int, stop: int) -> Tensor:
        """Entries ``[start, stop)`` of the flattened tensor (file readers read just those bytes)."""
        return self[key].reshape(-1)[start:stop]

    def read_into(self, key: str, buffer: Tensor) -> Tensor | None:
        """``self[key]`` read into ``buffer`` (uint8, at least :meth:`nbytes_of` long) and returned as a view of
        it, or None where this reader cannot read in place (then use ``self[key]``)."""
        return None

    def nbytes_of(self, key: str) -> int:
        return self.numel(key) * _element_size(self.dtype(key))

    def load(self) -> dict[str, Tensor]:
        """Every tensor, owned by the caller (a copy only where the reader hands out file views)."""
        return {key: self[key] for key in self}


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class InMemoryWeights(Weights):
    """A state dict that is already in memory."""

    def __init__(self, tensors: Mapping[str, Tensor], label: str = "weights") -> None:
        self._tensors = self._keys = tensors
        self.label = label

    def __getitem__(self, key: str) -> Tensor:
        return self._tensors[key]



class SafetensorsWeights(Weights):
    """Tensors read one at a time from safetensors files.

    ``files`` maps each tensor's name to its file (a sharded checkpoint has several files).
    """

    streamed = True

    def __init__(self, files: Mapping[str, Path], label: str) -> None:
        self.label = label
        self._files = self._keys = dict(files)
        self._headers: dict[Path, dict] = {}

    @classmethod
    def open(cls, path: Path | str, label: str | None = None, **options) -> SafetensorsWeights:
        """A ``.safetensors`` file, or a sharded checkpoint's ``*.safetensors.index.json``."""
        path = Path(path)
        label = label or str(path)
        if path.name.endswith(".index.json"):
            files = _sharded_files(path, label)
        else:
            files = dict.fromkeys(read_header(path, label), path)
        return cls(files, label, **options)

    def _header(self, path: Path) -> tuple[dict, int]:
        if path not in self._headers:
            self._headers[path] = read_header(path, self.label, with_data_start=True)
        return self._headers[path]

    def _entry(self, key: str) -> dict:
        return self._header(self._files[key])[0][key]

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._entry(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._entry(key)["dtype"]]

    def __getitem__(self, key: str) -> Tensor:
        return self._read(key, 0, self.numel(key)).reshape(self.shape(key))

    def read_flat(self, key: str, start: int, stop: int) -> Tensor:
        return self._read(key, start, stop)

    def read_into(self, key: str, buffer: Tensor) -> Tensor:
        return self._read(key, 0, self.numel(key), buffer).reshape(self.shape(key))

    def _read(self, key: str, start: int, stop: int, into: Tensor | None = None) -> Tensor:
        path = self._files[key]
        header, data_start = self._header(path)
        dtype = SAFETENSORS_DTYPES[header[key]["dtype"]]
        size = _element_size(dtype)
        count = max(stop - start, 0) * size
        buffer = _owned_bytes(count) if into is None else into[:count]
        offset = data_start + header[key]["data_offsets"][0] + start * size
        try:
            with open(path, "rb", buffering=0) as handle:
                handle.seek(offset)
                view, done = memoryview(buffer.numpy()), 0
                while done < len(view):
                    count = handle.readinto(view[done:])
                    if not count:
                        raise OSError(f"the file ends {len(view) - done} bytes early")
                    done += count
        except OSError as error:  # truncated or rewritten since its header was read
            raise BenchError(f"{self.label}: cannot read tensor '{key}' from {path} ({error}); the file is damaged: "
                             "download or write it again") from None
        return buffer.view(dtype)



class MappedWeights(Weights):
    """Another reader's tensors under new names, converted on read: ``names`` maps each new name to a source
    name; floating-point tensors are cast to ``cast``; names in ``transposed`` are read transposed (2-D)."""

    def __init__(self, source: Mapping[str, Tensor], names: Mapping[str, str], *, cast: torch.dtype | None = None,
                 transposed: frozenset[str] | set[str] = frozenset()) -> None:
        self.source = as_weights(source)
        self.label = self.source.label
        self.streamed = self.source.streamed
        self._names = self._keys = dict(names)
        self._cast = cast
        self._transposed = frozenset(transposed)
        missing = [old for old in self._names.values() if old not in self.source]
        if missing:
            raise BenchError(f"{self.label}: tensor '{missing[0]}' is not in the checkpoint")

    def shape(self, key: str) -> torch.Size:
        shape = self.source.shape(self._names[key])
        return torch.Size(reversed(shape)) if key in self._transposed else shape

    def dtype(self, key: str) -> torch.dtype:
        dtype = self.source.dtype(self._names[key])
        return self._cast if self._cast is not None and dtype.is_floating_point else dtype

    def read_into(self, key: str, buffer: Tensor) -> Tensor | None:
        unchanged = key not in self._transposed and self.dtype(key) == self.source.dtype(self._names[key])
        return self.source.read_into(self._names[key], buffer) if unchanged else None

    def read_flat(self, key: str, start: int, stop: int) -> Tensor:
        if key in self._transposed:
            return super().read_flat(key, start, stop)
        tensor = self.source.read_flat(self._names[key], start, stop)
        return tensor.to(self._cast) if self._cast is not None and tensor.is_floating_point() else tensor

    def __getitem__(self, key: str) -> Tensor:
        tensor = self.source[self._names[key]]
        if key in self._transposed:
            tensor = tensor.T
        if self._cast is not None and tensor.is_floating_point():
            tensor = tensor.to(self._cast)
        return tensor.contiguous()



MAPPED_ABOVE = 1 << 20


def _owned_bytes(count: int) -> Tensor:
    """A byte buffer whose memory goes back to the system as soon as the tensor is dropped: large buffers are
    anonymous maps of their own (malloc would keep freed multi-MB blocks in its heap after it raises its mmap
    threshold, and a merge's resident memory would then grow with every tensor read)."""
    if count < MAPPED_ABOVE:
        return torch.empty(count, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, count), dtype=torch.uint8)


def read_header(path: Path, label: str, with_data_start: bool = False) -> Any:
    """A safetensors file's tensor table (name -> dtype, shape, offsets), checked against the file's size; with
    ``with_data_start``, also the file offset its data starts at."""
    try:
        with open(path, "rb") as handle:
            size_bytes = handle.read(8)
            length = int.from_bytes(size_bytes, "little") if len(size_bytes) == 8 else -1
            file_size = Path(path).stat().st_size
            if length < 2 or 8 + length > file_size:
                raise ValueError("header length out of range")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:
        raise BenchError(f"{label}: {path} is not a readable safetensors file ({error}); download or write it "
                         "again") from None
    header.pop("__metadata__", None)
    data_size = file_size - 8 - length
    for name, entry in header.items():
        begin, end = entry.get("data_offsets", (0, -1))
        if entry.get("dtype") not in SAFETENSORS_DTYPES or not 0 <= begin <= end <= data_size:
            raise BenchError(f"{label}: tensor '{name}' in {path} lies beyond the end of the file or has an "
                             "unknown dtype; the file is truncated or damaged: download or write it again")
    return (header, 8 + length) if with_data_start else header


def _sharded_files(index: Path, label: str) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError) as error:
        raise BenchError(f"{label}: cannot read {index} ({error})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BenchError(f"{label}: {index} has no 'weight_map' naming the shard of each tensor; it is not a "
                         "sharded safetensors index")
    files: dict[str, Path] = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        for name in read_header(path, label):
            files[name] = path
    missing = [name for name in weight_map if name not in files]
    if missing:
        raise BenchError(f"{label}: tensor '{missing[0]}' is listed in {index} but not in its shard")
    return files


def mapped(source: Mapping[str, Tensor], names: Mapping[str, str], *, cast: torch.dtype | None = None,
           transposed: frozenset[str] | set[str] = frozenset()) -> Mapping[str, Tensor]:
    """:class:`MappedWeights` over a file reader (nothing read now); over tensors already in memory, the
    converted state dict itself (converted once, not on every read)."""
    view = MappedWeights(source, names, cast=cast, transposed=transposed)
    return view.load() if isinstance(view.source, InMemoryWeights) else view


def as_weights(tensors: Mapping[str, Tensor], label: str = "weights") -> Weights:
    """``tensors`` as a :class:`Weights` (readers pass through)."""
    return tensors if isinstance(tensors, Weights) else InMemoryWeights(tensors, label)


def shape_of(tensors: Mapping[str, Tensor], key: str) -> torch.Size:
    return tensors.shape(key) if isinstance(tensors, Weights) else tensors[key].shape


def dtype_of(tensors: Mapping[str, Tensor], key: str) -> torch.dtype:
    return tensors.dtype(key) if isinstance(tensors, Weights) else tensors[key].dtype


def check_compatible(base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]], names: Sequence[str]) -> None:
    """Fail before any work when an expert's keys or shapes differ from the base, naming the first.

    Readers answer from their headers: nothing is read.
    """
    for name, expert in zip(names, experts, strict=True):
        missing = [k for k in base if k not in expert]
        extra = [k for k in expert if k not in base]
        if missing or extra:
            key = (missing or extra)[0]
            where = "missing from" if missing else "not in the base but in"
            raise BenchError(f"tensor '{key}' is {where} expert '{name}'; experts must share the base architecture")
        for key in base:
            expert_shape, base_shape = shape_of(expert, key), shape_of(base, key)
            if expert_shape != base_shape:
                raise BenchError(
                    f"expert '{name}' tensor '{key}' has shape {tuple(expert_shape)}, "
                    f"base has {tuple(base_shape)}; experts must be fine-tuned from the same base"
                )


class ModelPool:
    """The base and the K experts of a merge, in the suite's task order."""

    def __init__(self, base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]) -> None:
        self.base = as_weights(base, "base")
        self.experts = {task: as_weights(weights, f"expert '{task}'") for task, weights in experts.items()}

    @property
    def tasks(self) -> list[str]:
        return list(self.experts)

    def check(self) -> None:
        check_compatible(self.base, list(self.experts.values()), self.tasks)

    def largest_tensor_bytes(self) -> int:
        return max((self.base.numel(k) * _element_size(self.base.dtype(k)) for k in self.base), default=0)

    def sources(self) -> list[tuple[str, Weights]]:
        """(who, reader) for the base and every expert, in task order; ``who`` names the expert and, when it
        says more, the reader's label (e.g. its file)."""
        named = [("base", self.base)] + [(f"expert '{task}'", reader) for task, reader in self.experts.items()]
        return [(who if reader.label in (who, "weights") else f"{who} ({reader.label})", reader)
                for who, reader in named]

    def find_nonfinite(self, keys: Iterable[str]) -> str | None:
        """``"<who>: tensor '<key>' holds NaN in 3 of 36 entries"`` for the first of ``keys`` that the base or an
        expert holds non-finite values in (base first, then the experts in task order), else None.

        Reads only those keys' tensors (one at a time): the check a failed merge makes of its inputs, never a
        read of whole experts at load time.
        """
        keys = list(keys)
        for who, reader in self.sources():
            for key in keys:
                if key in reader:
                    tensor = reader[key]
                    if not all_finite(tensor):
                        return f"{who}: tensor '{key}' holds {describe_nonfinite(tensor)}"
        return None


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite (integer tensors always are).

    The fast path is one sum, with no temporary (any NaN or ±inf entry makes it non-finite; ~5% of a
    task-arithmetic merge of 8 experts, for the merged model on CPU, where ``torch.isfinite(t).all()`` costs
    ~65%); only when the sum is not finite, which overflow alone can cause, are the entries tested one by one.
    fp16, whose sums of large tensors overflow, takes its minimum and maximum instead (NaN propagates to both).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.dtype == torch.float16:
        low, high = torch.aminmax(tensor)
        return bool(torch.isfinite(low) & torch.isfinite(high))
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def describe_nonfinite(tensor: Tensor) -> str:
    """``NaN in 3 of 36 entries``, ``NaN in 1 and +inf in 2 of 36 entries``: what is not finite in a tensor."""
    parts = []
    for name, count in (("NaN", torch.isnan(tensor).sum()), ("+inf", torch.isposinf(tensor).sum()),
                        ("-inf", torch.isneginf(tensor).sum())):
        if int(count):
            parts.append(f"{name} in {int(count)}")
    what = " and ".join(parts) if parts else "no non-finite value"
    return f"{what} of {tensor.numel()} entries"


def nonfinite_keys(weights: Mapping[str, Tensor]) -> list[str]:
    """The keys of ``weights`` whose tensors hold a NaN or ±inf (see :func:`all_finite`), in their order."""
    return [key for key, tensor in weights.items() if not all_finite(tensor)]


def read_flat(tensors: Mapping[str, Tensor], key: str, start: int, stop: int) -> Tensor:
    """Entries ``[start, stop)`` of ``tensors[key]`` flattened, reading no more than those from a file."""
    if isinstance(tensors, Weights):
        return tensors.read_flat(key, start, stop)
    return tensors[key].reshape(-1)[start:stop]


class KeyReader:
    """Every source's tensor of one key at a time, in ``order``.

    File readers are read one key ahead on a background thread (reading releases the GIL), so reading the next
    key overlaps merging this one, into two sets of buffers used in turn: fresh memory costs page faults (here
    ~0.7 s a GB, more than the disk), reused memory does not. So the tensors :meth:`get` returns stay valid only
    until the next call; callers drop them before asking for the next key. Keys asked out of order are read on
    the spot.
    """

    def __init__(self, sources: Sequence[Mapping[str, Tensor]], order: Sequence[str]) -> None:
        self.sources = list(sources)
        self.order = list(order)
        self._position = {key: index for index, key in enumerate(self.order)}
        self._streamed = any(getattr(source, "streamed", False) for source in self.sources)
        self._buffers: list[list[Tensor | None]] = [[None] * len(self.sources) for _ in range(2)]
        self._pending: tuple[str, int, Any] | None = None  # (key, buffer set, future)
        self._executor = None

    @property
    def streamed(self) -> bool:
        return self._streamed

    def _read(self, key: str, slot: int) -> list[Tensor]:
        tensors = []
        for index, source in enumerate(self.sources):
            tensor = None
            if isinstance(source, Weights) and source.streamed:
                size, buffer = source.nbytes_of(key), self._buffers[slot][index]
                if buffer is None or buffer.numel() < size:
                    buffer = self._buffers[slot][index] = _owned_bytes(size)
                tensor = source.read_into(key, buffer)
            tensors.append(source[key] if tensor is None else tensor)
        return tensors

    def get(self, key: str) -> list[Tensor]:
        if not self._streamed:
            return [source[key] for source in self.sources]
        tensors, slot = None, 1
        if self._pending is not None:
            pending_key, slot, future = self._pending
            self._pending = None
            tensors = future.result()  # waited for even when unwanted: its buffers are about to be reused
            if pending_key != key:
                tensors = None
        if tensors is None:
            slot = 1 - slot
            tensors = self._read(key, slot)
        following = self._position.get(key, len(self.order)) + 1
        if following < len(self.order):
            if self._executor is None:
                from concurrent.futures import ThreadPoolExecutor

                self._executor = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
            upcoming = self.order[following]
            self._pending = (upcoming, 1 - slot, self._executor.submit(self._read, upcoming, 1 - slot))
        return tensors
