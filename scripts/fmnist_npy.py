#!/usr/bin/env python3
"""Writes the first N Fashion-MNIST test images as a float32 .npy (N, 1, 28, 28), normalized as
the fixtures were trained, and their labels as one line of integers.

    scripts/fmnist_npy.py N images.npy labels.txt
"""
import gzip
import sys

import numpy as np

DATA = "/usr/share/datasets/fashion-mnist"
n, out, labels_out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
raw = gzip.open(f"{DATA}/t10k-images-idx3-ubyte.gz").read()[16 : 16 + n * 784]
labels = gzip.open(f"{DATA}/t10k-labels-idx1-ubyte.gz").read()[8 : 8 + n]
pixels = np.frombuffer(raw, dtype=np.uint8).astype(np.float64)
images = ((pixels / 255.0 - 0.2860) / 0.3530).astype("<f4").reshape(n, 1, 28, 28)
with open(out, "wb") as f:  # np.save(path) would append ".npy" to other names
    np.save(f, images)
with open(labels_out, "w") as f:
    f.write(" ".join(str(v) for v in labels) + "\n")
