"""``cdvm image build``: build the microVM's kernel + initramfs (and guest llama.cpp) and print its digest."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs.image import (
    APT_ARCHIVES,
    BUSYBOX_PACKAGE,
    apt_package,
    build_image,
    default_image_dir,
    guest_llama_wheel,
    locate_deb,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    image = subparsers.add_parser("image", help="the microVM image (kernel + initramfs) of the microvm sandbox")
    commands = image.add_subparsers(dest="image_command", metavar="SUBCOMMAND", required=True)
    build = commands.add_parser("build", help="build the image reproducibly from Debian packages; print its digest")
    build.add_argument("--output", type=Path, metavar="DIR", help="image directory (default: <cache dir>/image)")
    build.add_argument("--kernel-deb", type=Path, metavar="FILE", help="kernel package (default: apt's linux-image-amd64)")
    build.add_argument("--busybox-deb", type=Path, metavar="FILE", help="busybox-static package (default: apt's)")
    build.add_argument("--offline", action="store_true", help="never download: use apt's archive and the image cache")
    build.add_argument("--no-llama", action="store_true", help="skip the guest's baseline llama.cpp build")
    build.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    build.set_defaults(handler=_build)


def _build(args: argparse.Namespace) -> int:
    cache = default_image_dir()
    debs = cache / "debs"

    def deb(explicit: Path | None, name: str) -> Path:
        if explicit is not None:
            return explicit
        return locate_deb(apt_package(name), [APT_ARCHIVES], debs, download=not args.offline)

    kernel_deb = deb(args.kernel_deb, "linux-image-amd64")
    busybox_deb = deb(args.busybox_deb, BUSYBOX_PACKAGE)
    wheel = None if args.no_llama else guest_llama_wheel(cache / "wheels", build=not args.offline)
    image = build_image(kernel_deb, busybox_deb, args.output or cache, llama_wheel=wheel)
    if args.json:
        print(json.dumps({"digest": image.digest, "directory": str(image.directory), "kernel": image.kernel_version,
                          "tee_support": list(image.tee_support), "inputs": dict(image.inputs)}))
    else:
        print(f"image {image.directory} (kernel {image.kernel_version}; guest TEE support: "
              f"{', '.join(image.tee_support) or 'none'})")
        print(image.digest)
    return 0
