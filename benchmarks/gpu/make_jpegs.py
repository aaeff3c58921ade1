"""An ImageNet-layout folder of real-sized JPEGs for DALI throughput runs: `OUT/{train,val}/<class>/*.jpg`.

Each image is a random crop (30-100 % of the area, aspect 3:4 to 4:3) of one of the 20 ImageNet
photographs the foolbox wheel ships, possibly mirrored, resized so that its shorter side is
256-500 px (ImageNet's typical sizes), and encoded as a JPEG at quality 90 (~60-150 KB). The
labels mean nothing; the bytes DALI decodes are real photographs at real sizes.

    python benchmarks/gpu/make_jpegs.py --out .gpu-stage/jpegs --classes 100 --train 30 --val 3
"""

from __future__ import annotations

import argparse
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torchvision.io
from torchvision.transforms.v2 import functional as TF


def photos() -> list[torch.Tensor]:
    from data_pipelines.make_folder import foolbox_data_dir

    files = sorted(foolbox_data_dir().glob("imagenet_*"))
    return [torchvision.io.decode_image(torchvision.io.read_file(str(f)), mode=torchvision.io.ImageReadMode.RGB)
            for f in files]


def variant(photo: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    _, h, w = photo.shape
    area = h * w * (0.3 + 0.7 * torch.rand((), generator=g).item())
    aspect = math.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand((), generator=g).item())
    ch, cw = min(h, round(math.sqrt(area / aspect))), min(w, round(math.sqrt(area * aspect)))
    top = int(torch.randint(0, h - ch + 1, (), generator=g))
    left = int(torch.randint(0, w - cw + 1, (), generator=g))
    crop = photo[:, top:top + ch, left:left + cw]
    if torch.rand((), generator=g) < 0.5:
        crop = crop.flip(-1)
    shorter = int(torch.randint(256, 501, (), generator=g))
    return TF.resize(crop, shorter, antialias=True)


def write(out: Path, classes: int, train: int, val: int, seed: int = 0) -> int:
    sources = photos()
    jobs = [(split, c, i) for split, n in (("train", train), ("val", val)) for c in range(classes) for i in range(n)]

    def one(job: tuple[str, int, int]) -> None:
        split, c, i = job
        path = out / split / f"c{c:04d}" / f"{split}_{c:04d}_{i:04d}.jpg"
        if path.is_file():
            return
        g = torch.Generator().manual_seed(((seed * 2 + (split == "val")) * 100_003 + c) * 10_007 + i)
        image = variant(sources[(c * 7 + i) % len(sources)], g)
        path.parent.mkdir(parents=True, exist_ok=True)
        torchvision.io.write_file(str(path), torchvision.io.encode_jpeg(image, quality=90))

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(one, jobs))
    return len(jobs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--train", type=int, default=30, help="images per class in train/")
    p.add_argument("--val", type=int, default=3, help="images per class in val/")
    args = p.parse_args()
    n = write(args.out, args.classes, args.train, args.val)
    size = sum(f.stat().st_size for f in args.out.rglob("*.jpg"))
    print(f"{n} JPEGs under {args.out} ({size / 2**20:.0f} MiB, {size / max(n, 1) / 1024:.0f} KiB each)")


if __name__ == "__main__":
    main()
