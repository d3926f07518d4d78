"""kohya key names ⇄ canonical module paths: the `lora_unet_` / `lora_te*_` prefixes, undoing kohya's
`.` → `_` flattening, and the Stability (SGM) UNet block names kohya's SDXL files use.

kohya trains SD1 on diffusers' UNet, so its SD1 files flatten diffusers paths, but it trains SDXL on
Stability's own UNet, so its SDXL files say `input_blocks_4_1_…`, `middle_block_…`, `output_blocks_…`.
The SGM ⇄ diffusers mapping is not a table kept here: it is diffusers' own single-file converter
(`single_file_utils.convert_ldm_unet_checkpoint`) run once over every SGM module path a UNet of the
given `layers_per_block` can have, each value tagged with its SGM path, and read backwards for export.
All this module knows of SGM is its vocabulary: the block words and the names inside its ResBlock.

Text-encoder keys come in two spellings: sd-scripts' `lora_te_text_model_encoder_…` (CLIP's `text_model`
wrapper, which canonical paths keep), and `lora_te_encoder_…` from tools built on transformers 5, whose
CLIPTextModel has no wrapper (lycoris' own network among them). Both read into canonical paths; the hints
remember which components came without it, so writing back gives the file's own names.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping

from loraforge.errors import FormatError, IncompatibleBaseError
from loraforge.formats.lora import TEXT_MODEL_PREFIX, TEXT_MODEL_ROOTS, with_text_model, without_text_model

# kohya prefix → canonical component, longest first so `lora_te1_` is not read as `lora_te_`.
PREFIXES = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_2",  # Flux's T5 (kohya_flux); SD3's third encoder, which foreign_families refuses
    "lora_te_": "text_encoder",
}

# Every path word of diffusers' UNet2DConditionModel and transformers' CLIPTextModel(WithProjection).
VOCABULARY = frozenset(
    """
    down_blocks up_blocks mid_block resnets attentions transformer_blocks downsamplers upsamplers
    attn1 attn2 to_q to_k to_v to_out add_q_proj add_k_proj add_v_proj to_add_out norm norm1 norm2 norm3
    ff net proj proj_in proj_out conv conv1 conv2 conv_shortcut conv_in conv_out conv_norm_out conv_act
    time_emb_proj time_embedding time_proj linear_1 linear_2 add_embedding add_time_proj class_embedding
    encoder_hid_proj
    text_model encoder layers self_attn q_proj k_proj v_proj out_proj layer_norm1 layer_norm2 mlp fc1 fc2
    embeddings token_embedding position_embedding final_layer_norm text_projection
    """.split()
)
_MAX_WORD_TOKENS = max(len(w.split("_")) for w in VOCABULARY)

# LoraState hints saying which UNet naming a kohya file used, and the SGM layout it was mapped with.
HINT_UNET_NAMES = "kohya_unet_names"
HINT_SGM_LAYERS = "kohya_sgm_layers_per_block"
HINT_SGM_PLAIN_UP = "kohya_sgm_plain_up_levels"  # "0,1": up levels whose upsampler follows a resnet alone
SGM_HINTS = (HINT_UNET_NAMES, HINT_SGM_LAYERS, HINT_SGM_PLAIN_UP)
# Text-encoder components (comma-separated) whose keys were spelled without CLIP's `text_model_` wrapper.
HINT_TE_UNWRAPPED = "kohya_te_without_text_model"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_FLAT_WRAPPER = TEXT_MODEL_PREFIX.replace(".", "_")
_FLAT_ROOTS = tuple(root.replace(".", "_") for root in TEXT_MODEL_ROOTS)

DIFFUSERS = "diffusers"
SGM = "sgm"
NAMINGS = (DIFFUSERS, SGM)

# SGM's vocabulary: its block lists, and the sub-modules of its ResBlock (in_layers = norm, act, conv;
# out_layers = norm, act, dropout, conv), its Downsample (`op`) and Upsample (`conv`) convolutions.
SGM_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_")
SGM_MARKERS = (*SGM_BLOCKS, "time_embed_", "label_emb_", "out_")  # no diffusers UNet path starts so
SGM_RESNET_LEAVES = ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3", "skip_connection")
_ATTENTION_MARK = "proj_in"  # any sub-module of a transformer block: diffusers maps the block prefix, not the rest
# SDXL base's UNet, the layout kohya's SDXL files are for unless a base says otherwise.
SDXL_LAYERS_PER_BLOCK = 2
_MAX_LEVELS = 4  # SD1 has four down levels, SDXL three: candidates beyond a UNet's levels map to nothing


def split_words(flat: str) -> list[str] | None:
    """`down_blocks_0_attentions_0_proj_in` → ['down_blocks', '0', 'attentions', '0', 'proj_in'];
    None when a word is not in the vocabulary."""
    tokens = flat.split("_")
    words: list[str] = []
    i = 0
    while i < len(tokens):
        for j in range(min(len(tokens), i + _MAX_WORD_TOKENS), i, -1):
            word = "_".join(tokens[i:j])
            if word in VOCABULARY or (j == i + 1 and word.isdigit()):
                words.append(word)
                i = j
                break
        else:
            return None
    return words


def flatten(path: str) -> str:
    return path.replace(".", "_")


def split_prefix(key: str) -> tuple[str, str]:
    """(component, the rest of the key after its kohya prefix)."""
    for prefix, component in PREFIXES.items():
        if key.startswith(prefix):
            return component, key[len(prefix):]
    raise FormatError(f"key {key} is not a kohya LoRA key (lora_unet_ / lora_te_ / lora_te1_ / lora_te2_ / lora_te3_)")


def text_encoder_prefix(key: str) -> str:
    """`lora_te_` or `lora_te1_` (or `lora_te2_`) of a text-encoder key."""
    return key[: key.index("_", len("lora_")) + 1]


@functools.lru_cache(maxsize=8)
def sgm_map(layers_per_block: int) -> tuple[dict[str, str], dict[str, str]]:
    """({SGM module path: diffusers path} for single modules, {SGM block prefix: diffusers attention
    prefix}) of a UNet with `layers_per_block` — diffusers' single-file converter, run over every
    candidate SGM path with each value tagged by its own name."""
    from diffusers.loaders.single_file_utils import (
        DIFFUSERS_TO_LDM_MAPPING, LDM_UNET_KEY, convert_ldm_unet_checkpoint,
    )

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]
    candidates = {ldm.rsplit(".", 1)[0] for table in ("layers", "addition_embed_type") for ldm in top[table].values()}
    per_level = layers_per_block + 1
    attention_prefixes = ["middle_block.1"]
    candidates.update(f"middle_block.{i}.{leaf}" for i in (0, 2) for leaf in SGM_RESNET_LEAVES)
    for i in range(1, 1 + _MAX_LEVELS * per_level):
        candidates.update(f"input_blocks.{i}.0.{leaf}" for leaf in (*SGM_RESNET_LEAVES, "op"))
        attention_prefixes.append(f"input_blocks.{i}.1")
    for i in range(_MAX_LEVELS * per_level):
        candidates.update(f"output_blocks.{i}.0.{leaf}" for leaf in SGM_RESNET_LEAVES)
        candidates.update(f"output_blocks.{i}.{j}.conv" for j in (1, 2))
        attention_prefixes.append(f"output_blocks.{i}.1")
    candidates.update(f"{prefix}.{_ATTENTION_MARK}" for prefix in attention_prefixes)
    config = {"layers_per_block": layers_per_block, "addition_embed_type": "text_time"}

    def convert(paths: set[str]) -> dict[str, str]:
        tagged = {f"{LDM_UNET_KEY}{path}.{kind}": path for path in paths for kind in ("weight", "bias")}
        return {key.removesuffix(".weight"): sgm for key, sgm in convert_ldm_unet_checkpoint(tagged, config).items()
                if key.endswith(".weight") and sgm is not None}

    # diffusers keeps one SGM path per sampler: the last layer slot (`op`), and of an upsampler the
    # one after an attention (`.2.conv`); a second run without those finds the one after a resnet alone.
    converted = convert(candidates)
    after_resnet = convert({c for c in candidates if not (c.startswith("output_blocks.") and c.endswith(".2.conv"))})
    modules, attentions = {}, {}
    for path, sgm in [*converted.items(), *((p, s) for p, s in after_resnet.items() if ".upsamplers." in p)]:
        if sgm.endswith("." + _ATTENTION_MARK):
            attentions[sgm.removesuffix("." + _ATTENTION_MARK)] = path.removesuffix("." + _ATTENTION_MARK)
        else:
            modules[sgm] = path
    return modules, attentions


def is_sgm_unet(flats: Iterable[str]) -> bool:
    """Whether flattened UNet paths use SGM names (blocks, or the top-level `time_embed_0`, `out_2`…)."""
    return any(f.startswith(SGM_MARKERS) for f in flats)


def plain_up_levels(unet_paths: Iterable[str]) -> list[int]:
    """Up levels of a diffusers UNet with an upsampler but no attention (SD1's first; none in SDXL)."""
    paths = list(unet_paths)
    samplers = {int(m[1]) for p in paths if (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.", p))}
    attended = {int(m[1]) for p in paths if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", p))}
    return sorted(samplers - attended)


def check_sgm_hints(hints: Mapping[str, str]) -> None:
    """Raise FormatError unless the SGM layout and text-encoder spelling hints are what `KeyWriter` can use."""
    unwrapped = hints.get(HINT_TE_UNWRAPPED)
    if unwrapped is not None and not set(unwrapped.split(",")) <= set(TEXT_ENCODERS):
        raise FormatError(f"hint {HINT_TE_UNWRAPPED} is {unwrapped!r}; expected text-encoder names such as "
                          "text_encoder,text_encoder_2")
    layers = hints.get(HINT_SGM_LAYERS)
    if layers is not None and not (layers.isdigit() and int(layers) > 0):
        raise FormatError(f"hint {HINT_SGM_LAYERS} is {layers!r}; expected a positive whole number")
    plain = hints.get(HINT_SGM_PLAIN_UP)
    if plain is not None and not all(p.isdigit() for p in plain.split(",")):
        raise FormatError(f"hint {HINT_SGM_PLAIN_UP} is {plain!r}; expected up-level numbers such as 0,2")


def _layout_hints(unet_paths: Iterable[str] | None, layers: int) -> dict[str, str]:
    hints = {HINT_UNET_NAMES: SGM, HINT_SGM_LAYERS: str(layers)}
    plain = plain_up_levels(unet_paths or ())
    if plain:
        hints[HINT_SGM_PLAIN_UP] = ",".join(map(str, plain))
    return hints


def layers_per_block_of(unet_paths: Iterable[str]) -> int | None:
    """layers_per_block of a diffusers UNet, from its `down_blocks.0.resnets.J` module paths."""
    found = {int(m[1]) for p in unet_paths if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", p))}
    return max(found) + 1 if found else None


class PathReader:
    """Turns the flattened paths of one kohya file into canonical module paths.

    With `module_names` every path is matched exactly against the base's modules; without them it is
    split into the diffusers/CLIP vocabulary. SGM UNet names are mapped through `sgm_map` for the base's
    layers_per_block (SDXL's without a base, refused when the file does not fit it).
    """

    def __init__(self, keys: Iterable[str], module_names: Mapping[str, Iterable[str]] | None = None):
        names = {c: list(paths) for c, paths in (module_names or {}).items()}
        self._unet_paths = names.get("unet", [])
        self.exact = {c: {flatten(p): p for p in paths} for c, paths in names.items()}
        unet_flats = [rest for k in keys for c, rest in [_safe_split(k)] if c == "unet"]
        self.naming = SGM if is_sgm_unet(unet_flats) else DIFFUSERS
        self.layers_per_block = None
        if self.naming == SGM:
            given = layers_per_block_of(self._unet_paths)
            self.layers_per_block = given or SDXL_LAYERS_PER_BLOCK
            self._modules, self._attentions = sgm_map(self.layers_per_block)
            self._flat_modules = {flatten(s): d for s, d in self._modules.items()}
            self._flat_attentions = {flatten(s) + "_": d for s, d in self._attentions.items()}
        self._guessed: dict[tuple[str, str, bool], str] = {}
        self._te_spelling: dict[str, tuple[bool, str]] = {}  # component → (keys lack text_model_, first such key)

    def module_path(self, component: str, flat: str, key: str, exact: bool = True) -> str:
        """The canonical path of one key's module; `exact=False` reads it from the vocabulary even when the
        base's module names are known (for layers they do not list), taking only the UNet's layout from them."""
        if (component, flat, exact) not in self._guessed:
            self._guessed[component, flat, exact] = self._resolve(component, flat, key, exact)
        return self._guessed[component, flat, exact]

    def hints(self) -> dict[str, str]:
        hints = _layout_hints(self._unet_paths, self.layers_per_block) if self.naming == SGM else {}
        unwrapped = [c for c in TEXT_ENCODERS if self._te_spelling.get(c, (False, ""))[0]]
        if unwrapped:
            hints[HINT_TE_UNWRAPPED] = ",".join(unwrapped)
        return hints

    def _resolve(self, component: str, flat: str, key: str, exact: bool = True) -> str:
        if component == "unet" and self.naming == SGM:
            if not flat.startswith(SGM_MARKERS):
                raise FormatError(f"kohya key {key} has a diffusers UNet name in a file of SGM names "
                                  "(input_blocks_…); a file must use one naming")
            return self._resolve_sgm(flat, key, exact)
        if component in TEXT_ENCODERS:
            self._note_te_spelling(component, flat, key)
        names = self.exact.get(component) if exact else None
        if names is not None:
            path = names.get(flat)
            if path is None and flat.startswith(_FLAT_ROOTS):
                path = names.get(_FLAT_WRAPPER + flat)
            if path is None:
                raise IncompatibleBaseError(f"kohya key {key} matches no module of the base's {component}")
            return path
        words = split_words(flat)
        if words is None:
            raise FormatError(
                f"cannot turn kohya key {key} into a module path: it has a name outside the diffusers/CLIP "
                "vocabulary; pass the base model so its module names can be matched"
            )
        path = ".".join(words)
        return with_text_model(path) if component in TEXT_ENCODERS else path

    def _note_te_spelling(self, component: str, flat: str, key: str) -> None:
        """Remember whether `component`'s keys carry CLIP's `text_model_` wrapper; one file, one spelling."""
        if flat.startswith(_FLAT_WRAPPER):
            unwrapped = False
        elif flat.startswith(_FLAT_ROOTS):
            unwrapped = True
        else:
            return  # a module outside the wrapper (text_projection) is spelled the same either way
        seen = self._te_spelling.setdefault(component, (unwrapped, key))
        if seen[0] != unwrapped:
            with_it, without = (seen[1], key) if unwrapped else (key, seen[1])
            raise FormatError(f"kohya key {without} spells its {component} path without text_model_ but {with_it} "
                              "spells it with; a file must use one spelling")

    def _resolve_sgm(self, flat: str, key: str, exact_names: bool = True) -> str:
        exact = self.exact.get("unet") if exact_names else None
        path = self._flat_modules.get(flat)
        if path is None:
            prefix = next((p for p in self._flat_attentions if flat.startswith(p)), None)
            words = split_words(flat[len(prefix):]) if prefix is not None else None
            if prefix is not None and exact is not None:
                path = exact.get(flatten(self._flat_attentions[prefix]) + "_" + flat[len(prefix):])
            elif words is not None:
                path = self._flat_attentions[prefix] + "." + ".".join(words)
        if exact is not None and (path is None or flatten(path) not in exact):
            raise IncompatibleBaseError(f"kohya key {key} (SGM name{f' of {path}' if path else ''}) matches no "
                                        "module of the base's unet")
        if path is None or (exact is None and not _fits(path, self.layers_per_block)):
            unet = "the base's UNet" if self._unet_paths else "SDXL's UNet"
            raise FormatError(f"kohya key {key} does not fit {unet} (SGM names, layers_per_block "
                              f"{self.layers_per_block}); pass the base model it was trained for (--base)")
        return path


def _safe_split(key: str) -> tuple[str | None, str]:
    try:
        return split_prefix(key)
    except FormatError:
        return None, key


def _fits(path: str, layers_per_block: int) -> bool:
    """Whether a mapped path's layer index exists in a UNet with `layers_per_block` (up levels hold one more)."""
    m = re.match(r"(down|up)_blocks\.\d+\.(resnets|attentions)\.(\d+)\.", path)
    if m is None:
        return True
    return int(m[3]) < layers_per_block + (m[1] == "up")


def sgm_paths(unet_paths: Iterable[str], layers_per_block: int,
              levels_without_attention: Iterable[str] = ()) -> dict[str, str]:
    """{diffusers UNet path: SGM path} for `unet_paths`; a path SGM has no name for is refused.

    `levels_without_attention` (`up_blocks.N`) are up levels whose upsampler follows only a resnet; by
    default every level with an upsampler has attention, as in SDXL.
    """
    levels_without_attention = set(levels_without_attention)
    modules, attentions = sgm_map(layers_per_block)
    inverse = {path: sgm for sgm, path in modules.items()}  # an upsampler's two spellings: see _upsampler
    by_attention = {d: s for s, d in attentions.items()}
    out = {}
    for path in unet_paths:
        sgm = inverse.get(path)
        if sgm is not None and path.startswith("up_blocks.") and ".upsamplers." in path:
            sgm = _upsampler(path, sgm, levels_without_attention)
        if sgm is None:
            prefix = next((a for a in by_attention if path.startswith(a + ".")), None)
            if prefix is None:
                raise FormatError(f"UNet module {path} has no SGM (SDXL) name for a UNet with layers_per_block "
                                  f"{layers_per_block}; export with --kohya-names diffusers")
            sgm = by_attention[prefix] + path[len(prefix):]
        out[path] = sgm
    return out


def _upsampler(path: str, sgm: str, levels_without_attention: set[str]) -> str:
    """An upsampler follows its layer's resnet and attention (SGM index 2), or only the resnet (index 1)."""
    blocks, i, _j, *rest = sgm.split(".")
    has_attention = path.split(".upsamplers.")[0] not in levels_without_attention
    return ".".join([blocks, i, "2" if has_attention else "1", *rest])



class KeyWriter:
    """The kohya key (before its suffix) of each canonical module name of one adapter.

    The text-encoder prefix and the UNet naming come from the hints of the file the adapter was read
    from; SGM names need `HINT_SGM_LAYERS` (the UNet's layers_per_block).
    """

    def __init__(self, hints: Mapping[str, str], components: Iterable[str], unet_paths: Iterable[str]):
        components = set(components)
        te_prefix = hints.get("kohya_te_prefix")
        if "text_encoder_2" in components or te_prefix is None:
            te_prefix = "lora_te1_" if "text_encoder_2" in components else "lora_te_"
        self.prefixes = {"unet": "lora_unet_", "text_encoder": te_prefix, "text_encoder_2": "lora_te2_"}
        self.unwrapped = set(hints[HINT_TE_UNWRAPPED].split(",")) if hints.get(HINT_TE_UNWRAPPED) else set()
        self.sgm: dict[str, str] = {}
        if hints.get(HINT_UNET_NAMES) == SGM:
            layers = hints.get(HINT_SGM_LAYERS)
            if layers is None:
                raise FormatError(f"the adapter asks for SGM UNet names but its hints lack {HINT_SGM_LAYERS} "
                                  "(the UNet's layers_per_block); export with --kohya-names diffusers")
            plain = hints.get(HINT_SGM_PLAIN_UP)
            self.sgm = sgm_paths(unet_paths, int(layers), [f"up_blocks.{n}" for n in plain.split(",")] if plain else ())

    def key_base(self, name: str) -> str:
        component, path = name.split(".", 1)
        if component == "unet" and self.sgm:
            path = self.sgm[path]
        elif component in self.unwrapped:
            path = without_text_model(path)
        return self.prefixes[component] + flatten(path)


def with_unet_names(hints: Mapping[str, str], naming: str, family: str | None,
                    base_unet_paths: Callable[[], Iterable[str] | None] | None = None) -> dict[str, str]:
    """`hints` set to write kohya UNet keys in `naming` (`sgm` or `diffusers`), for `export --kohya-names`.

    SGM names are SDXL's (kohya names SD1 files by diffusers paths), and depend on the UNet's
    layers_per_block: taken from the SGM import's own hint, else from the base's module paths
    (`base_unet_paths()`, called only then).
    """
    if naming not in NAMINGS:
        raise FormatError(f"kohya UNet names {naming!r} are not known; use one of {', '.join(NAMINGS)}")
    if family == "flux":
        raise FormatError("--kohya-names picks the names of a UNet's modules; kohya names a Flux transformer's "
                          "modules by Black Forest Labs' (lora_unet_double_blocks_…): drop --kohya-names")
    out = {k: v for k, v in hints.items() if k not in SGM_HINTS}
    if naming == DIFFUSERS:
        return out
    if family == "sd1":
        raise FormatError("--kohya-names sgm is for SDXL adapters: kohya names SD1 LoRAs by their diffusers "
                          "paths; export this SD1 adapter with --kohya-names diffusers")
    if hints.get(HINT_UNET_NAMES) == SGM and HINT_SGM_LAYERS in hints:
        return {**out, **{k: hints[k] for k in SGM_HINTS if k in hints}}
    paths = list(base_unet_paths() or ()) if base_unet_paths is not None else []
    layers = layers_per_block_of(paths)
    if layers is None:
        raise FormatError("SGM names depend on the SDXL UNet's layers per block, and this adapter was imported "
                          "without a base: import it again with --base, or export with --kohya-names diffusers")
    return {**out, **_layout_hints(paths, layers)}
