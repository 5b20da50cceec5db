#!/usr/bin/env python3
"""Train the two fixture CNNs on Fashion-MNIST and export them to ONNX with BatchNorm kept.

Usage: scripts/make_fixtures.py [OUT_DIR]   (default examples/models)

Data: the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
Inputs are normalized: x = (pixel/255 - 0.2860) / 0.3530, shape (N, 1, 28, 28).
Writes, per model: NAME.onnx, NAME.sample.npy (8 test images, normalized),
NAME.ort.npy (onnxruntime's logits on them) and a line in fixtures.json with the test accuracy.
"""
import gzip, json, os, sys, time
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530


def load(kind):
    with gzip.open(f"{DATA}/{kind}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(f"{DATA}/{kind}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    x = (x.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def conv_bn(cin, cout, k, s=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class Basic(nn.Module):
    def __init__(self, cin, cout, s):
        super().__init__()
        self.c1 = conv_bn(cin, cout, 3, s)
        self.c2 = conv_bn(cout, cout, 3)
        self.short = conv_bn(cin, cout, 1, s) if (s != 1 or cin != cout) else None

    def forward(self, x):
        y = self.c2(F.relu(self.c1(x)))
        return F.relu(y + (self.short(x) if self.short is not None else x))


class ResNet(nn.Module):
    """ResNet-style: residual Adds, strided 1x1 shortcut convs, GAP, Gemm."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(1, 16, 3)
        self.layers = nn.Sequential(Basic(16, 16, 1), Basic(16, 32, 2), Basic(32, 64, 2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.layers(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvRes(nn.Module):
    def __init__(self, cin, exp, cout, s, se):
        super().__init__()
        self.expand = conv_bn(cin, exp, 1)
        self.dw = conv_bn(exp, exp, 3, s, groups=exp)
        self.se = SE(exp) if se else nn.Identity()
        self.project = conv_bn(exp, cout, 1)
        self.res = s == 1 and cin == cout

    def forward(self, x):
        y = F.hardswish(self.expand(x))
        y = self.project(self.se(F.hardswish(self.dw(y))))
        return x + y if self.res else y


class MobileNet(nn.Module):
    """MobileNetV3-style: depthwise convs, HardSwish, squeeze-excitation."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(1, 16, 3)
        self.blocks = nn.Sequential(
            InvRes(16, 32, 24, 2, True),
            InvRes(24, 64, 24, 1, False),
            InvRes(24, 72, 40, 2, True),
            InvRes(40, 120, 40, 1, True),
        )
        self.head = conv_bn(40, 96, 1)
        self.fc = nn.Linear(96, 10)

    def forward(self, x):
        x = self.blocks(F.hardswish(self.stem(x)))
        x = self.head(x)
        x = x * F.relu6(x + 3.0) / 6.0  # decomposed HardSwish, as some exporters write it
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))  # Shape/Gather/Concat/Reshape subgraph


def train(model, xtr, ytr, epochs, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * (len(xtr) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        t0 = time.time()
        for i in range(0, len(xtr) - 127, 128):
            idx = perm[i:i + 128]
            xb = xtr[idx]
            flip = torch.rand(len(xb), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"  epoch {ep}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()


@torch.no_grad()
def accuracy(model, x, y):
    return sum((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item() for i in range(0, len(x), 1000)) / len(x)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "examples/models"
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    xtr, ytr = load("train")
    xte, yte = load("t10k")
    import onnxruntime as ort

    meta_path = f"{out}/fixtures.json"
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    only = os.environ.get("MODELS", "resnet_fmnist,mobilenet_fmnist").split(",")
    for name, cls, opset, dynamic, epochs in [("resnet_fmnist", ResNet, 13, False, 4), ("mobilenet_fmnist", MobileNet, 17, True, 2)]:
        if name not in only:
            continue
        print(f"training {name}", flush=True)
        model = cls()
        train(model, xtr, ytr, epochs=epochs, seed=0)
        acc = accuracy(model, xte, yte)
        path = f"{out}/{name}.onnx"
        kw = dict(dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}) if dynamic else {}
        torch.onnx.export(model, torch.zeros(1, 1, 28, 28), path, input_names=["input"], output_names=["logits"],
                          opset_version=opset, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False, **kw)
        sample = xte[:8].numpy() if dynamic else xte[:1].numpy()
        np.save(f"{out}/{name}.sample.npy", sample)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        np.save(f"{out}/{name}.ort.npy", sess.run(None, {"input": sample})[0])
        ort_acc = np.mean(np.concatenate([sess.run(None, {"input": xte[i:i + 1].numpy()})[0].argmax(1)
                                          for i in range(0, 2000)]) == yte[:2000].numpy())
        meta[name] = {"fp32_test_top1": round(acc, 4), "opset": opset, "test_images": len(xte), "epochs": epochs,
                      "params": sum(p.numel() for p in model.parameters()), "ort_top1_first2000": round(float(ort_acc), 4)}
        print(name, meta[name], flush=True)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
