#!/usr/bin/env python3
"""onnxruntime's latency on one thread, batch 1, as the yardstick of scripts/bench.

    python3 scripts/ort_bench.py MODEL.onnx INPUTS.npy

Prints the median milliseconds per sample of the FP32 model and of onnxruntime's static int8
quantization of it (QDQ, uint8 activations, per-channel int8 weights, calibrated on the
inputs), one line each: `fp32 MS` and `int8 MS`. Needs `pip install onnxruntime`."""
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

model, inputs = sys.argv[1], sys.argv[2]
x = np.load(inputs).astype(np.float32)
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
providers = ["CPUExecutionProvider"]
name = ort.InferenceSession(model, so, providers=providers).get_inputs()[0].name


class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = iter([{name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.it, None)


d = tempfile.mkdtemp()
quant_pre_process(model, d + "/pre.onnx")
quantize_static(d + "/pre.onnx", d + "/int8.onnx", Reader(), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8)
for label, path in [("fp32", model), ("int8", d + "/int8.onnx")]:
    s = ort.InferenceSession(path, so, providers=providers)
    for i in range(min(3, len(x))):
        s.run(None, {name: x[i:i + 1]})
    t = []
    for i in range(len(x)):
        t0 = time.perf_counter()
        s.run(None, {name: x[i:i + 1]})
        t.append(time.perf_counter() - t0)
    print(label, "%.2f" % (1000 * float(np.median(t))))
