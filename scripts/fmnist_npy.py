#!/usr/bin/env python3
"""Writes the first N Fashion-MNIST test images as a float32 .npy (N, 1, 28, 28), normalized as
the fixtures were trained, and their labels as one line of integers.

    scripts/fmnist_npy.py N images.npy labels.txt
"""
import gzip
import struct
import sys

DATA = "/usr/share/datasets/fashion-mnist"
n, out, labels_out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
raw = gzip.open(f"{DATA}/t10k-images-idx3-ubyte.gz").read()[16 : 16 + n * 784]
labels = gzip.open(f"{DATA}/t10k-labels-idx1-ubyte.gz").read()[8 : 8 + n]
vals = [(p / 255.0 - 0.2860) / 0.3530 for p in raw]
hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, 1, 28, 28), }" % n
hdr += " " * (118 - len(hdr)) + "\n"
with open(out, "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr.encode())
    f.write(struct.pack("<%df" % len(vals), *vals))
with open(labels_out, "w") as f:
    f.write(" ".join(str(v) for v in labels) + "\n")
