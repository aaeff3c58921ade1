"""Write an ImageNet-layout JPEG folder (train/<class>/*.jpg, val/<class>/*.jpg) from Fashion-MNIST.

Fashion-MNIST train images go to train/, test images to val/, `n_per_class` of each class drawn with
`stratified_sample`, upsampled to `image_size` and saved as RGB JPEGs named `<split>_<index>.jpg`
(`index` = position in the Fashion-MNIST split, so every file can be traced back). Class folders are
`00_t_shirt_top` ... `09_ankle_boot`, whose sorted order keeps Fashion-MNIST's label ids. With
`photos=True` an extra class `10_photo` holds the 20 real ImageNet photographs that the foolbox wheel
ships (10 in train, 10 in val), to exercise decoding and resizing of real, non-square images.

Command line: python -m data_pipelines.make_folder OUT [--image-size 64] [--train-per-class 8] ...
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

import torch
import torchvision.io

from data_pipelines.small_images import FASHION_MNIST_CLASSES, load_fashion_mnist
from data_pipelines.splits import stratified_sample
from data_pipelines.errors import DataError

PHOTO_CLASS = "10_photo"


def foolbox_data_dir() -> Path:
    """The sample-image folder of the installed foolbox wheel (found without importing foolbox)."""
    spec = importlib.util.find_spec("foolbox")
    folder = Path(spec.origin).parent / "data" if spec and spec.origin else None
    if folder is None or not folder.is_dir():
        raise DataError("The foolbox sample images are missing: pip install --no-deps foolbox==3.3.4.")
    return folder


def class_folder_names() -> list[str]:
    """Fashion-MNIST class folder names, in label order (which is also their sorted order)."""
    return [f"{i:02d}_{name}" for i, name in enumerate(FASHION_MNIST_CLASSES)]


def write_fashion_mnist_folder(
    out: str | Path,
    *,
    image_size: int = 64,
    train_per_class: int = 8,
    val_per_class: int = 4,
    seed: int = 0,
    quality: int = 90,
    photos: bool = False,
    fashion_root: str | Path | None = None,
) -> Path:
    """Write the folder (see module docstring) under `out` and return `out` as a Path."""
    if image_size < 8:
        raise DataError(f"image_size must be at least 8, got {image_size}.")
    out = Path(out)
    names = class_folder_names()
    for split, source, per_class in (("train", "train", train_per_class), ("val", "test", val_per_class)):
        data = load_fashion_mnist(source, fashion_root, channels=1)
        idx = stratified_sample(data.labels, per_class * data.num_classes, seed)
        grey = data.images[torch.from_numpy(idx), :, 2:30, 2:30].float()
        big = torch.nn.functional.interpolate(grey, size=(image_size, image_size), mode="bilinear", align_corners=False)
        rgb = big.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
        encoded = torchvision.io.encode_jpeg(list(rgb), quality=quality)
        for name in names:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for i, label, jpeg in zip(idx.tolist(), data.labels[idx].tolist(), encoded):
            (out / split / names[label] / f"{split}_{i:05d}.jpg").write_bytes(jpeg.numpy().tobytes())
    if photos:
        jpgs = sorted(foolbox_data_dir().glob("imagenet_*.jpg"))
        for split, files in (("train", jpgs[0::2]), ("val", jpgs[1::2])):
            (out / split / PHOTO_CLASS).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copyfile(f, out / split / PHOTO_CLASS / f.name)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.make_folder", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write (train/ and val/ are created inside)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-per-class", type=int, default=8)
    parser.add_argument("--val-per-class", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--photos", action="store_true", help="add the foolbox ImageNet photos as class 10_photo")
    parser.add_argument("--fashion-root", default=None, help="folder of the Fashion-MNIST *-ubyte.gz files")
    args = parser.parse_args(argv)
    try:
        out = write_fashion_mnist_folder(
            args.out,
            image_size=args.image_size,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            seed=args.seed,
            quality=args.quality,
            photos=args.photos,
            fashion_root=args.fashion_root,
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
