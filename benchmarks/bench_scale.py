"""Real-scale data-free merges from safetensors files: peak RSS and time against the read-everything floor.

Run (its own tox env; never part of the tests)::

    python benchmarks/bench_scale.py --preset vit-l14 --experts 20 --dir /var/tmp/bench-scale
    python benchmarks/bench_scale.py --preset llama-3.2-1b --experts 6 --dir /var/tmp/bench-scale

Workload: one random base and K experts (base + small noise) with the real parameter names and shapes, each
written as one ``.safetensors`` file: (a) the CLIP ViT-L/14 image encoder (303,966,208 fp32 parameters,
1.2 GB a model), (b) Llama-3.2-1B (1,235,814,400 bf16 parameters, 2.5 GB a model).

Every merge runs in a fresh process through the methods' registered functions on
:class:`bench.model_pool.SafetensorsWeights` readers, the path ``bench run`` takes for experts on disk. It
reports the merge's wall time and peak RSS (``VmHWM`` after resetting it through ``/proc/self/clear_refs``),
and the RSS before the merge. The *floor* reads every input file once, sequentially, in the same conditions.
Before each run the page cache is dropped (root only; otherwise said in the table), so every row reads the
files from the disk, as a merge larger than the machine's memory must.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

GIB = 1 << 30


def open_clip_visual_shapes(width: int, layers: int, patch: int, tokens: int, output_dim: int,
                             prefix: str = "visual.") -> dict[str, tuple[int, ...]]:
    """The parameter shapes of an open_clip ViT image encoder (``tokens`` = patches + the class token)."""
    shapes: dict[str, tuple[int, ...]] = {
        prefix + "conv1.weight": (width, 3, patch, patch),
        prefix + "class_embedding": (width,),
        prefix + "positional_embedding": (tokens, width),
        prefix + "ln_pre.weight": (width,),
        prefix + "ln_pre.bias": (width,),
    }
    for layer in range(layers):
        block = f"{prefix}transformer.resblocks.{layer}."
        shapes.update({
            block + "ln_1.weight": (width,), block + "ln_1.bias": (width,),
            block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
            block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
            block + "ln_2.weight": (width,), block + "ln_2.bias": (width,),
            block + "mlp.c_fc.weight": (4 * width, width), block + "mlp.c_fc.bias": (4 * width,),
            block + "mlp.c_proj.weight": (width, 4 * width), block + "mlp.c_proj.bias": (width,),
        })
    shapes.update({prefix + "ln_post.weight": (width,), prefix + "ln_post.bias": (width,),
                   prefix + "proj": (width, output_dim)})
    return shapes


def vit_l14_shapes() -> dict[str, tuple[int, ...]]:
    """open_clip ViT-L/14's visual encoder (303,966,208 entries)."""
    return open_clip_visual_shapes(width=1024, layers=24, patch=14, tokens=257, output_dim=768)


def llama_1b_shapes() -> dict[str, tuple[int, ...]]:
    """Llama-3.2-1B (tied embeddings: 1,235,814,400 entries)."""
    hidden, layers, intermediate, vocab, kv = 2048, 16, 8192, 128256, 512
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        shapes.update({
            prefix + "self_attn.q_proj.weight": (hidden, hidden), prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden), prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "mlp.gate_proj.weight": (intermediate, hidden),
            prefix + "mlp.up_proj.weight": (intermediate, hidden),
            prefix + "mlp.down_proj.weight": (hidden, intermediate),
            prefix + "input_layernorm.weight": (hidden,), prefix + "post_attention_layernorm.weight": (hidden,),
        })
    return shapes


def small_shapes() -> dict[str, tuple[int, ...]]:
    """16 tensors of 1M entries (64 MiB fp32)."""
    return {f"layer{index:02d}.weight": (1024, 1024) for index in range(16)}


PRESETS = {
    "vit-l14": (vit_l14_shapes, torch.float32),
    "llama-3.2-1b": (llama_1b_shapes, torch.bfloat16),
    "small": (small_shapes, torch.float32),
}
METHODS = {  # row -> (registered method, hyperparameters)
    "task_arithmetic": ("task_arithmetic", {}),
    "ties_global": ("ties", {"trim_scope": "global"}),
    "ties_per_tensor": ("ties", {"trim_scope": "per_tensor"}),
    "dare_ta": ("dare_ta", {}),
    "weight_averaging": ("weight_averaging", {}),
}


