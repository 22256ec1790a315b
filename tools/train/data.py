"""Fashion-MNIST loader (IDX format, optionally gzip'd), numpy only.

Images: 28x28 uint8, padded with the background value (0) by 2 px on each side to
32x32, then scaled to [-1, 1] with x/255*2-1 (so the padding is exactly -1).
"""
import gzip
import os

import numpy as np

DATA_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")


def _open(path):
    if os.path.exists(path):
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    if os.path.exists(path + ".gz"):
        return gzip.open(path + ".gz", "rb")
    raise FileNotFoundError(path)


def read_idx(path):
    with _open(path) as f:
        buf = f.read()
    zero, dtype_code, ndim = buf[0] * 256 + buf[1], buf[2], buf[3]
    assert zero == 0 and dtype_code == 0x08, f"unsupported IDX header in {path}"
    shape = tuple(int.from_bytes(buf[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(buf, dtype=np.uint8, offset=4 + 4 * ndim)
    assert data.size == int(np.prod(shape)), f"size mismatch in {path}"
    return data.reshape(shape)


def load(split="train", data_dir=DATA_DIR):
    """Returns (images float32 [N,1,32,32] in [-1,1], labels int64 [N])."""
    prefix = "train" if split == "train" else "t10k"
    imgs = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte"))
    imgs = np.pad(imgs, ((0, 0), (2, 2), (2, 2)), mode="constant", constant_values=0)
    x = (imgs.astype(np.float32) / 255.0 * 2.0 - 1.0)[:, None, :, :]
    return np.ascontiguousarray(x), labels.astype(np.int64)


if __name__ == "__main__":
    for s in ("train", "test"):
        x, y = load(s)
        print(s, x.shape, x.dtype, float(x.min()), float(x.max()), y.shape, np.bincount(y))
