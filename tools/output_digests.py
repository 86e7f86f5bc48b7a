"""Digest every tensor that `ideoquant convert` writes, to prove a change leaves outputs unchanged.

Converts one synthetic source to every format through the command line (so it does not care
how the package is laid out inside), then records each output tensor's type, shape and the
sha256 of its stored bytes, read back with the `gguf` package (GGUF) or from the safetensors
header (folders). Record before a change, check after it:

    python tools/output_digests.py --work /tmp/digests record before.json
    python tools/output_digests.py --work /tmp/digests check before.json

The INT8 conversion uses a statistics file made once by `record` and reused by `check`
(calibration itself may change; the conversion from fixed statistics must not).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader

FORMATS = {
    "f16": [], "bf16": [], "q8_0": [], "q4_0": [], "q4_k": [], "q5_k": [], "q6_k": [],
    "q4_k_m": [], "q5_k_m": [], "nf4": [], "nf4-dq": ["--double-quant"],
    "q4_k-imatrix": ["--imatrix", "ones"],
    "int8": ["--protect", "3"],
    "q4_k-aware": [], "q5_k_m-aware": [], "q4_0-aware": [],
    "q4_1": [], "q5_0": [], "q5_1": [], "q3_k": [], "q2_k": [], "iq4_nl": [], "iq4_xs": [],
    "q3_k_m": [],
    "q5_k-imatrix": ["--imatrix", "ones"], "q4_1-imatrix": ["--imatrix", "ones"],
    "q5_1-imatrix": ["--imatrix", "ones"], "q3_k-imatrix": ["--imatrix", "ones"],
    "q2_k-imatrix": ["--imatrix", "ones"], "iq4_xs-imatrix": ["--imatrix", "ones"],
    "q4_0-imatrix": ["--imatrix", "ones"], "q5_0-imatrix": ["--imatrix", "ones"],
    "iq4_nl-imatrix": ["--imatrix", "ones"],
}
LAYERS = "3"


def _cli(*args: str) -> None:
    exe = Path(sys.executable).with_name("ideoquant")
    subprocess.run([str(exe), *args], check=True, stdout=subprocess.DEVNULL)


def _safetensors_digests(path: Path) -> dict[str, list]:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        base = 8 + n
        out = {}
        for name, info in sorted(header.items()):
            if name == "__metadata__":
                continue
            start, stop = info["data_offsets"]
            fh.seek(base + start)
            out[name] = [info["dtype"], info["shape"], hashlib.sha256(fh.read(stop - start)).hexdigest()]
    return out


def _gguf_digests(path: Path) -> dict[str, list]:
    reader = GGUFReader(path)
    return {
        t.name: [t.tensor_type.name, [int(v) for v in t.shape], hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()]
        for t in reader.tensors
    }


def digests(folder: Path) -> dict[str, dict[str, list]]:
    """Per output file (relative path): tensor name -> [type, shape, sha256 of bytes]."""
    result = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.suffix == ".gguf":
            result[rel] = _gguf_digests(path)
        elif path.suffix == ".safetensors":
            result[rel] = _safetensors_digests(path)
    return result


def run(work: Path, stats: Path | None) -> tuple[dict, Path]:
    """Synthesize, convert to every format, return the digests and the statistics file used."""
    src = work / "source"
    if src.exists():
        shutil.rmtree(src)
    _cli("synth", str(src), "--layers", LAYERS, "--seed", "7")
    if stats is None:
        stats = work / "stats.safetensors"
        _cli("calibrate", str(src), "--synthetic", "--out", str(stats), "--overwrite", "--quiet")
    manifest = {}
    for name, extra in FORMATS.items():
        fmt = name.split("-")[0]
        out = work / "out" / name
        if out.exists():
            shutil.rmtree(out)
        args = ["convert", str(src), "--format", fmt, "--out", str(out), "--quiet", *extra]
        if fmt == "int8" or name.endswith("-aware"):
            args += ["--calibration", str(stats)]
        _cli(*args)
        manifest[name] = digests(out)
    return manifest, stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Scratch folder (kept between record and check).")
    parser.add_argument("mode", choices=["record", "check"])
    parser.add_argument("manifest", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.mode == "record":
        manifest, stats = run(args.work, None)
        args.manifest.write_text(json.dumps({"stats": str(stats), "outputs": manifest}, indent=1))
        count = sum(len(t) for files in manifest.values() for t in files.values())
        print(f"recorded {count} tensors in {len(manifest)} conversions to {args.manifest}")
        return 0
    before = json.loads(args.manifest.read_text())
    manifest, _ = run(args.work, Path(before["stats"]))
    diffs = []
    for conv, files in before["outputs"].items():
        now = manifest.get(conv, {})
        for rel in sorted(set(files) | set(now)):
            a, b = files.get(rel, {}), now.get(rel, {})
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    diffs.append(f"{conv}/{rel}: {name}: {a.get(name)} -> {b.get(name)}")
    count = sum(len(t) for files in manifest.values() for t in files.values())
    for d in diffs[:40]:
        print(d)
    print(f"{count} tensors compared, {len(diffs)} differ")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
