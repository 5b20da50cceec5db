#!/usr/bin/env python3
"""Exports torchvision's ResNet-18 (224², 1.8 GMAC) with seeded random weights and its
BatchNorms kept, for timing only (scripts/bench): the runtime's speed does not depend on what
the weights are.

  export_resnet18.py OUT.onnx

Needs torch and torchvision (CPU is enough)."""
import sys
import torch
import torchvision

out = sys.argv[1]
torch.manual_seed(0)
m = torchvision.models.resnet18()
m.eval()
torch.onnx.export(
    m, torch.zeros(1, 3, 224, 224), out, input_names=["input"], output_names=["logits"],
    opset_version=13, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
    do_constant_folding=False,
)
print(f"wrote {out}")