def write_models(folder: Path, preset: str, experts: int, seed: int = 0) -> list[Path]:
    """``base.safetensors`` and ``expert-<i>.safetensors`` (base + N(0, 0.001²)), one model in memory at a time."""
    from safetensors.torch import save_file

    shapes_fn, dtype = PRESETS[preset]
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "base.safetensors", *(folder / f"expert-{i:02d}.safetensors" for i in range(experts))]
    for index, path in enumerate(paths):
        if path.is_file():
            continue
        generator = torch.Generator().manual_seed(seed)  # the base's draw, then this model's noise on top
        model = {name: torch.empty(shape).normal_(0.0, 0.02, generator=generator)
                 for name, shape in shapes_fn().items()}
        if index:
            generator = torch.Generator().manual_seed(seed + index)
            for tensor in model.values():
                tensor.add_(torch.empty(tensor.shape).normal_(0.0, 1e-3, generator=generator))
        tmp = path.with_suffix(".tmp")
        save_file({name: tensor.to(dtype) for name, tensor in model.items()}, str(tmp))
        os.replace(tmp, path)
        del model
    return paths


def memory_status() -> dict[str, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line.split(":")[0]] = int(line.split()[1]) * 1024
    return values


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def run_floor(paths: list[Path]) -> None:
    """Read every input file once (what any merge must at least do)."""
    buffer = bytearray(16 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def run_merge(paths: list[Path], row: str) -> None:
    from bench import registry
    from bench.model_pool import SafetensorsWeights
    from bench.problem import MergeContext

    name, overrides = METHODS[row]
    spec = registry.get_method(name)
    params = registry.build_params(name, spec.params, overrides)
    base = SafetensorsWeights.open(paths[0], "base")
    experts = [SafetensorsWeights.open(path, path.stem) for path in paths[1:]]
    problem = types.SimpleNamespace(pretrained=lambda: base, experts=lambda: experts,
                                    tasks=[path.stem for path in paths[1:]])
    ctx = MergeContext(problem=problem, seed=0, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    merged = spec.fn(ctx, params)
    assert len(merged) == len(base)


def child(args: argparse.Namespace) -> None:
    """One measured run in this fresh process; prints its figures as JSON."""
    torch.set_num_threads(args.threads)
    paths = sorted(Path(args.dir).glob("*.safetensors"))  # base.safetensors sorts before expert-*
    paths = [paths[-1], *paths[:-1]] if paths[-1].name == "base.safetensors" else paths
    if args.row != "floor":
        from bench import registry

        registry.methods()  # every method module imported before the measurement, as in a running `bench run`
    before = memory_status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")
    begin = time.perf_counter()
    run_floor(paths) if args.row == "floor" else run_merge(paths, args.row)
    seconds = time.perf_counter() - begin
    print(json.dumps({"row": args.row, "seconds": seconds, "peak_rss": memory_status()["VmHWM"],
                      "rss_before": before}))


def measure(folder: Path, row: str, threads: int, cold: bool = True) -> dict:
    """One row in a fresh process; ``cold`` drops the page cache first (root only)."""
    dropped = cold and drop_page_cache()
    out = subprocess.run([sys.executable, __file__, "--child", row, "--dir", str(folder), "--threads", str(threads)],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cold"] = dropped
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="vit-l14")
    parser.add_argument("--experts", type=int, default=20)
    parser.add_argument("--rows", default="floor,task_arithmetic,ties_global,ties_per_tensor,dare_ta")
    parser.add_argument("--dir", default="/var/tmp/bench-scale")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the written models for another run")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.row = args.child
        child(args)
        return
    folder = Path(args.dir) / f"{args.preset}-k{args.experts}"
    begin = time.perf_counter()
    paths = write_models(folder, args.preset, args.experts)
    written = time.perf_counter() - begin
    on_disk = sum(path.stat().st_size for path in paths)
    print(f"{args.preset}: base + {args.experts} experts, {on_disk / GIB:.1f} GiB on disk "
          f"(written in {written:.0f} s); torch threads {args.threads}", flush=True)
    results = []
    for row in args.rows.split(","):
        result = measure(folder, row, args.threads)
        results.append(result)
        floor = results[0]["seconds"] if results[0]["row"] == "floor" else None
        ratio = f"{result['seconds'] / floor:5.2f}x" if floor else "  -  "
        print(f"  {row:17s} {result['seconds']:8.1f} s  {ratio} floor   peak RSS {result['peak_rss'] / GIB:5.2f} GiB"
              f"  (before: {result['rss_before'] / GIB:.2f} GiB){'' if result['cold'] else '  [page cache warm]'}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "experts": args.experts, "bytes_on_disk": on_disk,
                                               "threads": args.threads, "results": results}, indent=1))
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
