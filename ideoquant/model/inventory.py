"""The tensor-name inventory of one Ideogram 4 branch: names, shapes, linears, layouts.

Everything that needs to know which tensors a branch holds asks this module. Canonical
names are the native ("fused") ones; the diffusers layout differs only in attention,
where `attention.qkv` is split into `to_q/to_k/to_v` and `attention.o` is `to_out.0`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Literal

from ..errors import IdeoquantError

Layout = Literal["fused", "diffusers"]
BRANCHES = ("transformer", "unconditional_transformer")
BRANCH_ALIASES = {"cond": ("transformer",), "uncond": ("unconditional_transformer",), "both": BRANCHES}

# Tensors that identify a checkpoint as Ideogram 4 (every reader keys on the first).
IDENTIFYING_TENSOR = "embed_image_indicator.weight"


@dataclass(frozen=True)
class ModelDims:
    """The widths that fix every tensor shape of a branch."""

    in_channels: int = 128
    hidden: int = 4608
    head_dim: int = 256
    intermediate: int = 12288
    adaln_dim: int = 512
    llm_features: int = 53248
    num_layers: int = 34

    @property
    def num_heads(self) -> int:
        return self.hidden // self.head_dim

    @property
    def mrope_section(self) -> list[int]:
        """(t, h, w) rotary sections: (24, 20, 20) at head width 256, scaled for narrower heads."""
        return [max(1, s * self.head_dim // 256) for s in (24, 20, 20)]

    def to_config(self) -> dict:
        """The diffusers `config.json` arguments for these dims."""
        return {
            "_class_name": "Ideogram4Transformer2DModel",
            "in_channels": self.in_channels,
            "num_layers": self.num_layers,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate,
            "adaln_dim": self.adaln_dim,
            "llm_features_dim": self.llm_features,
            "rope_theta": 5000000,
            "mrope_section": self.mrope_section,
            "norm_eps": 1e-5,
        }

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Mapping) -> "ModelDims":
        """The dims a diffusers `config.json` (or a model's `.config`) describes."""
        return cls(
            in_channels=int(config["in_channels"]),
            hidden=int(config["attention_head_dim"]) * int(config["num_attention_heads"]),
            head_dim=int(config["attention_head_dim"]),
            intermediate=int(config["intermediate_size"]),
            adaln_dim=int(config["adaln_dim"]),
            llm_features=int(config["llm_features_dim"]),
            num_layers=int(config["num_layers"]),
        )


# config.json key -> ModelDims field (num_attention_heads is checked through head_dim * heads).
CONFIG_KEYS = {
    "in_channels": "in_channels",
    "num_layers": "num_layers",
    "attention_head_dim": "head_dim",
    "intermediate_size": "intermediate",
    "adaln_dim": "adaln_dim",
    "llm_features_dim": "llm_features",
}

TensorKind = Literal["linear", "bias", "norm", "embedding"]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a branch under its canonical (fused) name."""

    name: str
    shape: tuple[int, ...]
    kind: TensorKind
    # For linear weights: how many rows of input each forward sees ("tokens" or "one_row").
    rows_per_image: str = "tokens"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def module(self) -> str:
        """The owning module's path (name without the final `.weight`/`.bias`)."""
        return self.name.rsplit(".", 1)[0]


def expected_tensors(dims: ModelDims) -> list[TensorSpec]:
    """All tensors of one branch in canonical order (16 top-level + 13 per block)."""
    H, F, A = dims.hidden, dims.intermediate, dims.adaln_dim
    top = [
        TensorSpec("input_proj.weight", (H, dims.in_channels), "linear"),
        TensorSpec("input_proj.bias", (H,), "bias"),
        TensorSpec("llm_cond_norm.weight", (dims.llm_features,), "norm"),
        TensorSpec("llm_cond_proj.weight", (H, dims.llm_features), "linear"),
        TensorSpec("llm_cond_proj.bias", (H,), "bias"),
        TensorSpec("t_embedding.mlp_in.weight", (H, H), "linear", "one_row"),
        TensorSpec("t_embedding.mlp_in.bias", (H,), "bias"),
        TensorSpec("t_embedding.mlp_out.weight", (H, H), "linear", "one_row"),
        TensorSpec("t_embedding.mlp_out.bias", (H,), "bias"),
        TensorSpec("adaln_proj.weight", (A, H), "linear", "one_row"),
        TensorSpec("adaln_proj.bias", (A,), "bias"),
        TensorSpec("embed_image_indicator.weight", (2, H), "embedding"),
        TensorSpec("final_layer.linear.weight", (dims.in_channels, H), "linear"),
        TensorSpec("final_layer.linear.bias", (dims.in_channels,), "bias"),
        TensorSpec("final_layer.adaln_modulation.weight", (H, A), "linear", "one_row"),
        TensorSpec("final_layer.adaln_modulation.bias", (H,), "bias"),
    ]
    specs = list(top)
    for i in range(dims.num_layers):
        p = f"layers.{i}."
        specs += [
            TensorSpec(p + "attention.qkv.weight", (3 * H, H), "linear"),
            TensorSpec(p + "attention.o.weight", (H, H), "linear"),
            TensorSpec(p + "attention.norm_q.weight", (dims.head_dim,), "norm"),
            TensorSpec(p + "attention.norm_k.weight", (dims.head_dim,), "norm"),
            TensorSpec(p + "feed_forward.w1.weight", (F, H), "linear"),
            TensorSpec(p + "feed_forward.w2.weight", (H, F), "linear"),
            TensorSpec(p + "feed_forward.w3.weight", (F, H), "linear"),
            TensorSpec(p + "attention_norm1.weight", (H,), "norm"),
            TensorSpec(p + "attention_norm2.weight", (H,), "norm"),
            TensorSpec(p + "ffn_norm1.weight", (H,), "norm"),
            TensorSpec(p + "ffn_norm2.weight", (H,), "norm"),
            TensorSpec(p + "adaln_modulation.weight", (4 * H, A), "linear", "one_row"),
            TensorSpec(p + "adaln_modulation.bias", (4 * H,), "bias"),
        ]
    return specs


def linear_specs(dims: ModelDims) -> list[TensorSpec]:
    """The weight tensors of every nn.Linear of a branch (211 at 34 blocks), canonical names."""
    return [s for s in expected_tensors(dims) if s.kind == "linear"]


# --- layouts ---------------------------------------------------------------------------

_QKV = ".attention.qkv."
_O = ".attention.o."
DIFFUSERS_QKV = ("to_q", "to_k", "to_v")


def detect_layout(names: Iterable[str]) -> Layout:
    """`fused` or `diffusers`, from the attention names present."""
    names = list(names)
    has_fused = any(_QKV in n or _O in n for n in names)
    has_split = any(".attention.to_q." in n or ".attention.to_out.0." in n for n in names)
    if has_fused and has_split:
        raise ValueError("checkpoint mixes fused (attention.qkv) and diffusers (attention.to_q) names")
    return "diffusers" if has_split else "fused"


def to_layout_names(name: str, layout: Layout) -> list[str]:
    """The name(s) a canonical tensor has in a layout (qkv splits into three in diffusers)."""
    if layout == "fused":
        return [name]
    if _QKV in name:
        return [name.replace("attention.qkv.", f"attention.{part}.") for part in DIFFUSERS_QKV]
    if _O in name:
        return [name.replace("attention.o.", "attention.to_out.0.")]
    return [name]


def to_canonical_name(name: str) -> tuple[str, int | None]:
    """Canonical name of a layout name, with the q/k/v part index (0..2) for split attention."""
    for part_index, part in enumerate(DIFFUSERS_QKV):
        token = f".attention.{part}."
        if token in name:
            return name.replace(token, ".attention.qkv."), part_index
    if ".attention.to_out.0." in name:
        return name.replace(".attention.to_out.0.", ".attention.o."), None
    return name, None


def layout_modules(canonical_module: str, layout: Layout) -> list[str]:
    """A canonical linear module's path(s) in a layout (qkv is three modules in diffusers)."""
    return [n[: -len(".weight")] for n in to_layout_names(canonical_module + ".weight", layout)]


def detect_prefix(names: Iterable[str]) -> str:
    """A name prefix some exporters add (`model.diffusion_model.`), found on the identifying tensor."""
    for name in names:
        if name.endswith(IDENTIFYING_TENSOR):
            return name[: -len(IDENTIFYING_TENSOR)]
    return ""


def layout_of(names: Iterable[str], origin: str) -> Layout:
    """`fused` or `diffusers`, as IdeoquantError when the names mix both."""
    try:
        return detect_layout(names)
    except ValueError as e:
        raise IdeoquantError(f"{origin}: {e}") from None


def infer_dims(shape_of: Mapping[str, tuple[int, ...]], layout: Layout, origin: str, config: dict | None = None) -> ModelDims:
    """Model widths from the stored (logical) shapes, cross-checked with config.json when given."""
    if IDENTIFYING_TENSOR not in shape_of:
        raise IdeoquantError(f"{origin}: not an Ideogram 4 checkpoint (no {IDENTIFYING_TENSOR})")
    layers = set()
    for n in shape_of:
        if n.startswith("layers."):
            head = n.split(".", 2)[1]
            if head.isdigit():
                layers.add(int(head))
    if not layers:
        raise IdeoquantError(f"{origin}: no transformer blocks (layers.N.*) found")

    def shape(canonical: str) -> tuple[int, ...]:
        parts = to_layout_names(canonical, layout)
        if any(p not in shape_of for p in parts):
            raise IdeoquantError(f"{origin}: missing tensor {parts[0]}")
        return tuple(shape_of[parts[0]])

    in_proj = shape("input_proj.weight")
    if len(in_proj) != 2:
        raise IdeoquantError(f"{origin}: input_proj.weight has shape {list(in_proj)}, expected 2 dims")
    dims = ModelDims(
        in_channels=in_proj[1],
        hidden=in_proj[0],
        head_dim=shape("layers.0.attention.norm_q.weight")[0],
        intermediate=shape("layers.0.feed_forward.w1.weight")[0],
        adaln_dim=shape("adaln_proj.weight")[0],
        llm_features=shape("llm_cond_norm.weight")[0],
        num_layers=max(layers) + 1,
    )
    if dims.head_dim == 0 or dims.hidden % dims.head_dim:
        raise IdeoquantError(f"{origin}: hidden width {dims.hidden} is not a multiple of head width {dims.head_dim}")
    if config:
        for key, attr in CONFIG_KEYS.items():
            if key in config and int(config[key]) != getattr(dims, attr):
                raise IdeoquantError(f"{origin}: config.json {key}={config[key]} but tensors say {getattr(dims, attr)}")
        heads = config.get("num_attention_heads")
        if heads is not None and int(heads) != dims.num_heads:
            raise IdeoquantError(f"{origin}: config.json num_attention_heads={heads} but tensors say {dims.num_heads}")
    return dims


def check_inventory(shape_of: Mapping[str, tuple[int, ...]], layout: Layout, dims: ModelDims, origin: str) -> list[str]:
    """Raise on any missing or misshaped tensor; return the stored names that are not part of the model."""
    used: set[str] = set()
    for spec in expected_tensors(dims):
        parts = to_layout_names(spec.name, layout)
        for p in parts:
            if p not in shape_of:
                raise IdeoquantError(f"{origin}: missing tensor {p}")
            used.add(p)
        shapes = [tuple(shape_of[p]) for p in parts]
        shape = shapes[0] if len(shapes) == 1 else (sum(s[0] for s in shapes),) + shapes[0][1:]
        if len(parts) > 1 and len({s[1:] for s in shapes}) != 1:
            shape = ()
        if shape != spec.shape:
            raise IdeoquantError(f"{origin}: tensor {parts[0]} has shape {list(shapes[0])}, expected {list(spec.shape)}")
    return [n for n in shape_of if n not in used]


def model_config(dims: ModelDims, config: dict | None) -> dict:
    """The constructor arguments: widths from the tensors, rotary settings from config.json if any."""
    out = dims.to_config()
    for key in ("rope_theta", "mrope_section", "norm_eps"):
        if config and key in config:
            out[key] = config[key]
    return out


def normalize_branch(branch: str | None) -> str | None:
    """`transformer` / `unconditional_transformer` from a branch name or cond/uncond alias."""
    if branch is None:
        return None
    if branch in BRANCHES:
        return branch
    alias = BRANCH_ALIASES.get(branch)
    if alias and len(alias) == 1:
        return alias[0]
    raise IdeoquantError(f"branch must be one of {', '.join(BRANCHES)} (or cond/uncond), not {branch!r}")
