"""`ideoquant inspect`: tables of sources and outputs (GGUF files, safetensors folders)."""

from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFReader, GGUFValueType

from ..errors import IdeoquantError, printable
from ..io.input_files import json_object, load_json, parse_json, show
from ..io.safetensors_reader import SafetensorsFile
from ..io.source import open_source
from .report import format_table, human_bytes

MAX_VALUE_CHARS = 200


def inspect_path(
    path: str,
    plan_fmt: str | None = None,
    show_metadata: bool = True,
    max_size: int | None = None,
    calibration: Path | None = None,
) -> str:
    """A printable description of a GGUF file, a folder of outputs, or a source."""
    p = Path(path)
    if (max_size is not None or calibration is not None) and plan_fmt is None:
        raise IdeoquantError("--max-size and --calibration shape a plan: give --plan FORMAT too")
    if plan_fmt is not None:
        return _plan(path, plan_fmt, max_size, calibration)
    if p.is_file() and p.suffix == ".gguf":
        return inspect_gguf(p, show_metadata)
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            return "\n\n".join(inspect_gguf(g, show_metadata) for g in ggufs)
    if p.exists():
        return inspect_safetensors(p, show_metadata)
    # Not a local path: a Hub repo id goes through the source reader.
    return _plan(path, None)


def inspect_gguf(path: Path, show_metadata: bool = True) -> str:
    """Tensor table (with the recorded recipe reason per tensor) and metadata of a GGUF file."""
    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise IdeoquantError(f"{show(path)}: not a readable GGUF file ({printable(str(e))})") from None
    recipe = {}
    field = reader.get_field("ideoquant.recipe")
    if field is not None:
        where = f"{show(path)}: metadata ideoquant.recipe"
        recipe = json_object(parse_json(str(field.contents()), where), where)
    rows, total = [], 0
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape.tolist())]
        total += int(t.n_bytes)
        entry = recipe.get(t.name)
        reason = entry.get("reason", "") if isinstance(entry, dict) else ""
        rows.append([t.name, str(shape), t.tensor_type.name, human_bytes(int(t.n_bytes)), str(reason)])
    out = [f"{show(path)}  (GGUF v{reader.get_field('GGUF.version').contents()}, {len(rows)} tensors)"]
    out.append(format_table(["name", "shape", "type", "bytes", "why"], rows))
    n_weights = sum(int(t.n_elements) for t in reader.tensors)
    out.append(f"total: {len(rows)} tensors, {n_weights:,} weights, {human_bytes(total)} of data, "
               f"{8 * total / max(n_weights, 1):.3f} bits/weight; file {human_bytes(path.stat().st_size)}")
    if show_metadata:
        out.append("metadata:")
        for name, f in reader.fields.items():
            if name.startswith("GGUF.") or name == "ideoquant.recipe":
                continue
            value = f.contents()
            text = json.dumps(value) if f.types and f.types[0] == GGUFValueType.ARRAY else str(value)
            out.append(f"  {printable(name)} = {printable(text[:MAX_VALUE_CHARS])}")
    return "\n".join(out)


def inspect_safetensors(path: Path, show_metadata: bool = True) -> str:
    """Every tensor as stored in a safetensors file or folder (a source or an INT8/NF4 output)."""
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    if not files:
        raise IdeoquantError(f"{path}: no .safetensors or .gguf files")
    out = []
    for f in files:
        st = SafetensorsFile(f)
        rows = [[t.name, str(list(t.shape)), str(t.dtype).replace("torch.", ""), human_bytes(t.nbytes)] for t in st.tensors.values()]
        total = sum(t.nbytes for t in st.tensors.values())
        out.append(show(f))
        out.append(format_table(["name", "shape", "dtype", "bytes"], rows))
        out.append(f"total: {len(rows)} tensors, {human_bytes(total)}")
        if show_metadata and st.metadata:
            out.append("metadata:")
            out += [f"  {printable(k)} = {printable(v[:MAX_VALUE_CHARS])}" for k, v in st.metadata.items()]
        config = f.parent / "config.json"
        if show_metadata and config.is_file():
            qc = json_object(load_json(config, "config.json"), f"{show(config)}: the file").get("quantization_config")
            if qc:
                out.append(f"quantization_config: {json.dumps(qc)[:2000]}")
        out.append("")
    return "\n".join(out).rstrip()


