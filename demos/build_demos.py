"""Writes the demo notebooks of this folder: quickstart.ipynb and cnn_inference.ipynb.

Run it after editing a cell here (``python demos/build_demos.py``); the notebooks are written
without outputs, with fixed cell ids so that a rebuild changes only what was edited. Cells whose
output the notebook tests check carry the tag ``mig-check``.

Each notebook has one cell tagged ``parameters`` (papermill's convention) holding every value a
run may change; the cells after it read those names only, so ``papermill -p N_POINTS 1024``
(which adds its own cell after that one) changes the whole run.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
CHECK = "mig-check"
PARAMETERS = "parameters"  # papermill injects its values in a cell right after this one

# The name `mig-kernel lab` installs; its copy of the demos carries the installed display name.
KERNELSPEC = {"name": "mig-python3", "display_name": "GPU slice (any)", "language": "python"}

# A cell is (kind, id, source) or (kind, id, source, tags); kind is "md" or "code".
Cell = tuple

QUICKSTART: list[Cell] = [
    (
        "md",
        "intro",
        """\
# mig-kernel quickstart

This notebook runs in the **mig-python3** kernel. The kernel itself has no GPU: when it started
it leased a *slice* of a GPU from the node broker, all of its own. Depending on the machine that
slice is a MIG instance of a MIG-enabled card, a memory-capped share of a GPU without MIG, or a
simulated slice that runs on the CPU with NumPy (laptops, CI). Cells marked `%%gpufunc` run on
the slice; every other cell runs in the kernel as usual.

Run the cells from top to bottom: each step is one explanation and one cell.""",
    ),
    (
        "md",
        "status-md",
        """\
## 1. Which slice do I hold?

`%gpu status` shows the slice this kernel holds: its id, its profile (such as `1g.10gb`), its
**isolation** level, memory in use out of the slice's total, how many seconds it has been idle,
and the lease id. Isolation tells you what you share with other users:

- `mig`: a MIG instance with its own SMs, L2 cache, memory and fault domain;
- `process`: your own CUDA context and memory cap on a GPU whose SMs are shared;
- `sim`: a simulated slice, run with NumPy on the CPU.""",
    ),
    ("code", "status", "%gpu status", [CHECK]),
    (
        "md",
        "data-md",
        """\
## 2. Data in the notebook

Ordinary cells: they run in the kernel, on the CPU, exactly as in any Python notebook. The first
holds the notebook's parameters (tagged `parameters`, so `papermill -p N_POINTS 1024` runs it
with other values).""",
    ),
    (
        "code",
        "parameters",
        """\
