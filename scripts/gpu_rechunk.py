"""Re-cut the GPU staging chunks so that each call fits the device tool's 64 MiB carry limit.

``../shared/gpu/prepare.sh`` writes ``.gpu/c1 ... .gpu/cN`` of ~58 MB each (wheels split into
60 MB parts). With this project's own tree (~9 MB of tracked files travel with every call) a
chunk no longer fits. This joins the split wheels, splits them again into ``--part-mb`` parts and
packs every file into ``.gpu/d1 ... .gpu/dM`` of at most ``--chunk-mb`` (first fit, largest
first); ``install.sh`` goes into the last one, which joins the parts again on the GPU machine.

    python scripts/gpu_rechunk.py            # .gpu/c* -> .gpu/d*
    # then one call per chunk, back to back: mkdir -p /tmp/stage && cp .gpu/d1/* /tmp/stage/ ...
    # and with the last: cp .gpu/dM/* /tmp/stage/ && bash /tmp/stage/install.sh
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

MB = 1_000_000


def join_parts(work: Path) -> None:
    for first in sorted(work.glob("*.part00")):
        whole = work / first.name[: -len(".part00")]
        with whole.open("wb") as out:
            for part in sorted(work.glob(whole.name + ".part*")):
                out.write(part.read_bytes())
                part.unlink()


def split_big(work: Path, part_bytes: int) -> None:
    for f in sorted(work.iterdir()):
        if f.name == "install.sh" or f.stat().st_size <= part_bytes:
            continue
        with f.open("rb") as src:
            for i, block in enumerate(iter(lambda: src.read(part_bytes), b"")):
                (work / f"{f.name}.part{i:02d}").write_bytes(block)
        f.unlink()


def pack(work: Path, out_root: Path, chunk_bytes: int) -> list[Path]:
    files = sorted((f for f in work.iterdir() if f.name != "install.sh"), key=lambda f: -f.stat().st_size)
    bins: list[tuple[int, list[Path]]] = []
    for f in files:
        size = f.stat().st_size
        for i, (used, members) in enumerate(bins):
            if used + size <= chunk_bytes:
                bins[i] = (used + size, members + [f])
                break
        else:
            bins.append((size, [f]))
    dirs = []
    for i, (_, members) in enumerate(bins, 1):
        d = out_root / f"d{i}"
        d.mkdir(parents=True)
        for f in members:
            shutil.move(str(f), d / f.name)
        dirs.append(d)
    shutil.copy(work / "install.sh", dirs[-1] / "install.sh")
    return dirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu-dir", type=Path, default=Path(".gpu"))
    p.add_argument("--chunk-mb", type=int, default=50)
    p.add_argument("--part-mb", type=int, default=45)
    a = p.parse_args()
    sources = sorted(a.gpu_dir.glob("c[0-9]*"))
    if not sources or not any((c / "install.sh").is_file() for c in sources):
        raise SystemExit(f"no staging chunks with an install.sh under {a.gpu_dir}/c*: run ../shared/gpu/prepare.sh first")
    for old in a.gpu_dir.glob("d[0-9]*"):
        shutil.rmtree(old)
    with tempfile.TemporaryDirectory(dir=a.gpu_dir) as tmp:
        work = Path(tmp)
        for c in sources:
            for f in c.iterdir():
                shutil.copy(f, work / f.name)
        join_parts(work)
        split_big(work, a.part_mb * MB)
        dirs = pack(work, a.gpu_dir, a.chunk_mb * MB)
    for d in dirs:
        print(d, sum(f.stat().st_size for f in d.iterdir()) // MB, "MB")


if __name__ == "__main__":
    main()