def _plan(src: str, fmt: str | None, max_size: int | None = None, calibration: Path | None = None) -> str:
    """The source's canonical inventory, and with a format the type chosen per tensor: the
    same planning `convert` runs, `--max-size` and `--calibration` included."""
    from ..recipes.formats import is_gguf_format
    from ..recipes.gguf_policy import gguf_tensor_types
    from ..recipes.nf4_policy import nf4_kept_linears

    if fmt is not None and not is_gguf_format(fmt) and (max_size is not None or calibration is not None):
        raise IdeoquantError(f"inspect --plan: --max-size and --calibration plan GGUF formats, not {fmt}")
    source = open_source(src)
    type_plan = None
    if max_size is not None:
        from .gguf_calibration import plan_max_size
        from .options import ConvertOptions

        type_plan = plan_max_size(source, ConvertOptions(fmt=fmt, out=Path("."), max_size=max_size, calibration=calibration))
    out = []
    planned_bytes = 0
    for branch, bs in source.branches.items():
        out.append(f"{branch}: {bs.layout} layout, linears {bs.source_dtype}, dims {bs.dims.as_dict()}")
        if fmt is None:
            rows = [[n, str(list(s.shape)), s.kind, human_bytes(bs.stored_nbytes(n))] for n, s in bs.specs.items()]
            out.append(format_table(["name", "shape", "kind", "stored bytes"], rows))
        elif is_gguf_format(fmt):
            choices = type_plan[branch] if type_plan is not None else gguf_tensor_types(bs.dims, fmt)
            rows = [[c.name, str(list(c.shape)), c.qtype.name, human_bytes(_tensor_bytes(c)), c.reason] for c in choices]
            header = ["name", "shape", "type", "bytes", "why"]
            if calibration is not None:
                from .gguf_calibration import GGUFCalibration, check_calibration_format

                if type_plan is None:
                    check_calibration_format(fmt, choices)
                aware = GGUFCalibration(Path(calibration), bs)
                for row, c in zip(rows, choices):
                    stored_as_is = c.qtype.name in ("F32", "F16", "BF16")
                    row.insert(3, "error feedback" if aware.serves(c) else "-" if stored_as_is else "stock encoder")
                header.insert(3, "encoding")
            out.append(format_table(header, rows))
            branch_bytes = sum(_tensor_bytes(c) for c in choices)
            planned_bytes += branch_bytes
            out.append(f"tensor data: {human_bytes(branch_bytes)} ({branch_bytes:,} bytes)")
        else:
            kept = nf4_kept_linears(bs.dims)
            rows = [[n, str(list(s.shape)), (f"bf16: {kept[s.module]}" if s.module in kept else fmt) if s.kind == "linear" else "kept"]
                    for n, s in bs.specs.items()]
            out.append(format_table(["name", "shape", "plan"], rows))
            if fmt == "int8":
                out.append("int8: the protected set is chosen at conversion time from calibration measurements")
        out.append(f"total: {len(bs.specs)} tensors, {bs.total_weights:,} weights")
    if max_size is not None:
        out.append(f"--max-size {max_size:,} bytes: {planned_bytes:,} bytes of tensor data planned for both files")
    return "\n".join(out)


def _tensor_bytes(choice) -> int:
    """Bytes of one planned tensor's data in its ggml type."""
    from ..codecs.ggml.registry import ggml_type

    rows = 1
    for d in choice.shape[:-1]:
        rows *= d
    return rows * ggml_type(choice.qtype).row_bytes(choice.shape[-1])