N_POINTS = 4096  # length of the signal
SEED = 0  # of the random generator""",
        [PARAMETERS],
    ),
    (
        "code",
        "data",
        """\
import numpy as np

import mig_kernel

rng = np.random.default_rng(SEED)
x = rng.standard_normal(N_POINTS)
print(x.shape, x.dtype)""",
    ),
    (
        "md",
        "fft-md",
        """\
## 3. A cell on the slice

A cell that starts with `%%gpufunc` runs on your slice. Names it reads from the notebook are
shipped in (NumPy arrays through shared memory), and names it assigns come back. Inside the cell
`xp` is the slice's array module, with no import: CuPy on a GPU slice, NumPy on a simulated one.
`print` output shows up while the cell runs.""",
    ),
    (
        "code",
        "fft",
        """\
%%gpufunc
y = xp.fft.fft(xp.asarray(x)).real
print(f"FFT of {x.shape[0]} points with {xp.__name__} on the slice")""",
        [CHECK],
    ),
    (
        "md",
        "remote-md",
        """\
`y` stayed on the slice. The notebook holds a `mig_kernel.RemoteArray`: a handle with `.shape`
and `.dtype`, whose `.get()` copies the data to the host as a NumPy array. Compare it with NumPy
on the CPU (the host copy `y_host` is used again further down):""",
    ),
    (
        "code",
        "fft-check",
        """\
print(type(y).__name__, y.shape, y.dtype)
assert isinstance(y, mig_kernel.RemoteArray)
y_host = y.get()
assert np.allclose(y_host, np.fft.fft(x).real)
print("y matches np.fft.fft(x).real")""",
        [CHECK],
    ),
    (
        "md",
        "handles-md",
        """\
## 4. Handles pass between GPU cells

A later `%%gpufunc` cell that reads `y` gets the device array itself: only the handle travels,
the data never leaves the slice.""",
    ),
    (
        "code",
        "double",
        """\
%%gpufunc
z = y * 2
print("on the slice y is a", xp.__name__, "array")""",
    ),
    (
        "code",
        "double-check",
        """\
assert isinstance(z, mig_kernel.RemoteArray)
assert np.allclose(z.get(), 2 * y_host)
print("z = 2 * y, computed on the slice:", type(z).__name__, z.shape)""",
        [CHECK],
    ),
    (
        "md",
        "decorator-md",
        """\
## 5. Plain functions on the slice

`@mig_kernel.gpufunc` makes a function run on your slice whenever it is called, from any cell.
Arguments travel like a cell's inputs (NumPy arrays through shared memory, `RemoteArray`s as
handles); array results stay on the slice as `RemoteArray`s, or come back as NumPy arrays with
`@mig_kernel.gpufunc(to_host=True)`. Here the standardized matrix never leaves the slice: only
the small correlation matrix comes back.""",
    ),
    (
        "code",
        "decorator",
        """\
@mig_kernel.gpufunc
def standardize(a):
    a = xp.asarray(a)
    return (a - a.mean(axis=0)) / a.std(axis=0)


@mig_kernel.gpufunc(to_host=True)
def correlation(a):
    return a.T @ a / a.shape[0]


m = rng.standard_normal((2000, 64))
s = standardize(m)  # a RemoteArray: stays on the slice
c = correlation(s)  # the handle goes in, a NumPy array comes out
print(type(s).__name__, s.shape, "->", type(c).__name__, c.shape)

m_std = (m - m.mean(axis=0)) / m.std(axis=0)
assert isinstance(s, mig_kernel.RemoteArray) and isinstance(c, np.ndarray)
assert np.allclose(c, m_std.T @ m_std / m.shape[0])
print("correlation matrix matches NumPy")""",
        [CHECK],
    ),
    (
        "md",
        "display-md",
        """\
## 6. The last expression is shown

As in any cell, the value of a `%%gpufunc` cell's last expression is displayed.""",
    ),
    (
        "code",
        "display",
        """\
%%gpufunc
float(xp.abs(y).sum())""",
        [CHECK],
    ),
    (
        "md",
        "idle-md",
        """\
## 7. Going idle: the slice goes back, your data stays

A slice is shared hardware. When this kernel has done no GPU work for the broker's
`idle_timeout`, the broker takes the slice back for someone else: your device arrays are first
spilled to host storage that belongs to you, then the slice's executor is stopped. Nothing
changes in the notebook. The next GPU cell leases a slice again (perhaps another one), restores
the arrays, and says so in one line starting with `mig-kernel: slice re-acquired`; your
`RemoteArray` variables work as before.

`%gpu release` does the same right now, which is polite before a long break. First keep a host
copy of `y`, to check the round trip.""",
    ),
    (
        "code",
        "release",
        """\
y_host = y.get()  # a host copy taken before the release
%gpu release""",
    ),
    (
        "md",
        "reacquire-md",
        """\
This cell needs the GPU again, so it leases a slice first and brings `y`, `z` and `s` back onto
it:""",
    ),
    (
        "code",
        "reacquire",
        """\
%%gpufunc
w = y + 1""",
        [CHECK],
    ),
    (
        "code",
        "reacquire-check",
        """\
assert isinstance(w, mig_kernel.RemoteArray)
assert np.allclose(w.get(), y_host + 1)
assert np.allclose(z.get(), 2 * y_host)
print("after the release: w = y + 1 and z = 2 * y, nothing lost")""",
        [CHECK],
    ),
    (
        "md",
        "status-end-md",
        """\
## 8. Status again

A new lease (a new lease id, perhaps another slice), holding the restored arrays. `%gpu monitor`
shows every slice of the node and who holds it.""",
    ),
    ("code", "status-end", "%gpu status", [CHECK]),
    ("code", "done", 'print("QUICKSTART OK")', [CHECK]),
]

