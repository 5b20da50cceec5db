#!/usr/bin/env python3
"""onnxruntime as the yardstick of scripts/bench: one thread, batch 1.

    python3 scripts/ort_bench.py quantize MODEL.onnx INPUTS.npy OUT.onnx
    python3 scripts/ort_bench.py time MODEL.onnx INPUTS.npy

`quantize` writes onnxruntime's static int8 quantization of the model (QDQ, uint8
activations, per-channel int8 weights, calibrated on the inputs); `time` prints the median
milliseconds per sample over the inputs, after three warm-up runs. Needs
`pip install onnxruntime`."""
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

mode, model, inputs = sys.argv[1:4]
x = np.load(inputs).astype(np.float32)
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
providers = ["CPUExecutionProvider"]
name = ort.InferenceSession(model, so, providers=providers).get_inputs()[0].name

if mode == "quantize":
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.it, None)

    d = tempfile.mkdtemp()
    quant_pre_process(model, d + "/pre.onnx")
    quantize_static(d + "/pre.onnx", sys.argv[4], Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
elif mode == "time":
    s = ort.InferenceSession(model, so, providers=providers)
    for i in range(min(3, len(x))):
        s.run(None, {name: x[i:i + 1]})
    t = []
    for i in range(len(x)):
        t0 = time.perf_counter()
        s.run(None, {name: x[i:i + 1]})
        t.append(time.perf_counter() - t0)
    print("%.2f" % (1000 * float(np.median(t))))
else:
    sys.exit("ort_bench.py: the mode is quantize or time, not " + mode)
