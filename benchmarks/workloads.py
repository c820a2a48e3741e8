"""The two workloads of the original MIGnificient system (ETH Zurich, SC24), a ResNet-style
convolutional inference and a breadth-first search, measured native (in-process, no isolation)
and remoted through mig-kernel; p50/p99 latency per request.

Usage::

    python benchmarks/workloads.py [--backend sim|nvml] [--quick] [--requests N] [--warmup N]
                                   [--profile P] [--out FILE]

``--backend sim`` starts a broker with a simulated layout (``H100-80GB:7x1g.10gb``) and measures
against NumPy in this process; ``--backend nvml`` starts one on the real GPUs and measures against
CuPy in this process. Other scripts (a report runner) may ``import workloads`` from benchmarks/
and call :func:`run_workloads` on a Session they hold.

What one request is, in both columns:

- ResNet: a batch of float32 images (NCHW) goes host -> device, a small ResNet (3x3 stem, basic
  blocks of two 3x3 convolutions with folded batch norm as a per-channel scale and shift, a
  stride-2 block with a 1x1 projection shortcut at each new stage, global average pool, fully
  connected layer) runs on it, and the logits come back to the host. The weights were put on
  the device once and stay there, as an inference server on a slice holds its model: natively
  in this process's device memory, remoted as RemoteArrays on the slice.
- BFS: a source vertex goes in; a level-synchronous frontier BFS over a seeded R-MAT graph in
  CSR form (uploaded once, like the weights) runs; the number of vertices reached and the depth
  come back.

Each workload times its native requests, then its remoted ones (:func:`phases` says why not
alternating), each phase after its own warm-up; the remoted side also records the slice's own
compute time per request (the executor's clock), so the rest of the round trip is the remoting.
Before timing, the remoted results are checked against the native ones (logits ``allclose``, BFS
levels exactly equal) and the BFS against a plain-Python reference on the small graph. Every array
operation goes through the array module given to it (NumPy or CuPy, nothing else), so the same
code runs in this process and on the slice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from broker_bench import machine
from dataplane_bench import summary

import mig_kernel
from mig_kernel.testing import BrokerProcess, all_free

if __name__ != "__main__":
    # cloudpickle sends functions of an importable module by reference, and the executor cannot
    # import this file: imported (by a report runner), the module's functions go by value, as
    # they do anyway when it runs as a script.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

# On ``xp``: this module never binds a global of that name. The remoted entry points below read
# the free name ``xp``; cloudpickle leaves a name the module lacks out of the function's globals,
# and the executor puts the slice's array module there. Everything they call takes the array
# module as its first argument, so the native side passes NumPy or CuPy to the same code.

LAYOUT = "H100-80GB:7x1g.10gb"


# ----------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class ResNetSize:
    batch: int
    image: int  # height = width, 3 channels
    widths: tuple[int, ...]  # channels of each stage; every stage after the first halves H, W
    blocks: int  # basic blocks per stage
    classes: int


@dataclass(frozen=True)
class GraphSize:
    scale: int  # 2**scale vertices
    edge_factor: int  # generated edges per vertex; each is stored in both directions


# Full: a few ms per request on an H100/H200, well under 0.5 s with NumPy on 2 CPU cores.
RESNET_FULL = ResNetSize(batch=8, image=64, widths=(32, 64, 128), blocks=2, classes=10)
RESNET_QUICK = ResNetSize(batch=4, image=32, widths=(16, 32, 64), blocks=2, classes=10)
GRAPH_FULL = GraphSize(scale=16, edge_factor=8)  # 65,536 vertices, ~1M directed CSR edges
GRAPH_QUICK = GraphSize(scale=12, edge_factor=8)  # 4,096 vertices, ~65k directed CSR edges


# ----------------------------------------------------------------------------------- ResNet
def conv_bn(xp: ModuleType, x: Any, layer: dict[str, Any], relu: bool) -> Any:
    """A k x k convolution (padding k // 2) of an NHWC batch, then the folded batch norm.

    im2col by slicing: the k*k shifted (and strided) views of the padded input are laid side by
    side along the channel axis, so the whole convolution is one GEMM against the weights
    stored as a (k*k*C_in, C_out) matrix: one large matmul is what a GPU runs well, and slicing,
    ``pad`` and ``concatenate`` behave the same in NumPy and CuPy."""
    k, stride = layer["k"], layer["stride"]
    n, h, w, c = x.shape
    pad = k // 2
    ho = (h + 2 * pad - k) // stride + 1
    wo = (w + 2 * pad - k) // stride + 1
    if k == 1:
        cols = x[:, ::stride, ::stride, :]
    else:
        padded = xp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
        cols = xp.concatenate(
            [
                padded[:, dy : dy + span_h : stride, dx : dx + span_w : stride, :]
                for dy in range(k)
                for dx in range(k)
            ],
            axis=3,
        )
    y = cols.reshape(n * ho * wo, k * k * c) @ layer["w"]
    y = y * layer["scale"] + layer["shift"]
    if relu:
        y = xp.maximum(y, 0)
    return y.reshape(n, ho, wo, -1)


def basic_block(xp: ModuleType, x: Any, block: dict[str, Any]) -> Any:
    """Two 3x3 convolutions plus the shortcut (a strided 1x1 projection where the shape
    changes), then ReLU: the ResNet basic block."""
    out = conv_bn(xp, x, block["conv1"], relu=True)
    out = conv_bn(xp, out, block["conv2"], relu=False)
    shortcut = conv_bn(xp, x, block["proj"], relu=False) if "proj" in block else x
    return xp.maximum(out + shortcut, 0)


def resnet_forward(xp: ModuleType, model: dict[str, Any], images: Any) -> Any:
    """Logits (N, classes) of an NCHW float32 batch already on the device.

    The batch arrives NCHW, as frameworks send it, and is made NHWC once so that every
    convolution's channels are the contiguous GEMM dimension."""
    x = xp.ascontiguousarray(images.transpose(0, 2, 3, 1))
    x = conv_bn(xp, x, model["stem"], relu=True)
    for block in model["blocks"]:
        x = basic_block(xp, x, block)
    pooled = x.mean(axis=(1, 2))
    return pooled @ model["fc_w"] + model["fc_b"]


def make_resnet(size: ResNetSize, seed: int = 0) -> dict[str, Any]:
    """Deterministic host weights (seeded NumPy), in the nested dict ``resnet_forward`` reads.

    He-initialised convolutions; the second batch norm of each block scales its branch down so
    that activations keep their magnitude through the residual sums, as a trained network's do
    (random weights otherwise grow them stage by stage and the logits lose precision)."""
    rng = np.random.default_rng(seed)

    def conv(c_in: int, c_out: int, k: int, stride: int, gain: float) -> dict[str, Any]:
        fan_in = k * k * c_in
        w = rng.standard_normal((fan_in, c_out)) * np.sqrt(2.0 / fan_in)
        return {
            "k": k,
            "stride": stride,
            "w": w.astype(np.float32),
            "scale": (gain * rng.uniform(0.8, 1.2, c_out)).astype(np.float32),
            "shift": (0.05 * rng.standard_normal(c_out)).astype(np.float32),
        }

    model: dict[str, Any] = {"stem": conv(3, size.widths[0], 3, 1, 1.0), "blocks": []}
    c_in = size.widths[0]
    for stage, width in enumerate(size.widths):
        for b in range(size.blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            block = {
                "conv1": conv(c_in, width, 3, stride, 1.0),
                "conv2": conv(width, width, 3, 1, 0.3),
            }
            if stride != 1 or c_in != width:
                block["proj"] = conv(c_in, width, 1, stride, 0.5)
            model["blocks"].append(block)
            c_in = width
    fc = rng.standard_normal((c_in, size.classes)) / np.sqrt(c_in)
    model["fc_w"] = fc.astype(np.float32)
    model["fc_b"] = (0.01 * rng.standard_normal(size.classes)).astype(np.float32)
    return model


def resnet_cost(size: ResNetSize, model: dict[str, Any]) -> dict[str, Any]:
    """Parameters and FLOPs of one request, counted from the layer shapes (2 per multiply-add
    of the convolution and FC GEMMs; the batch-norm, ReLU and pooling element-wise work is
    left out)."""
    flops = 0
    convs = 0
    hw = size.image

    def count(layer: dict[str, Any], out_hw: int) -> int:
        rows, cols = layer["w"].shape
        return 2 * size.batch * out_hw * out_hw * rows * cols

    flops += count(model["stem"], hw)
    convs += 1
    for block in model["blocks"]:
        out_hw = (hw - 1) // block["conv1"]["stride"] + 1
        flops += count(block["conv1"], out_hw) + count(block["conv2"], out_hw)
        convs += 2
        if "proj" in block:
            flops += count(block["proj"], out_hw)
            convs += 1
        hw = out_hw
    flops += 2 * size.batch * model["fc_w"].size
    params = sum(a.size for a in _arrays(model))
    return {"convolutions": convs, "parameters": int(params), "gflop_per_request": flops / 1e9}


def _arrays(tree: Any) -> list[np.ndarray]:
    if isinstance(tree, np.ndarray):
        return [tree]
    if isinstance(tree, dict):
        return [a for v in tree.values() for a in _arrays(v)]
    if isinstance(tree, list):
        return [a for v in tree for a in _arrays(v)]
    return []


# ----------------------------------------------------------------------------------- BFS
def bfs_levels(xp: ModuleType, offsets: Any, indices: Any, source: int) -> tuple[Any, int]:
    """Level of every vertex from ``source`` (-1: unreached) and the depth, level-synchronous.

    Each level gathers all edges of the frontier at once: with the inclusive prefix sum of the
    frontier's degrees, ``searchsorted`` gives every edge slot its frontier vertex (no
    ``repeat`` with per-element counts, which CuPy cannot do on device arrays). Unvisited
    neighbours are deduplicated without a sort: each candidate writes its position into a
    scratch array and only the one write that won per vertex survives (NumPy keeps the last,
    CuPy an arbitrary one; either way exactly one). One host sync per level (the edge count)."""
    n = offsets.shape[0] - 1
    levels = xp.full(n, -1, dtype=xp.int32)
    owner = xp.empty(n, dtype=xp.int64)
    levels[source] = 0
    frontier = xp.full(1, source, dtype=xp.int64)
    depth = 0
    while True:
        starts = offsets[frontier]
        degrees = offsets[frontier + 1] - starts
        ends = xp.cumsum(degrees)
        total = int(ends[-1])
        if total == 0:
            break
        slot = xp.arange(total, dtype=xp.int64)
        which = xp.searchsorted(ends, slot, side="right")
        edge = (starts - ends + degrees)[which] + slot
        candidates = indices[edge]
        candidates = candidates[levels[candidates] < 0]
        if candidates.size == 0:
            break
        position = xp.arange(candidates.size, dtype=xp.int64)
        owner[candidates] = position
        frontier = candidates[owner[candidates] == position]
        depth += 1
        levels[frontier] = depth
    return levels, depth


def bfs_summary(xp: ModuleType, graph: dict[str, Any], source: int) -> dict[str, int]:
    """What a BFS request returns: small, so the request measures the search, not a copy."""
    levels, depth = bfs_levels(xp, graph["offsets"], graph["indices"], source)
    return {"reached": int(xp.count_nonzero(levels >= 0)), "depth": depth}


def make_graph(size: GraphSize, seed: int = 1) -> dict[str, np.ndarray]:
    """A seeded R-MAT graph (a, b, c = 0.57, 0.19, 0.19, the Graph500 choice: skewed degrees,
    a giant component, many isolated vertices), undirected (each edge stored both ways), self
    loops dropped, in CSR: ``offsets`` (V + 1, int64) and ``indices`` (E, int32)."""
    rng = np.random.default_rng(seed)
    n_edges = size.edge_factor << size.scale
    src = np.zeros(n_edges, dtype=np.int64)
    dst = np.zeros(n_edges, dtype=np.int64)
    for bit in range(size.scale):
        r = rng.random(n_edges)
        right = (r >= 0.57) & (r < 0.76) | (r >= 0.95)  # quadrants b and d: destination bit
        down = r >= 0.76  # quadrants c and d: source bit
        src |= down.astype(np.int64) << bit
        dst |= right.astype(np.int64) << bit
    keep = src != dst
    src, dst = src[keep], dst[keep]
    src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
    order = np.argsort(src, kind="stable")
    counts = np.bincount(src, minlength=1 << size.scale)
    offsets = np.zeros((1 << size.scale) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return {"offsets": offsets, "indices": dst[order].astype(np.int32)}


def reference_bfs(graph: dict[str, np.ndarray], source: int) -> np.ndarray:
    """A queue-based BFS in plain Python: slow, obviously right; checks ``bfs_levels``."""
    offsets, indices = graph["offsets"].tolist(), graph["indices"].tolist()
    levels = [-1] * (len(offsets) - 1)
    levels[source] = 0
    queue = deque([source])
    while queue:
        v = queue.popleft()
        for u in indices[offsets[v] : offsets[v + 1]]:
            if levels[u] < 0:
                levels[u] = levels[v] + 1
                queue.append(u)
    return np.asarray(levels, dtype=np.int32)


def pick_sources(graph: dict[str, np.ndarray], count: int, seed: int = 2) -> list[int]:
    """Seeded sources among the vertices with edges (an isolated source is a trivial request)."""
    degree = np.diff(graph["offsets"])
    candidates = np.flatnonzero(degree > 0)
    rng = np.random.default_rng(seed)
    return [int(v) for v in rng.choice(candidates, size=count, replace=False)]


# ----------------------------------------------------------------------------------- remoted
# Entry points sent to the slice: ``xp`` is the executor's array module (see the top).
def remote_keep(tree: Any) -> Any:
    """Set-up call: the arrays of ``tree`` arrive on the device and, returned, stay there as
    RemoteArrays (plain values in it come back as they are)."""
    return tree


def remote_resnet(model: dict[str, Any], images: Any) -> Any:
    return resnet_forward(xp, model, images)  # noqa: F821 (xp: the slice's array module)


def remote_bfs(graph: dict[str, Any], source: int) -> dict[str, int]:
    return bfs_summary(xp, graph, source)  # noqa: F821


def remote_bfs_levels(graph: dict[str, Any], source: int) -> Any:
    return bfs_levels(xp, graph["offsets"], graph["indices"], source)[0]  # noqa: F821


# ----------------------------------------------------------------------------------- native
def to_device(xp: ModuleType, tree: Any) -> Any:
    """``tree`` with its arrays copied to ``xp``'s device (NumPy: as they are)."""
    if isinstance(tree, np.ndarray):
        return xp.asarray(tree)
    if isinstance(tree, dict):
        return {k: to_device(xp, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_device(xp, v) for v in tree]
    return tree


def to_host(xp: ModuleType, array: Any) -> np.ndarray:
    """A host copy; CuPy's ``asnumpy`` waits for the device, so a request ends synchronized."""
    asnumpy = getattr(xp, "asnumpy", None)
    return asnumpy(array) if asnumpy is not None else np.asarray(array)


def native_resnet(xp: ModuleType, model: Any, images: np.ndarray) -> np.ndarray:
    """The native request: the same H2D of the batch, forward pass and D2H of the logits."""
    return to_host(xp, resnet_forward(xp, model, xp.asarray(images)))


# ----------------------------------------------------------------------------------- timing
def phases(
    native: Callable[[int], Any],
    remoted: Callable[[int], Any],
    requests: int,
    warmup: int,
) -> dict[str, Any]:
    """Time ``warmup + requests`` calls of ``native(i)``, then as many of ``remoted(i)`` (an
    Invocation, waited for); the slice's own compute time of each remoted request is kept too,
    to show what of the round trip is remoting.

    One phase after the other, not alternating request by request: on a sim slice both sides
    are NumPy, and an OpenBLAS thread pool spins for a while after each GEMM; alternating, each
    side's requests ran against the other process's spinning threads (on 2 cores a 7 ms native
    ResNet request then measured 25 ms at p50 and 220 ms at p99). Each phase's warm-up absorbs
    the spin-down of the phase before it."""
    native_s: list[float] = []
    for i in range(warmup + requests):
        t = time.perf_counter()
        native(i)
        if i >= warmup:
            native_s.append(time.perf_counter() - t)
    remoted_s: list[float] = []
    slice_s: list[float] = []
    for i in range(warmup + requests):
        t = time.perf_counter()
        invocation = remoted(i)
        invocation.result()
        if i >= warmup:
            remoted_s.append(time.perf_counter() - t)
            slice_s.append(invocation.timings["compute_ms"] / 1e3)
    out: dict[str, Any] = {
        "native": summary(native_s),
        "remoted": summary(remoted_s),
        "remoted_slice_compute": summary(slice_s),
    }
    out["overhead_p50_ms"] = out["remoted"]["p50_ms"] - out["native"]["p50_ms"]
    out["overhead_p99_ms"] = out["remoted"]["p99_ms"] - out["native"]["p99_ms"]
    return out


# ----------------------------------------------------------------------------------- workloads
def upload(session: Any, native_xp: ModuleType, host: Any) -> tuple[Any, Any, dict[str, float]]:
    """Arrays (a model, a graph) onto the native device and onto the slice, once, timed."""
    t = time.perf_counter()
    native = to_device(native_xp, host)
    native_s = time.perf_counter() - t
    t = time.perf_counter()
    remote = session.run(remote_keep, host)
    remote_s = time.perf_counter() - t
    return native, remote, {"native": native_s * 1e3, "remoted": remote_s * 1e3}


def run_resnet(
    session: Any, native_xp: ModuleType, size: ResNetSize, requests: int, warmup: int
) -> dict[str, Any]:
    host_model = make_resnet(size)
    rng = np.random.default_rng(3)
    shape = (size.batch, 3, size.image, size.image)
    batches = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
    native_model, remote_model, upload_ms = upload(session, native_xp, host_model)

    expected = native_resnet(native_xp, native_model, batches[0])
    got = session.run(remote_resnet, remote_model, batches[0], to_host=True)
    scale = float(np.abs(expected).max())
    max_diff = float(np.abs(got - expected).max())
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-4 * scale):
        raise AssertionError(f"remoted logits differ from native ones (max |diff| {max_diff})")

    timing = phases(
        lambda i: native_resnet(native_xp, native_model, batches[i % len(batches)]),
        lambda i: session.submit(
            remote_resnet, remote_model, batches[i % len(batches)], to_host=True
        ),
        requests,
        warmup,
    )
    return {
        "shape": {
            **asdict(size),
            "input": list(shape),
            "input_bytes": batches[0].nbytes,
            "logits": list(expected.shape),
            **resnet_cost(size, host_model),
        },
        "verified": {"logits_allclose": True, "max_abs_diff": max_diff, "logit_scale": scale},
        "model_upload_ms": upload_ms,
        **timing,
    }


def run_bfs(
    session: Any, native_xp: ModuleType, size: GraphSize, requests: int, warmup: int
) -> dict[str, Any]:
    # The BFS code against the reference, once, on the small graph (plain Python is slow).
    small = make_graph(GRAPH_QUICK)
    small_source = pick_sources(small, 1)[0]
    levels, _ = bfs_levels(
        native_xp,
        native_xp.asarray(small["offsets"]),
        native_xp.asarray(small["indices"]),
        small_source,
    )
    if not np.array_equal(to_host(native_xp, levels), reference_bfs(small, small_source)):
        raise AssertionError("bfs_levels differs from the reference BFS on the quick graph")

    graph = small if size == GRAPH_QUICK else make_graph(size)
    sources = pick_sources(graph, 16)
    native_graph, remote_graph, upload_ms = upload(session, native_xp, graph)

    native_levels, _ = bfs_levels(
        native_xp, native_graph["offsets"], native_graph["indices"], sources[0]
    )
    remote_levels = session.run(remote_bfs_levels, remote_graph, sources[0], to_host=True)
    if not np.array_equal(remote_levels, to_host(native_xp, native_levels)):
        raise AssertionError("remoted BFS levels differ from native ones")
    answers = [bfs_summary(native_xp, native_graph, s) for s in sources]
    remote_answers = [session.run(remote_bfs, remote_graph, s) for s in sources]
    if answers != remote_answers:
        raise AssertionError(f"remoted BFS answers differ: {remote_answers} vs {answers}")

    timing = phases(
        lambda i: bfs_summary(native_xp, native_graph, sources[i % len(sources)]),
        lambda i: session.submit(remote_bfs, remote_graph, sources[i % len(sources)]),
        requests,
        warmup,
    )
    degree = np.diff(graph["offsets"])
    return {
        "graph": {
            **asdict(size),
            "generator": "R-MAT (0.57, 0.19, 0.19, 0.05), undirected, no self loops",
            "vertices": int(degree.size),
            "edges_directed": int(graph["indices"].size),
            "max_degree": int(degree.max()),
            "isolated_vertices": int((degree == 0).sum()),
        },
        "sources": sources,
        "answers": answers,
        "verified": {
            "reference_bfs_equal_quick_graph": True,
            "levels_equal": True,
            "answers_equal": True,
        },
        "graph_upload_ms": upload_ms,
        **timing,
    }


def run_workloads(
    session: Any, native_xp: ModuleType, *, requests: int, warmup: int, quick: bool
) -> dict[str, Any]:
    """Both workloads on ``session``'s slice against ``native_xp`` (NumPy or CuPy) in this
    process: JSON-able results with the sizes, the checks passed and p50/p99 per request.
    Raises AssertionError if the remoted results differ from the native ones."""
    if requests < 1 or warmup < 0:
        raise ValueError(f"need requests >= 1 and warmup >= 0, got {requests} and {warmup}")
    resnet_size, graph_size = (RESNET_QUICK, GRAPH_QUICK) if quick else (RESNET_FULL, GRAPH_FULL)
    return {
        "native_xp": f"{native_xp.__name__} {native_xp.__version__}",
        "requests": requests,
        "warmup": warmup,
        "quick": quick,
        "resnet": run_resnet(session, native_xp, resnet_size, requests, warmup),
        "bfs": run_bfs(session, native_xp, graph_size, requests, warmup),
    }


# ----------------------------------------------------------------------------------- CLI
def table(results: dict[str, Any]) -> str:
    head = f"{'ms per request':<16}{'native p50/p99':>22}{'remoted p50/p99':>22}"
    head += f"{'slice compute p50':>20}{'overhead p50':>15}"
    lines = [head, "-" * len(head)]
    for name in ("resnet", "bfs"):
        r = results[name]
        n, m, c = r["native"], r["remoted"], r["remoted_slice_compute"]
        lines.append(
            f"{name:<16}{n['p50_ms']:>12.2f} / {n['p99_ms']:<7.2f}{m['p50_ms']:>12.2f} / "
            f"{m['p99_ms']:<7.2f}{c['p50_ms']:>20.2f}{r['overhead_p50_ms']:>15.2f}"
        )
    s, g = results["resnet"]["shape"], results["bfs"]["graph"]
    lines.append(
        f"resnet: batch {s['input']}, widths {s['widths']}, {s['convolutions']} convolutions, "
        f"{s['parameters']:,} parameters, {s['gflop_per_request']:.2f} GFLOP per request"
    )
    lines.append(
        f"bfs: {g['vertices']:,} vertices, {g['edges_directed']:,} directed edges; reached/depth "
        f"of the first source {results['bfs']['answers'][0]}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sim", "nvml"], default="sim")
    parser.add_argument("--quick", action="store_true", help="the small sizes (smoke test)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per workload")
    parser.add_argument("--warmup", type=int, help="untimed requests first (default: 10%%, >= 3)")
    parser.add_argument("--profile", help="slice profile to lease (default: the smallest free)")
    parser.add_argument("--out", help="JSON file (default: benchmarks/results/workloads-*.json)")
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else max(3, args.requests // 10)
    suffix = "-quick" if args.quick else ""
    out = Path(args.out or f"benchmarks/results/workloads-{args.backend}{suffix}.json")
    if args.backend == "nvml":
        import cupy

        native_xp: ModuleType = cupy
        broker_args = ["--backend", "nvml"]
    else:
        native_xp = np
        broker_args = ["--backend", "sim", "--sim-layout", LAYOUT]

    results: dict[str, Any] = {"machine": machine(), "backend": args.backend}
    results["load_average_before"] = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mig-workloads-") as tmp:
        broker = BrokerProcess(Path(tmp) / "state", broker_args)
        broker.start()
        try:
            broker.wait_for(all_free, timeout=180)
            session = mig_kernel.connect(args.profile, broker=broker.connection_file)
            try:
                results["slice"] = {
                    "profile": session.profile,
                    "isolation": session.isolation,
                    "memory_total": session.memory_total,
                }
                results.update(
                    run_workloads(
                        session, native_xp, requests=args.requests, warmup=warmup, quick=args.quick
                    )
                )
            finally:
                session.release()
        finally:
            broker.stop()
    results["total_s"] = time.perf_counter() - start
    results["load_average_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"slice {results['slice']}, native {results['native_xp']}")
    print(table(results))
    print(f"total {results['total_s']:.1f} s; wrote {out}")


if __name__ == "__main__":
    main()
