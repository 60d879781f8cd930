"""IP-Adapter weight files (the public format diffusers' ``load_ip_adapter`` reads) ⇄ Flax trees.

A file holds two groups of tensors:

* ``image_proj.*``: the image projection. ``image_proj.proj.weight`` + ``image_proj.norm.*`` is IP-Adapter
  (:class:`~pmf_jax.models.image_projection.ImageProjection`, reads the encoder's ``image_embeds``);
  ``image_proj.latents`` + ``proj_in`` / ``layers.<i>.*`` / ``proj_out`` / ``norm_out`` is IP-Adapter Plus
  (:class:`~pmf_jax.models.image_projection.IPAdapterPlusImageProjection`, reads ``hidden_states[-2]``). Their
  parameter names are the file's by one rule (that module's docstring).
* ``ip_adapter.<n>.to_k_ip.weight`` / ``.to_v_ip.weight`` [inner, cross_attention_dim]: the extra key/value
  projections of the image tokens, one pair per cross-attention (``attn2``) of the UNet. ``<n>`` counts diffusers'
  ``unet.attn_processors`` — every ``attn1`` and ``attn2`` processor, in module order: the down blocks, then the up
  blocks, then the mid block (``named_children`` order of ``UNet2DConditionModel``), each block's attentions and
  their transformer blocks in index order — so the cross-attentions get 1, 3, 5, ...
  (``_convert_ip_adapter_attn_to_diffusers``: ``key_id`` starts at 1 and steps by 2). :func:`cross_attention_paths`
  lists our ``attn2`` modules in that order; :meth:`IPAdapterWeights.merge_into` puts the kernel of ``<n>`` at the
  ``(n - 1) / 2``-th as ``<attn2>/to_k_ip/kernel`` (Dense: [in, out] = torch weight.T).

The safetensors file is flat (``image_proj.proj.weight``); a ``.bin`` holds ``{"image_proj": {...}, "ip_adapter":
{...}}`` as a torch pickle, read only with ``allow_pickle=True`` (the same rule as :func:`pmf_jax.io.from_pretrained`).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from pmf_jax.errors import PMFInputError
from pmf_jax.io.finite import check_finite
from pmf_jax.io.naming import ConversionError, check_match, torch_key_to_flax_module_path
from pmf_jax.io.pretrained import PICKLE_SUFFIXES
from pmf_jax.models.image_projection import ImageProjection, IPAdapterPlusImageProjection

IMAGE_PROJ = "image_proj"
IP_ADAPTER = "ip_adapter"
KINDS = ("ip_adapter", "plus")
PLUS_DIM_HEAD = 64  # the files do not record it; diffusers (and the original Resampler) use 64
ATTENTION_KEYS = ("to_k_ip", "to_v_ip")
# diffusers' UNet2DConditionModel.named_children order of the blocks (what numbers its attn_processors).
BLOCK_ORDER = ("down_blocks", "up_blocks", "mid_block")
# The image_proj layouts of IP-Adapter variants that diffusers reads and we do not (a key that tells each apart).
UNSUPPORTED_VARIANTS = {"proj.3.weight": "IP-Adapter Full Face", "perceiver_resampler.proj_in.weight":
                        "IP-Adapter FaceID Plus", "norm.weight": "IP-Adapter FaceID"}
_ATTENTION_KEY = re.compile(r"^ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight$")
_INDEX_SUFFIX = re.compile(r"_(\d+)(?=_|$)")

Path_ = Tuple[str, ...]


# ---- the one naming rule of the image projection ------------------------------------------------------------------

def image_proj_key(path: Path_) -> str:
    """Flax path -> file key: ``("layers_0_1_3", "kernel")`` -> ``image_proj.layers.0.1.3.weight``."""
    module = ".".join(_INDEX_SUFFIX.sub(r".\1", part) for part in path[:-1])
    leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
    return ".".join(filter(None, (IMAGE_PROJ, module, leaf)))


def image_proj_path(key: str) -> Path_:
    """File key -> Flax module path and file leaf: ``image_proj.layers.0.1.3.weight`` ->
    ``("layers_0_1_3", "weight")`` (``weight`` becomes ``kernel`` or ``scale`` by the layer: see
    :func:`image_proj_to_params`)."""
    module, leaf = torch_key_to_flax_module_path(key[len(IMAGE_PROJ) + 1:] if key.startswith(IMAGE_PROJ) else key)
    return module + (leaf,)


def image_proj_to_params(state: Mapping[str, np.ndarray], module, source: str) -> Dict:
    """``image_proj.*`` tensors -> the module's parameter tree (Dense kernels transposed); one ConversionError
    listing every missing, unexpected and mis-shaped key."""
    flat = traverse_util.flatten_dict(module.abstract_params())
    wanted = {image_proj_key(path): path for path in flat}
    given = [key for key in state if key.startswith(f"{IMAGE_PROJ}.")]
    out, misshaped = {}, []
    for key, path in wanted.items():
        if key not in state:
            continue
        value = np.asarray(state[key])
        value = value.T if path[-1] == "kernel" and value.ndim == 2 else value
        if value.shape != tuple(flat[path].shape):
            misshaped.append(f"{key}: {tuple(state[key].shape)} in the file, the {type(module).__name__} built from "
                             f"the file's other keys expects {tuple(flat[path].shape)} (Flax layout of "
                             f"{'/'.join(path)})")
            continue
        out[path] = value
    check_match(source, sorted(set(wanted) - set(given)), sorted(set(given) - set(wanted)), misshaped)
    return traverse_util.unflatten_dict(out)


# ---- where the attention kernels go --------------------------------------------------------------------------------

def _natural(part: str):
    match = re.match(r"^(.*)_(\d+)$", part)
    return (match.group(1), int(match.group(2))) if match else (part, -1)


def _diffusers_order(path: Path_):
    top = _natural(path[0])[0]
    rank = BLOCK_ORDER.index(top) if top in BLOCK_ORDER else len(BLOCK_ORDER)
    return (rank,) + tuple(_natural(part) for part in path)


def cross_attention_paths(unet_params) -> List[Path_]:
    """The module paths of the UNet's cross-attentions (``attn2`` holding ``to_k``), in diffusers'
    ``attn_processors`` order: the ``attn2`` whose IP-Adapter index is ``2 i + 1`` is the i-th. Works on params or
    ``jax.eval_shape`` shapes."""
    paths = {path[:-2] for path in traverse_util.flatten_dict(unet_params)
             if len(path) >= 3 and path[-3:] == ("attn2", "to_k", "kernel")}
    return sorted(paths, key=_diffusers_order)


def cross_attention_shapes(unet_params) -> Dict[Path_, Tuple[int, int]]:
    """attn2 path -> its ``to_k`` kernel shape [cross_attention_dim, inner]: the shape of the ``to_k_ip`` and
    ``to_v_ip`` kernels an IP-Adapter adds there (:func:`cross_attention_paths` order)."""
    flat = traverse_util.flatten_dict(unet_params)
    return {path: tuple(flat[path + ("to_k", "kernel")].shape) for path in cross_attention_paths(unet_params)}


# ---- reading a file ------------------------------------------------------------------------------------------------

def _read_safetensors(path: Path) -> Dict[str, np.ndarray]:
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except TypeError:  # bfloat16, which numpy's reader does not know
        with safe_open(str(path), framework="flax") as f:
            return {key: np.asarray(f.get_tensor(key), np.float32) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise PMFInputError(f"cannot read IP-Adapter weights {path}: {err} (corrupted, truncated, or not a "
                            f"safetensors file?)") from err


def _read_pickle(path: Path) -> Dict[str, np.ndarray]:
    from pmf_jax.torch_compat.pickle_weights import load_pickle, to_numpy

    state = load_pickle(path)
    if not isinstance(state, Mapping):
        raise PMFInputError(f"{path} holds a {type(state).__name__}, not a dict of tensors: not an IP-Adapter file")
    flat = {}

    def visit(prefix, value):
        if isinstance(value, Mapping):
            for key, item in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), item)
        elif hasattr(value, "detach"):
            flat[prefix] = to_numpy(value)

    visit("", state)
    return flat


def read_state_dict(path, *, allow_pickle: bool = False) -> Dict[str, np.ndarray]:
    """An IP-Adapter file as one flat dict of numpy arrays (``image_proj.proj.weight``, ``ip_adapter.1.to_k_ip.weight``,
    ...): safetensors, or a torch pickle (``.bin``/``.ckpt``/``.pt``/``.pth``, nested dicts flattened with ``.``)
    only with ``allow_pickle=True``."""
    path = Path(path)
    if path.is_dir():
        raise PMFInputError(f"{path} is a folder; pass the IP-Adapter weight file (e.g. {path}/ip-adapter_sd15."
                            f"safetensors), or the folder with weight_name=")
    if not path.is_file():
        raise PMFInputError(f"IP-Adapter weight file {path} does not exist")
    if path.suffix in PICKLE_SUFFIXES:
        from pmf_jax.torch_compat.pickle_weights import check_pickle_allowed

        check_pickle_allowed(path, allow_pickle)
        return _read_pickle(path)
    if path.suffix != ".safetensors":
        raise PMFInputError(f"{path} is not an IP-Adapter weight file: expected .safetensors (or a torch pickle "
                            f"{'/'.join(PICKLE_SUFFIXES)} with allow_pickle=True)")
    return _read_safetensors(path)


# ---- the adapter ---------------------------------------------------------------------------------------------------

def _require(state, key: str, source: str, why: str) -> np.ndarray:
    if key not in state:
        raise ConversionError(f"{source} does not match an IP-Adapter: missing key {key} ({why})")
    return np.asarray(state[key])


def _image_projection(state: Mapping[str, np.ndarray], source: str, dtype):
    """(kind, module) built from the ``image_proj.*`` shapes; PMFInputError naming the key that does not fit."""
    keys = {key[len(IMAGE_PROJ) + 1:] for key in state if key.startswith(f"{IMAGE_PROJ}.")}
    if not keys:
        found = ", ".join(sorted(state)[:4]) + (", ..." if len(state) > 4 else "")
        raise ConversionError(f"{source} does not match an IP-Adapter: no {IMAGE_PROJ}.* keys (the image "
                              f"projection); its keys: {found or 'none'}")
    if "proj.weight" in keys:
        proj = _require(state, f"{IMAGE_PROJ}.proj.weight", source, "IP-Adapter's projection")
        norm = _require(state, f"{IMAGE_PROJ}.norm.weight", source, "the LayerNorm that gives the token width")
        if proj.ndim != 2 or norm.ndim != 1:
            raise ConversionError(f"{source}: {IMAGE_PROJ}.proj.weight {proj.shape} / {IMAGE_PROJ}.norm.weight "
                                  f"{norm.shape} are not a Linear weight and a LayerNorm weight")
        width = norm.shape[0]
        if proj.shape[0] % width:
            raise ConversionError(f"{source}: {IMAGE_PROJ}.proj.weight has {proj.shape[0]} outputs, not num_tokens × "
                                  f"cross_attention_dim for the {width} of {IMAGE_PROJ}.norm.weight")
        return "ip_adapter", ImageProjection(image_embed_dim=proj.shape[1], cross_attention_dim=width,
                                             num_tokens=proj.shape[0] // width, dtype=dtype)
    if "latents" in keys:
        latents = _require(state, f"{IMAGE_PROJ}.latents", source, "the Resampler's queries")
        proj_in = _require(state, f"{IMAGE_PROJ}.proj_in.weight", source, "the Resampler's input projection")
        proj_out = _require(state, f"{IMAGE_PROJ}.proj_out.weight", source, "the Resampler's output projection")
        to_q = _require(state, f"{IMAGE_PROJ}.layers.0.0.to_q.weight", source, "the first block's attention")
        ff = _require(state, f"{IMAGE_PROJ}.layers.0.1.1.weight", source, "the first block's feed-forward")
        if latents.ndim != 3 or latents.shape[0] != 1:
            raise ConversionError(f"{source}: {IMAGE_PROJ}.latents has shape {latents.shape}; expected "
                                  f"[1, num_tokens, hidden]")
        hidden = latents.shape[2]
        if proj_in.ndim != 2 or proj_in.shape[0] != hidden:
            raise ConversionError(f"{source}: {IMAGE_PROJ}.proj_in.weight has shape {proj_in.shape}; the "
                                  f"{hidden}-wide {IMAGE_PROJ}.latents need [{hidden}, embed_dims]")
        if to_q.shape[0] % PLUS_DIM_HEAD:
            raise ConversionError(f"{source}: {IMAGE_PROJ}.layers.0.0.to_q.weight has {to_q.shape[0]} outputs, not "
                                  f"heads × {PLUS_DIM_HEAD} (the head width of every IP-Adapter Plus)")
        depth = 1 + max(int(m.group(1)) for m in map(re.compile(r"^layers\.(\d+)\.").match, keys) if m)
        return "plus", IPAdapterPlusImageProjection(
            embed_dims=proj_in.shape[1], output_dims=proj_out.shape[0], hidden_dims=hidden, depth=depth,
            dim_head=PLUS_DIM_HEAD, heads=to_q.shape[0] // PLUS_DIM_HEAD, num_queries=latents.shape[1],
            ffn_ratio=ff.shape[0] / hidden, dtype=dtype)
    for key, variant in UNSUPPORTED_VARIANTS.items():
        if key in keys:
            raise PMFInputError(f"{source}: {IMAGE_PROJ}.{key} marks an {variant} adapter, which is not supported "
                                f"(IP-Adapter and IP-Adapter Plus are)")
    raise ConversionError(f"{source} does not match an IP-Adapter: {IMAGE_PROJ} holds neither proj.weight "
                          f"(IP-Adapter) nor latents (IP-Adapter Plus); its keys: {', '.join(sorted(keys)[:6])}")


def _attention_kernels(state: Mapping[str, np.ndarray], source: str, width: int) -> Dict[int, Dict[str, np.ndarray]]:
    """``ip_adapter.<n>.to_{k,v}_ip.weight`` -> {n: {"to_k_ip": [width, inner], "to_v_ip": ...}} (transposed)."""
    out: Dict[int, Dict[str, np.ndarray]] = {}
    unexpected = [key for key in state if not key.startswith(f"{IMAGE_PROJ}.") and not _ATTENTION_KEY.match(key)]
    if unexpected:
        raise ConversionError(f"{source} does not match an IP-Adapter: unexpected keys ({len(unexpected)}): "
                              f"{', '.join(sorted(unexpected)[:8])}{' ...' if len(unexpected) > 8 else ''} (only "
                              f"{IMAGE_PROJ}.* and {IP_ADAPTER}.<n>.to_k_ip/to_v_ip.weight)")
    for key in state:
        match = _ATTENTION_KEY.match(key)
        if not match:
            continue
        value = np.asarray(state[key])
        if value.ndim != 2 or value.shape[1] != width:
            raise ConversionError(f"{source}: {key} has shape {value.shape}; the image projection gives "
                                  f"{width}-wide tokens, so it must be [inner, {width}]")
        out.setdefault(int(match.group(1)), {})[match.group(2)] = value.T
    if not out:
        raise ConversionError(f"{source} does not match an IP-Adapter: no {IP_ADAPTER}.<n>.to_k_ip.weight keys")
    for n, pair in sorted(out.items()):
        absent = [name for name in ATTENTION_KEYS if name not in pair]
        if absent:
            raise ConversionError(f"{source}: missing key {IP_ADAPTER}.{n}.{absent[0]}.weight (its pair is there)")
        if pair["to_k_ip"].shape != pair["to_v_ip"].shape:
            raise ConversionError(f"{source}: {IP_ADAPTER}.{n}.to_k_ip.weight and .to_v_ip.weight differ in shape")
    return out


@dataclasses.dataclass(frozen=True)
class IPAdapterWeights:
    """An IP-Adapter read by :func:`load_ip_adapter`.

    kind: ``"ip_adapter"`` (reads the encoder's ``image_embeds``) or ``"plus"`` (reads ``hidden_states[-2]``).
    image_projection / image_proj_params: the projection module and its parameters.
    attention_params: {n: {"to_k_ip": kernel, "to_v_ip": kernel}}, kernels [cross_attention_dim, inner] (Flax
      Dense layout), keyed by the file's diffusers index (1, 3, 5, ...).
    source: the file, named in every error.
    """

    kind: str
    image_projection: Any
    image_proj_params: Dict
    attention_params: Dict[int, Dict[str, jax.Array]]
    source: str

    @property
    def image_proj(self) -> Tuple[Any, Dict]:
        """(module, params) of the image projection."""
        return self.image_projection, self.image_proj_params

    @property
    def num_tokens(self) -> int:
        return self.image_projection.num_tokens

    @property
    def cross_attention_dim(self) -> int:
        return self.image_projection.cross_attention_dim

    @property
    def image_feature_dim(self) -> int:
        """The width it reads: the encoder's ``projection_dim`` (IP-Adapter) or ``hidden_size`` (Plus)."""
        module = self.image_projection
        return module.image_embed_dim if self.kind == "ip_adapter" else module.embed_dims

    def check_image_encoder(self, encoder) -> None:
        """PMFInputError unless ``encoder`` (a :class:`~pmf_jax.models.clip_vision.CLIPVisionModelWithProjection`)
        gives the features this adapter reads."""
        if self.kind == "ip_adapter":
            given, what, key = encoder.projection_dim, "projection_dim", "proj.weight"
        else:
            given, what, key = encoder.hidden_size, "hidden_size", "proj_in.weight"
        if given != self.image_feature_dim:
            raise PMFInputError(f"{self.source}: {IMAGE_PROJ}.{key} takes {self.image_feature_dim}-dim image features; "
                                f"the image encoder gives {given} ({what}): this adapter belongs to another image "
                                f"encoder")

    def image_features(self, encoder_output):
        """What the projection reads from a :class:`~pmf_jax.models.clip_vision.CLIPVisionOutput`: ``image_embeds``
        [B, P] or ``hidden_states[-2]`` [B, 1 + N, D]."""
        return encoder_output.image_embeds if self.kind == "ip_adapter" else encoder_output.hidden_states[-2]

    def image_tokens(self, encoder_output, params=None):
        """The image prompt tokens [B, num_tokens, cross_attention_dim] (``params``: the projection's, e.g. while
        training it; default the loaded ones)."""
        params = self.image_proj_params if params is None else params
        return self.image_projection.apply({"params": params}, self.image_features(encoder_output))

    def attention_params_by_path(self, unet_params) -> Dict[Path_, Dict[str, jax.Array]]:
        """{attn2 path: {"to_k_ip": kernel, "to_v_ip": kernel}} for this UNet tree; PMFInputError when the file's
        indices or shapes do not fit its cross-attentions."""
        shapes = cross_attention_shapes(unet_params)
        if not shapes:
            raise PMFInputError(f"{self.source}: the UNet has no cross-attention (attn2) layers to add IP-Adapter "
                                f"keys to")
        expected = [2 * i + 1 for i in range(len(shapes))]
        if sorted(self.attention_params) != expected:
            extra = sorted(set(self.attention_params) - set(expected))
            absent = sorted(set(expected) - set(self.attention_params))
            raise PMFInputError(
                f"{self.source}: {len(self.attention_params)} {IP_ADAPTER}.<n> pairs for a UNet with {len(shapes)} "
                f"cross-attention layers (diffusers numbers them 1, 3, ..., {expected[-1]})"
                + (f"; indices without a layer: {extra[:8]}" if extra else "")
                + (f"; layers without weights: {absent[:8]}" if absent else "")
                + ": this adapter was made for another UNet")
        out = {}
        for n, (path, shape) in zip(expected, shapes.items()):
            pair = self.attention_params[n]
            if tuple(pair["to_k_ip"].shape) != shape:
                raise PMFInputError(
                    f"{self.source}: {IP_ADAPTER}.{n}.to_k_ip.weight is {tuple(pair['to_k_ip'].shape[::-1])} "
                    f"(torch [inner, in]); the UNet's {'/'.join(path)} projects {shape[0]}-dim context to "
                    f"{shape[1]}: this adapter was made for another UNet")
            out[path] = pair
        return out

    def merge_into(self, unet, unet_params, *, dtype=None) -> Dict:
        """A copy of ``unet_params`` with ``<attn2>/to_k_ip/kernel`` and ``<attn2>/to_v_ip/kernel`` added at each
        cross-attention (replacing any already there).

        dtype: of the added kernels; default: each ``attn2``'s own ``to_k`` kernel dtype.
        """
        unet_width = getattr(unet, "cross_attention_dim", None)
        if unet_width is not None and unet_width != self.cross_attention_dim:
            raise PMFInputError(f"{self.source}: the adapter's image tokens are {self.cross_attention_dim} wide "
                                f"({IMAGE_PROJ} output, {IP_ADAPTER}.<n>.to_k_ip.weight input); the UNet's "
                                f"cross_attention_dim is {unet_width}: this adapter was made for another UNet")
        flat = traverse_util.flatten_dict(unet_params)
        for path, pair in self.attention_params_by_path(unet_params).items():
            target = dtype or flat[path + ("to_k", "kernel")].dtype
            for name in ATTENTION_KEYS:
                flat[path + (name, "kernel")] = jnp.asarray(pair[name], target)
        return traverse_util.unflatten_dict(flat)

    def to_state_dict(self, dtype=None) -> Dict[str, np.ndarray]:
        """The public key format (what :func:`load_ip_adapter` reads, and diffusers): numpy arrays, torch layout;
        ``dtype`` (default: the params') e.g. ``np.float16`` to write a half-precision file."""
        cast = (lambda a: np.asarray(a)) if dtype is None else (lambda a: np.asarray(a).astype(dtype))
        state = {}
        for path, value in traverse_util.flatten_dict(self.image_proj_params).items():
            value = cast(value)
            state[image_proj_key(path)] = np.ascontiguousarray(value.T if path[-1] == "kernel" else value)
        for n, pair in sorted(self.attention_params.items()):
            for name in ATTENTION_KEYS:
                state[f"{IP_ADAPTER}.{n}.{name}.weight"] = np.ascontiguousarray(cast(pair[name]).T)
        return state


def load_ip_adapter(path, *, weight_name: Optional[str] = None, subfolder: Optional[str] = None,
                    allow_pickle: bool = False, dtype=jnp.float32, image_encoder=None) -> IPAdapterWeights:
    """Reads an IP-Adapter weight file (the public format; module docstring).

    Args:
      path: the weight file; or, with ``weight_name``, a folder or a Hub repo id in the local cache (``subfolder``
        inside it), as diffusers' ``load_ip_adapter(repo, subfolder=..., weight_name=...)``.
      allow_pickle: also read a torch pickle (``.bin``), which can run arbitrary code when loaded.
      dtype: of the returned parameters (checked on the host first: no NaN/Inf, nothing the cast makes Inf).
      image_encoder: optional CLIPVisionModelWithProjection to check the adapter against
        (:meth:`IPAdapterWeights.check_image_encoder`).
    Raises:
      PMFInputError naming the file (and the key): a missing file, another format, a refused pickle, missing
      ``image_proj`` keys, shapes that disagree (num_tokens × width, token width vs ``to_k_ip``), an unsupported
      variant, an image encoder of another width; weights holding NaN/Inf.
    """
    if weight_name is not None:
        from pmf_jax.io.hub import resolve_folder

        path = resolve_folder(path, subfolder) / weight_name
    source = str(path)
    state = read_state_dict(path, allow_pickle=allow_pickle)
    kind, module = _image_projection(state, source, dtype)
    image_proj = image_proj_to_params(state, module, source)
    attention = _attention_kernels(state, source, module.cross_attention_dim)
    # Names the file's keys. The cast's range matters only when it narrows (a float32 file read as float16).
    narrows = any(np.finfo(v.dtype).max > jnp.finfo(dtype).max for v in state.values()
                  if np.issubdtype(v.dtype, np.floating))
    check_finite(state, source, dtype if narrows else None)
    to_jax = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)  # noqa: E731
    adapter = IPAdapterWeights(kind=kind, image_projection=module, image_proj_params=to_jax(image_proj),
                               attention_params=to_jax(attention), source=source)
    if image_encoder is not None:
        adapter.check_image_encoder(image_encoder)
    return adapter
