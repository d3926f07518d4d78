"""Single-file (LDM/SGM) checkpoints ⇄ diffusers state dicts, both ways through diffusers' own converters.

LDM → diffusers is `diffusers.loaders.single_file_utils` (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`). The inverse is
not a second table: the converters are run once over the file's key set with shape-only tensors that record
where they came from and which view operations (slices, transposes, the VAE attention's 1×1-conv → linear
index) made each diffusers tensor. A `KeyMap` keeps, per single-file key, its diffusers pieces and those
operations; reading replays them on the real tensor, writing replays them on an empty tensor of the single
file's shape and copies each diffusers tensor into the view (the fused open-clip `in_proj_weight` is three
such views). A diffusers folder with no single file to mirror gets its single-file names by searching the
converters' preimage (`template_for`): candidates built from the converters' own renames, each proven by
running the converter forward.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Optional

import torch

from loraforge.errors import ConfigError, FormatError

COMPONENTS = {"sd1": ("unet", "vae", "text_encoder"), "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}
# diffusers' file names inside a pipeline folder, per component kind
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
_TEXT_MODEL = "text_model."
# single-file tensors diffusers' converters leave out on purpose (buffers the models rebuild themselves)
DROPPED_BY_CONVERTERS = ("position_ids", "logit_scale")


def _sfu():
    from diffusers.loaders import single_file_utils

    return single_file_utils


def prefixes(family: str) -> dict[str, str]:
    """component → the single-file key prefix diffusers' converters read it from."""
    sfu = _sfu()
    clip_sd1, clip_sdxl = sfu.LDM_CLIP_PREFIX_TO_REMOVE[:2]
    if family == "sd1":
        return {"unet": sfu.LDM_UNET_KEY, "vae": sfu.LDM_VAE_KEYS[0], "text_encoder": clip_sd1}
    open_clip = sfu.CHECKPOINT_KEY_NAMES["open_clip_sdxl"].rsplit("positional_embedding", 1)[0]
    return {"unet": sfu.LDM_UNET_KEY, "vae": sfu.LDM_VAE_KEYS[0], "text_encoder": clip_sdxl,
            "text_encoder_2": open_clip}


# ---- tracing the converters -------------------------------------------------------------------------

_VALUE_PRESERVING = {torch.Tensor.clone, torch.Tensor.detach, torch.Tensor.contiguous}


