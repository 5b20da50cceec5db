#!/usr/bin/env python3
"""onnxruntime's static int8 quantization as a yardstick for the README's real-model table.

    python3 scripts/ort_int8_baseline.py MODEL.onnx INPUTS.npy

Quantizes MODEL with onnxruntime.quantization (QDQ, uint8 activations, int8 weights,
per-channel and per-tensor), calibrated on 64 of the inputs themselves (real data: more than
diffdfq ever sees), and prints each model's top-1 agreement with the FP32 model on all inputs.
Needs `pip install onnxruntime` (not installed by scripts/setup; no test uses it).
"""
import sys
import tempfile

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

model, inputs = sys.argv[1], sys.argv[2]
x = np.load(inputs).astype(np.float32)
providers = ["CPUExecutionProvider"]
name = ort.InferenceSession(model, providers=providers).get_inputs()[0].name


def top1(path):
    s = ort.InferenceSession(path, providers=providers)
    return np.array([s.run(None, {name: x[i:i + 1]})[0].ravel().argmax() for i in range(len(x))])


class Reader(CalibrationDataReader):
    """64 inputs spread over the set."""

    def __init__(self):
        self.idx = list(np.linspace(0, len(x) - 1, min(64, len(x))).astype(int))

    def get_next(self):
        return {name: x[self.idx.pop(0)][None]} if self.idx else None


fp32 = top1(model)
with tempfile.TemporaryDirectory() as d:
    pre, q = f"{d}/pre.onnx", f"{d}/q.onnx"
    quant_pre_process(model, pre)
    for per_channel in (True, False):
        quantize_static(pre, q, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        agree = 100.0 * (top1(q) == fp32).mean()
        print(f"{model}: onnxruntime int8 ({'per-channel' if per_channel else 'per-tensor'} "
              f"weights) agrees with FP32 on {agree:.1f} % of {len(x)} inputs")