CNN: list[Cell] = [
    (
        "md",
        "intro",
        """\
# CNN inference on a GPU slice

A small convolutional network classifies a batch of synthetic 28x28 images on this kernel's
slice. Its functions are written against an array module passed in as `xp`, so the same code
runs with CuPy on a GPU slice, with NumPy on a simulated slice, and with NumPy on the host for a
reference. The weights are random (seeded), not trained: the classes mean nothing, the point is
that the slice computes exactly what NumPy computes, and how fast.

Network: conv 3x3 (1 -> 8) -> ReLU -> max-pool 2x2 -> conv 3x3 (8 -> 16) -> ReLU -> max-pool
2x2 -> dense (400 -> 10) -> softmax.""",
    ),
    (
        "md",
        "data-md",
        """\
## 1. Images and weights, made on the host

Rings, squares, crosses and strokes with noise, normalized as one would normalize MNIST; and
He-initialized weights from a seeded generator. Ordinary cells, running in the kernel; the
first holds the notebook's parameters (tagged `parameters`, for papermill).""",
    ),
    (
        "code",
        "parameters",
        """\
N_IMAGES = 256  # images in the batch
REPS = 10  # timed passes over the batch
STREAM_CHUNKS = 4  # pipelined calls in section 7, each of N_IMAGES images""",
        [PARAMETERS],
    ),
    (
        "code",
        "images",
        """\
import numpy as np

import mig_kernel

MEAN, STD = 0.1, 0.25  # normalization of the pixel values


def render_images(n, rng, size=28):
    \"\"\"n noisy single-channel images (rings, squares, crosses, strokes), float32 in [0, 1].\"\"\"
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((n, size, size), np.float32)
    for i in range(n):
        cy, cx = rng.uniform(9, 19, 2)
        r = rng.uniform(4, 8)
        kind = i % 4
        if kind == 0:  # ring
            img = np.exp(-((np.hypot(yy - cy, xx - cx) - r) ** 2) / 2)
        elif kind == 1:  # square outline
            img = np.exp(-((np.maximum(abs(yy - cy), abs(xx - cx)) - r) ** 2) / 2)
        elif kind == 2:  # cross
            bar_h = np.exp(-((yy - cy) ** 2) / 2) * (abs(xx - cx) < r)
            bar_v = np.exp(-((xx - cx) ** 2) / 2) * (abs(yy - cy) < r)
            img = np.maximum(bar_h, bar_v)
        else:  # stroke
            t = rng.uniform(-1, 1)
            d = abs((yy - cy) - t * (xx - cx)) / np.sqrt(1 + t * t)
            img = np.exp(-(d**2) / 2) * (np.hypot(yy - cy, xx - cx) < r + 2)
        images[i] = img + 0.05 * rng.standard_normal((size, size))
    return np.clip(images, 0.0, 1.0).astype(np.float32)


def preprocess(raw):
    return ((raw - MEAN) / STD).astype(np.float32)


def preview(raw, count=4):
    \"\"\"The first images as text, at half resolution.\"\"\"
    shades = np.array(list(" .:-=+*#%@"))
    levels = (raw[:count, ::2, ::2] * 9.99).astype(int)
    for row in range(levels.shape[1]):
        print("   ".join("".join(shades[img[row]]) for img in levels))


raw = render_images(N_IMAGES, np.random.default_rng(2))
images = preprocess(raw)
print(images.shape, images.dtype)
preview(raw)""",
    ),
    (
        "code",
        "weights",
        """\
def he_init(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


rng = np.random.default_rng(0)
w1_host = he_init(rng, (8, 1, 3, 3), 9)  # conv 1 -> 8
b1_host = np.full(8, 0.01, np.float32)
w2_host = he_init(rng, (16, 8, 3, 3), 72)  # conv 8 -> 16
b2_host = np.full(16, 0.01, np.float32)
w3_host = he_init(rng, (16 * 5 * 5, 10), 400)  # dense 400 -> 10
b3_host = np.zeros(10, np.float32)""",
    ),
    (
        "md",
        "network-md",
        """\
## 2. The network, defined on the slice

Functions defined in a `%%gpufunc` cell come back to the notebook as plain Python functions.
Each takes the array module as its first argument: cells on the slice pass their `xp`, the host
reference below passes `np`, and both run the very same code. The convolution is im2col by
`sliding_window_view` followed by one `tensordot`, which CuPy and NumPy both provide.

(Keep the name `xp` free in the notebook itself: a function defined in an ordinary cell and run
on the slice would carry a notebook `xp` along, in place of the slice's own module.)""",
    ),
    (
        "code",
        "network",
        """\
%%gpufunc
def conv2d(xp, x, w, b):
    \"\"\"Valid convolution, stride 1: x (N, C, H, W), w (O, C, kh, kw) -> (N, O, H', W').\"\"\"
    windows = xp.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))
    out = xp.tensordot(windows, w, axes=([1, 4, 5], [1, 2, 3]))  # (N, H', W', O)
    return out.transpose(0, 3, 1, 2) + b.reshape(1, -1, 1, 1)


def relu(xp, x):
    return xp.maximum(x, 0)


def maxpool2x2(xp, x):
    n, c, h, w = x.shape
    x = x[:, :, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def softmax(xp, z):
    e = xp.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def forward(xp, imgs, w1, b1, w2, b2, w3, b3):
    \"\"\"imgs (N, 28, 28) -> class probabilities (N, 10).\"\"\"
    h = imgs[:, None, :, :]
    h = maxpool2x2(xp, relu(xp, conv2d(xp, h, w1, b1)))  # (N, 8, 13, 13)
    h = maxpool2x2(xp, relu(xp, conv2d(xp, h, w2, b2)))  # (N, 16, 5, 5)
    return softmax(xp, h.reshape(h.shape[0], -1) @ w3 + b3)


print("network defined; the slice runs", xp.__name__)""",
    ),
    (
        "md",
        "upload-md",
        """\
## 3. Upload the weights once

The cell reads the host arrays (shipped through shared memory) and puts them on the device; the
names it assigns come back as `RemoteArray` handles. Later cells pass the handles: the weights
stay on the slice.""",
    ),
    (
        "code",
        "upload",
        """\
%%gpufunc
w1 = xp.asarray(w1_host)
b1 = xp.asarray(b1_host)
w2 = xp.asarray(w2_host)
b2 = xp.asarray(b2_host)
w3 = xp.asarray(w3_host)
b3 = xp.asarray(b3_host)
n_params = w1.size + b1.size + w2.size + b2.size + w3.size + b3.size
print(f"{n_params} parameters on the slice")""",
        [CHECK],
    ),
    (
        "code",
        "upload-check",
        """\
assert all(isinstance(a, mig_kernel.RemoteArray) for a in (w1, b1, w2, b2, w3, b3))
print("weights held on the slice:", w1.shape, w2.shape, w3.shape)""",
        [CHECK],
    ),
    (
        "md",
        "timed-md",
        """\
## 4. Inference on the slice, timed

The batch goes to the device once. The first pass is a warm-up (a GPU slice compiles its
kernels there); then `REPS` timed passes. `float(probs_dev.sum())` waits for the device to
finish before the clock stops (each row sums to 1, so it is about `N_IMAGES`). The results stay
on the slice.""",
    ),
    (
        "code",
        "timed",
        """\
%%gpufunc
import time

batch = xp.asarray(images)
forward(xp, batch, w1, b1, w2, b2, w3, b3)  # warm-up
reps = REPS
t0 = time.perf_counter()
for _rep in range(reps):
    probs_dev = forward(xp, batch, w1, b1, w2, b2, w3, b3)
checksum = float(probs_dev.sum())  # waits for the device
elapsed = time.perf_counter() - t0
rate = reps * batch.shape[0] / elapsed
print(f"{batch.shape[0]} images x {reps} passes on {xp.__name__}: {rate:,.0f} images/s")""",
        [CHECK],
    ),
    (
        "md",
        "to-host-md",
        """\
## 5. Probabilities back to the notebook

With `--to-host` the arrays a cell assigns come back as NumPy arrays instead of handles. `batch`
is already on the slice, so only its handle travels in.""",
    ),
    (
        "code",
        "to-host",
        """\
%%gpufunc --to-host
probs = forward(xp, batch, w1, b1, w2, b2, w3, b3)""",
    ),
    (
        "code",
        "to-host-check",
        """\
pred = probs.argmax(axis=1)
print(type(probs).__name__, probs.shape, probs.dtype)
print("images per predicted class:", np.bincount(pred, minlength=10).tolist())""",
        [CHECK],
    ),
    (
        "md",
        "reference-md",
        """\
## 6. The same functions on the host

`forward` came back from the slice as a plain function. Called with `np` and the host weights it
computes the reference in the kernel, on the CPU. Same probabilities (float32), same classes.""",
    ),
    (
        "code",
        "reference",
        """\
ref = forward(np, images, w1_host, b1_host, w2_host, b2_host, w3_host, b3_host)
assert probs.shape == (N_IMAGES, 10) and probs.dtype == np.float32
assert np.allclose(probs, ref, atol=1e-4)
assert np.array_equal(pred, ref.argmax(axis=1))
print(f"slice and host agree on {N_IMAGES} images: max |diff| {np.abs(probs - ref).max():.1e}")""",
        [CHECK],
    ),
    (
        "md",
        "stream-md",
        """\
## 7. Streaming more images: pipelined calls

For data that arrives in chunks, `mig_kernel.current_session()` gives this kernel's `Session`.
`submit` returns a future at once, so the next chunk is staged into shared memory while the
slice still computes the previous one. `classify` is defined in an ordinary cell and uses `xp`
without defining it: on the slice, `xp` is the slice's array module.""",
    ),
    (
        "code",
        "stream",
        """\
def classify(chunk, w1, b1, w2, b2, w3, b3):
    return forward(xp, xp.asarray(chunk), w1, b1, w2, b2, w3, b3)


session = mig_kernel.current_session()
stream = preprocess(render_images(STREAM_CHUNKS * N_IMAGES, np.random.default_rng(3)))
chunks = np.split(stream, STREAM_CHUNKS)
futures = [session.submit(classify, c, w1, b1, w2, b2, w3, b3, to_host=True) for c in chunks]
stream_probs = np.concatenate([f.result() for f in futures])

stream_ref = forward(np, stream, w1_host, b1_host, w2_host, b2_host, w3_host, b3_host)
assert np.allclose(stream_probs, stream_ref, atol=1e-4)
assert np.array_equal(stream_probs.argmax(axis=1), stream_ref.argmax(axis=1))
print(f"{len(stream)} images in {len(chunks)} pipelined calls on {session.profile}", end=" ")
print(f"({session.isolation}): same classes as the host")""",
        [CHECK],
    ),
    ("code", "done", 'print(f"CNN OK {N_IMAGES + len(stream)} images")', [CHECK]),
]


def build(cells: list[Cell]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    for kind, cell_id, source, *rest in cells:
        tags = rest[0] if rest else []
        make = new_markdown_cell if kind == "md" else new_code_cell
        cell = make(source=source, id=cell_id)
        if tags:
            cell.metadata["tags"] = list(tags)
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main() -> None:
    for name, cells in (("quickstart", QUICKSTART), ("cnn_inference", CNN)):
        path = HERE / f"{name}.ipynb"
        nbformat.write(build(cells), path)
        print("wrote", path)


if __name__ == "__main__":
    main()