class _Traced(torch.Tensor):
    """A shape-only tensor that remembers the single-file key it came from and the ops applied to it."""

    @staticmethod
    def make(base: torch.Tensor, source: str, ops: tuple) -> "_Traced":
        t = base.as_subclass(_Traced)
        t._source, t._ops = source, ops
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and isinstance(args[0], _Traced) else None
        plain = tuple(a.as_subclass(torch.Tensor) if isinstance(a, _Traced) else a for a in args)
        with torch._C.DisableTorchFunctionSubclass(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # candidates of the wrong rank draw torch's deprecation notes
            out = func(*plain, **kwargs)
        if src is None or not isinstance(out, torch.Tensor):
            return out
        ops = src._ops if func in _VALUE_PRESERVING else src._ops + ((func, plain[1:], kwargs),)
        return _Traced.make(out, src._source, ops)


@dataclass(frozen=True)
class Piece:
    """One diffusers tensor made from a single-file tensor: `ops` are the view operations between them."""

    component: str
    key: str
    shape: tuple[int, ...]
    ops: tuple = ()

    def view_of(self, tensor: torch.Tensor) -> torch.Tensor:
        for func, args, kwargs in self.ops:
            tensor = func(tensor, *args, **kwargs)
        return tensor

    def read_from(self, tensor: torch.Tensor) -> torch.Tensor:
        """This diffusers tensor, copied out of single-file tensor `tensor`."""
        return self.view_of(tensor).contiguous()

    def write_into(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        """Put diffusers tensor `value` in its place in single-file tensor `tensor` (in place)."""
        view = self.view_of(tensor)
        view.copy_(value.reshape(view.shape))


def _component_configs(folder: Path, family: str) -> dict[str, dict]:
    configs = {}
    for component in ("unet", "vae", "text_encoder_2"):
        if component in COMPONENTS[family]:
            path = Path(folder) / component / "config.json"
            try:
                configs[component] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise FormatError(f"{path} is unreadable ({exc}); the configs folder must be a diffusers pipeline") from None
    return configs


def _convert(component: str, checkpoint: dict, configs: dict[str, dict], family: str) -> dict:
    sfu = _sfu()
    if component == "unet":
        return sfu.convert_ldm_unet_checkpoint(checkpoint, configs["unet"])
    if component == "vae":
        return sfu.convert_ldm_vae_checkpoint(checkpoint, configs["vae"])
    if component == "text_encoder":
        return sfu.convert_ldm_clip_checkpoint(checkpoint)
    text_model = SimpleNamespace(config=SimpleNamespace(**configs["text_encoder_2"]))
    return sfu.convert_open_clip_checkpoint(text_model, checkpoint, prefix=prefixes(family)["text_encoder_2"])


def trace(shapes: dict[str, tuple[int, ...]], family: str, configs: dict[str, dict],
          components: Optional[Iterable[str]] = None) -> dict[str, list[Piece]]:
    """Single-file key → its diffusers pieces, by running diffusers' converters over shape-only tensors."""
    pre = prefixes(family)
    pieces: dict[str, list[Piece]] = {}
    for component in components or COMPONENTS[family]:
        checkpoint = {k: _Traced.make(torch.empty(s, device="meta"), k, ())
                      for k, s in shapes.items() if k.startswith(pre[component])}
        if not checkpoint:
            continue
        try:
            converted = _convert(component, checkpoint, configs, family)
        except (KeyError, IndexError, ValueError, RuntimeError, TypeError, AttributeError) as exc:
            raise FormatError(f"diffusers cannot convert this checkpoint's {component} with the given configs "
                              f"({type(exc).__name__}: {str(exc)[:80]}); pass the configs of its architecture") from None
        for key, tensor in converted.items():
            if isinstance(tensor, _Traced):
                pieces.setdefault(tensor._source, []).append(
                    Piece(component, key, tuple(tensor.shape), tensor._ops))
    return pieces


# ---- the key map of one single-file layout ----------------------------------------------------------

@dataclass
class KeyMap:
    """How one single file's tensors are the tensors of a diffusers folder, and back."""

    family: str
    shapes: dict[str, tuple[int, ...]]  # every single-file key, in file order
    pieces: dict[str, list[Piece]]  # single-file key → pieces (keys diffusers drops, e.g. position_ids, have none)

    @classmethod
    def build(cls, shapes: dict[str, tuple[int, ...]], family: str, configs: dict[str, dict]) -> "KeyMap":
        return cls(family, dict(shapes), trace(shapes, family, configs))

    def diffusers_index(self) -> dict[tuple[str, str], tuple[str, Piece]]:
        """(component, diffusers key) → (single-file key, piece)."""
        return {(p.component, p.key): (k, p) for k, ps in self.pieces.items() for p in ps}

    def to_diffusers(self, key: str, tensor: torch.Tensor) -> list[tuple[Piece, torch.Tensor]]:
        """The diffusers tensors (views of `tensor`) single-file tensor `key` holds."""
        return [(p, p.view_of(tensor)) for p in self.pieces.get(key, [])]

    def from_diffusers(self, key: str, get: Callable[[Piece], torch.Tensor],
                       dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Single-file tensor `key` assembled from its diffusers pieces (`get(piece)` gives each)."""
        pieces = self.pieces[key]
        parts = [(p, get(p)) for p in pieces]
        if len(pieces) == 1 and not pieces[0].ops:
            return parts[0][1] if dtype is None else parts[0][1].to(dtype)
        out = torch.empty(self.shapes[key], dtype=dtype or parts[0][1].dtype)
        if sum(t.numel() for _, t in parts) != out.numel():
            raise FormatError(f"{key}: its diffusers pieces do not cover it ({[p.key for p in pieces]})")
        for piece, tensor in parts:
            view = piece.view_of(out)
            if view.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
                raise FormatError(f"{key}: diffusers' conversion of it is not a view; it cannot be inverted")
            view.copy_(tensor.reshape(view.shape))
        return out

    def convertible(self) -> list[str]:
        return [k for k in self.shapes if self.pieces.get(k)]


def configs_from_folder(folder: Path, family: str) -> dict[str, dict]:
    """The component configs diffusers' converters need, read from a diffusers pipeline folder."""
    return _component_configs(Path(folder), family)


# ---- single-file names for a diffusers folder: the converters' preimage -----------------------------

class _Recorder(str):
    """A key that records each `replace(old, new)` a converter applies to it."""

    calls: list

    def replace(self, old, new, count=-1):  # noqa: D102 - str API
        _Recorder.calls.append((str(old), str(new)))
        out = _Recorder(str.replace(self, old, new, count))
        return out


def _recorded_renames(family: str) -> list[list[tuple[str, str]]]:
    """The (single-file, diffusers) renames of diffusers' block converters, as each applies them in order."""
    sfu = _sfu()
    sets = []
    probe_tensor = torch.empty((1, 1), device="meta")
    none = {"old": "\0", "new": "\0"}
    for call in (lambda k: sfu.update_unet_resnet_ldm_to_diffusers([k], {}, {k: probe_tensor}, None),
                 lambda k: sfu.update_vae_resnet_ldm_to_diffusers([k], {}, {k: probe_tensor}, none),
                 lambda k: sfu.update_vae_attentions_ldm_to_diffusers([k], {}, {k: probe_tensor}, none)):
        _Recorder.calls = []
        call(_Recorder("x"))
        sets.append([(o, n) for o, n in _Recorder.calls if o != "\0"])
    if family == "sdxl":
        prefix = prefixes(family)["text_encoder_2"]
        key = _Recorder(prefix + "transformer.x.in_proj_weight")
        _Recorder.calls = []
        sfu.convert_open_clip_checkpoint(SimpleNamespace(config=SimpleNamespace(hidden_size=1)),
                                         {key: torch.empty((3, 1), device="meta")}, prefix=prefix)
        sets.append([(o[len(prefix):] if o.startswith(prefix) else o, n) for o, n in _Recorder.calls])
    return sets


def _full_key_pairs(component: str) -> dict[str, str]:
    """diffusers key → single-file key (without prefix) from diffusers' own mapping tables."""
    table = _sfu().DIFFUSERS_TO_LDM_MAPPING
    if component == "unet":
        out = {}
        for sub in table["unet"].values():
            out.update(sub)
        return out
    if component == "vae":
        return dict(table["vae"])
    if component == "text_encoder_2":
        return dict(table["openclip"]["layers"])
    return {}


# Block names of the original LDM models that the probes enumerate; which diffusers block each one is, and
# every name inside a block, come from diffusers' converters (probed and recorded here, never listed).
_UNET_BLOCKS = ("input_blocks.{i}.{j}", "middle_block.{j}", "output_blocks.{i}.{j}")
_VAE_BLOCKS = ("encoder.down.{i}.block.{j}", "encoder.mid.block_{i}", "encoder.mid.attn_{i}",
               "decoder.up.{i}.block.{j}", "decoder.mid.block_{i}", "decoder.mid.attn_{i}")
_BLOCK_SUFFIXES = ("__probe__.weight", "op.weight", "op.bias", "conv.weight", "conv.bias",
                   "downsample.conv.weight", "downsample.conv.bias", "upsample.conv.weight", "upsample.conv.bias")


def _block_pairs(component: str, family: str, configs: dict[str, dict]) -> tuple[dict[str, str], dict[str, str]]:
    """(diffusers block prefix → single-file block prefix, diffusers key → single-file key) found by running
    the converter over probe keys of every block name."""
    patterns = _UNET_BLOCKS if component == "unet" else _VAE_BLOCKS
    probes: set[str] = set()
    for pattern in patterns:
        for i in range(24):
            for j in range(4):
                block = pattern.format(i=i, j=j)
                probes.update(f"{block}.{s}" for s in _BLOCK_SUFFIXES)
                if component == "vae":
                    probes.update(f"{block.rsplit('.block', 1)[0]}.{s}" for s in _BLOCK_SUFFIXES if "sample" in s)
    pre = prefixes(family)[component]
    probes.update(_full_key_pairs(component).values())  # keys a converter reads unconditionally (label_emb)
    shapes = {pre + p: (1, 1) for p in sorted(probes)}
    blocks, keys = {}, {}
    for source, ps in trace(shapes, family, configs, [component]).items():
        ldm = source[len(pre):]
        for piece in ps:
            if ldm.endswith(".__probe__.weight") and piece.key.endswith(".__probe__.weight"):
                blocks.setdefault(piece.key[: -len(".__probe__.weight")], ldm[: -len(".__probe__.weight")])
            elif "__probe__" not in ldm:
                keys.setdefault(piece.key, ldm)
    return blocks, keys


def _reverse(text: str, renames: list[tuple[str, str]]) -> str:
    for old, new in reversed(renames):
        if new:
            text = text.replace(new, old)
    return text


def _candidates(component: str, key: str, shape: tuple, family: str, blocks: dict, full: dict,
                renames: list) -> list[tuple[str, tuple]]:
    """Single-file (key, shape) candidates whose conversion might be diffusers `key` of `shape`, most
    specific first: fused and reshaped forms, which the converters only undo because real files hold them."""
    pre = prefixes(family)[component]
    names = []
    if key in full:
        names.append(full[key])
    for dprefix in sorted((b for b in blocks if key.startswith(b + ".")), key=len, reverse=True)[:1]:
        inner = key[len(dprefix) + 1:]
        names += [blocks[dprefix] + "." + _reverse(inner, r) for r in renames] + [blocks[dprefix] + "." + inner]
    if component.startswith("text_encoder"):
        for r in renames:
            inserts = [o for o, n in r if not n and not o.startswith(".")] or [""]
            # a fused tensor's name ends like its pieces' (".in_proj_weight" for ".q_proj.weight")
            merges = [o for o, n in r if not n and o.startswith(".") and o.endswith("_" + key.rsplit(".", 1)[-1])]
            base = _reverse(key, r)
            stem = base.rsplit(".", 2)[0]
            names += [ins + stem + m for ins in inserts for m in merges] + [ins + base for ins in inserts]
        names.append(key)
    out = []
    for name in dict.fromkeys(names):
        if name.endswith(("_weight", "_bias")) and shape:  # a fused tensor split into several pieces
            out += [(pre + name, (shape[0] * k, *shape[1:])) for k in (3, 2, 4)]
        variants = [shape + (1, 1), shape + (1,), shape[::-1]] if len(shape) == 2 else []
        out += [(pre + name, tuple(s)) for s in variants + [shape]]
    return list(dict.fromkeys(out))


def template_for(folder_shapes: dict[str, dict[str, tuple[int, ...]]], family: str,
                 configs: dict[str, dict]) -> KeyMap:
    """The KeyMap of the single file that diffusers converts into exactly `folder_shapes`
    (component → diffusers key → shape): every diffusers tensor gets the first of its candidates that the
    converter turns into it (and whose other pieces, if any, are the folder's too); the result is checked by
    running the converters over it once more."""
    renames = _recorded_renames(family)
    want = {(c, _strip(c, k)): tuple(s) for c, ks in folder_shapes.items() for k, s in ks.items()}
    chosen: dict[tuple[str, str], tuple[str, tuple]] = {}
    for component in COMPONENTS[family]:
        if component not in folder_shapes:
            continue
        blocks, full = _block_pairs(component, family, configs) if component in ("unet", "vae") else ({}, {})
        full = {**_full_key_pairs(component), **full}
        # the UNet converter counts blocks rather than reading their numbers: every trial holds every block
        pre = prefixes(family)[component]
        fillers = {f"{pre}{b}.__filler__.weight": (1, 1) for b in blocks.values()}
        if component == "unet":  # it reads label_emb unconditionally for SDXL's added embeddings
            fillers.update({pre + k: (1, 1) for k in _full_key_pairs(component).values()})
        candidates = {(component, _strip(component, k)): _candidates(component, k, tuple(s),
                                                                     family, blocks, full, renames)
                      for k, s in folder_shapes[component].items()}
        for r in range(max(map(len, candidates.values()), default=0)):
            trial: dict[str, tuple] = {}
            for wanted, cands in candidates.items():
                if wanted not in chosen and r < len(cands) and cands[r][0] not in trial:
                    trial[cands[r][0]] = cands[r][1]
            if not trial:
                continue
            filled = {k: v for k, v in fillers.items() if k not in trial}
            for source, ps in _trace_candidates(trial, filled, family, configs, component).items():
                if source in filled:
                    continue
                keys = [(p.component, _strip(p.component, p.key)) for p in ps]
                if all(want.get(k) == p.shape and k not in chosen for k, p in zip(keys, ps)):
                    for k in keys:
                        chosen[k] = (source, trial[source])
    missing = [f"{c}.{k}" for c, k in want if (c, k) not in chosen]
    if missing:
        raise ConfigError(f"diffusers' single-file converters have no single-file name for {missing[0]}: "
                          "this folder cannot be written as a single file")
    shapes = dict(sorted(set(chosen.values())))
    keymap = KeyMap.build(shapes, family, configs)
    got = {(p.component, _strip(p.component, p.key)): p.shape for ps in keymap.pieces.values() for p in ps}
    if got != want:
        bad = sorted(set(got.items()) ^ set(want.items()))[0]
        raise ConfigError(f"single-file names for this folder do not convert back exactly ({bad[0][0]}.{bad[0][1]})")
    return keymap


def _trace_candidates(trial: dict, filled: dict, family: str, configs: dict, component: str) -> dict:
    """`trace` of the candidates in `trial`; a candidate the converter cannot take (a name whose
    conversion slices a tensor of too low a rank) is dropped by halving the trial until it is alone."""
    try:
        return trace({**trial, **filled}, family, configs, [component])
    except FormatError:
        if len(trial) == 1:
            return {}
        items = list(trial.items())
        half = len(items) // 2
        return {**_trace_candidates(dict(items[:half]), filled, family, configs, component),
                **_trace_candidates(dict(items[half:]), filled, family, configs, component)}


def _strip(component: str, key: str) -> str:
    """diffusers text-encoder keys with or without transformers' `text_model.` wrapper compare equal."""
    return key[len(_TEXT_MODEL):] if component.startswith("text_encoder") and key.startswith(_TEXT_MODEL) else key


def match_folder_key(keymap: KeyMap, folder_keys: dict[str, set[str]]) -> dict[tuple[str, str], str]:
    """(component, converted key) → the folder's own spelling of it (with or without `text_model.`)."""
    out = {}
    for component, keys in folder_keys.items():
        for key in keys:
            out[(component, _strip(component, key))] = key
    return {(p.component, p.key): out.get((p.component, _strip(p.component, p.key)), p.key)
            for ps in keymap.pieces.values() for p in ps}


# ---- whole state dicts ------------------------------------------------------------------------------

def folder_shapes(folder: Path, family: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """component → key → shape of a diffusers pipeline folder's weights (headers only)."""
    from loraforge.formats.safetensors_io import tensor_shapes

    out = {}
    for component in COMPONENTS[family]:
        files = [f for f in sorted((Path(folder) / component).glob("*.safetensors")) if f.name.count(".") == 1]
        if files:
            out[component] = {k: v for f in files for k, v in tensor_shapes(f).items()}
    return out


def to_diffusers(state: dict[str, torch.Tensor], keymap: KeyMap) -> dict[str, dict[str, torch.Tensor]]:
    """component → diffusers state dict of single-file `state` (keys diffusers drops are left out)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for piece, view in keymap.to_diffusers(key, tensor):
            out.setdefault(piece.component, {})[piece.key] = view.contiguous()
    return out


def to_single_file(components: dict[str, dict[str, torch.Tensor]], keymap: KeyMap) -> dict[str, torch.Tensor]:
    """The single-file state dict of `keymap`'s layout holding the diffusers `components`."""
    spelled = match_folder_key(keymap, {c: set(sd) for c, sd in components.items()})
    return {key: keymap.from_diffusers(key, lambda p: components[p.component][spelled[(p.component, p.key)]])
            for key in keymap.convertible()}


# ---- whole checkpoints on disk, one tensor at a time ------------------------------------------------

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def write_single_file(folder: Path, family: str, out: Path) -> Path:
    """Diffusers pipeline `folder` written as the single file A1111/ComfyUI load (names from `template_for`),
    reading and writing one tensor at a time; every tensor keeps its dtype."""
    from loraforge.formats.safetensors_io import SafetensorsWriter, TensorFile

    shapes = folder_shapes(folder, family)
    keymap = template_for(shapes, family, configs_from_folder(folder, family))
    readers, where = [], {}
    try:
        for component in shapes:
            for f in sorted((Path(folder) / component).glob("*.safetensors")):
                if f.name.count(".") == 1:
                    readers.append(TensorFile(f))
                    where.update({(component, k): readers[-1] for k in readers[-1].entries})
        spelled = match_folder_key(keymap, {c: set(ks) for c, ks in shapes.items()})

        def get(piece: Piece) -> torch.Tensor:
            key = (piece.component, spelled[(piece.component, piece.key)])
            return where[key].get(key[1])

        def dtype_of(key: str) -> torch.dtype:
            piece = keymap.pieces[key][0]
            key = (piece.component, spelled[(piece.component, piece.key)])
            return where[key].entries[key[1]].torch_dtype

        keys = keymap.convertible()
        dtypes = {k: dtype_of(k) for k in keys}
        with SafetensorsWriter(out, [(k, keymap.shapes[k], dtypes[k]) for k in keys], {"format": "pt"}) as writer:
            for key in keys:
                writer.write(key, keymap.from_diffusers(key, get, dtype=dtypes[key]))
    finally:
        for reader in readers:
            reader.close()
    return Path(out)


def write_folder(single: Path, family: str, configs: Path, out: Path) -> list[Path]:
    """Single file `single` written as a diffusers pipeline folder at `out`: the configs, tokenizers and
    scheduler of diffusers folder `configs` (its weights are not read) and each component's weights converted
    by diffusers' own converter, one tensor at a time, in the file's dtypes. Returns the files written."""
    from loraforge.formats.safetensors_io import SafetensorsWriter, TensorFile, tensor_shapes

    single, configs, out = Path(single), Path(configs), Path(out)
    written = []
    for path in sorted(configs.rglob("*")):
        rel = path.relative_to(configs)
        if path.is_file() and path.suffix not in _WEIGHT_SUFFIXES and not rel.parts[0].startswith("."):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            written.append(Path(shutil.copyfile(path, out / rel)))
    if single.suffix.lower() == ".safetensors":
        reader = TensorFile(single)
        shapes, get, close = tensor_shapes(single), reader.get, reader.close
        dtype_of = lambda key: reader.entries[key].torch_dtype  # noqa: E731
    else:
        from loraforge.formats.pickles import tensor_state_dict

        state = tensor_state_dict(single)
        shapes, get, close = {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__, lambda: None
        dtype_of = lambda key: state[key].dtype  # noqa: E731
    try:
        keymap = KeyMap.build(shapes, family, configs_from_folder(configs, family))
        for component in COMPONENTS[family]:
            parts = [(k, p) for k in keymap.shapes for p in keymap.pieces.get(k, []) if p.component == component]
            if not parts:
                raise FormatError(f"{single.name} has no {component} weights: it cannot be written as a diffusers "
                                  "folder")
            dtypes = {k: dtype_of(k) for k, _ in parts}
            target = out / component / WEIGHT_NAMES[component]
            with SafetensorsWriter(target, [(p.key, p.shape, dtypes[k]) for k, p in parts], {"format": "pt"}) as writer:
                last = (None, None)
                for key, piece in parts:
                    if last[0] != key:
                        last = (key, get(key))
                    writer.write(piece.key, piece.view_of(last[1]).contiguous())
            written.append(target)
    finally:
        close()
    return written
