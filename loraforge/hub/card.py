"""The README.md model card pushed with an artifact: Hub YAML front matter plus lineage, recipe and facts.

The card is a pure function of the manifest (and its registry lineage), so re-pushing an unchanged
version produces the same bytes and uploads nothing.
"""

from __future__ import annotations

from typing import Any, Optional

import yaml

from loraforge.errors import LoraforgeError
from loraforge.families import FAMILIES
from loraforge.reference import Reference
from loraforge.registry.manifest import Manifest
from loraforge.yaml_aliases import AliasExpansionError, safe_load



def hub_base_id(ref: Optional[str]) -> Optional[str]:
    """What `base_model` should say for a base reference: a builtin's name or a Hub repo id."""
    if not ref:
        return None
    try:
        parsed = Reference.parse(ref)
    except LoraforgeError:  # not a reference the Hub could name: the card leaves base_model out
        return None
    if parsed.kind == "builtin":
        return parsed.name
    return parsed.repo  # hub and hub_model kinds; None for paths and registry references


def base_model_relation(manifest: Manifest) -> Optional[str]:
    if manifest.kind in ("lora", "slider", "embedding"):
        return "adapter"
    if manifest.kind == "checkpoint":
        method = manifest.provenance.method or ""
        if method.startswith("merge"):
            return "merge"
        if method.startswith(("fuse", "train", "finetune")):
            return "finetune"
    return None


def base_models(manifest: Manifest) -> list[str]:
    """Hub ids / builtin names of the base (adapters) or of the merged parents (merges)."""
    refs = []
    if manifest.base:
        refs.append(manifest.base.ref)
    if manifest.kind == "checkpoint" and base_model_relation(manifest) == "merge":
        refs = [p.ref for p in manifest.provenance.parents if p.role in ("input", "base", "model")] or refs
    out = []
    for ref in refs:
        hub_id = hub_base_id(ref)
        if hub_id and hub_id not in out:
            out.append(hub_id)
    return out


def instance_prompt(manifest: Manifest, registry=None) -> Optional[str]:
    """The trigger words: an embedding's token; else from the training facts, the parameters, or the dataset parent."""
    if manifest.embedding is not None:
        return manifest.embedding.token
    for source in (manifest.provenance.training or {}, manifest.provenance.params):
        for key in ("instance_prompt", "trigger", "trigger_words"):
            if isinstance(source.get(key), str) and source[key]:
                return source[key]
    if registry is not None:
        for parent in manifest.provenance.parents:
            if parent.role != "dataset":
                continue
            try:
                dataset = registry.resolve(parent.ref)
            except Exception:  # a dataset pulled elsewhere or removed: the card just omits it
                continue
            if dataset.dataset and dataset.dataset.instance_prompt:
                return dataset.dataset.instance_prompt
    return None


def card_metadata(manifest: Manifest, license: Optional[str] = None, registry=None) -> dict[str, Any]:
    """The YAML front matter as a dict."""
    meta: dict[str, Any] = {}
    bases = base_models(manifest)
    if bases:
        meta["base_model"] = bases[0] if len(bases) == 1 else bases
    relation = base_model_relation(manifest)
    if relation:
        meta["base_model_relation"] = relation
    meta["library_name"] = "diffusers"
    license = license or manifest.provenance.params.get("license")
    if license:
        meta["license"] = license
    tags = ["text-to-image", "diffusers", "loraforge"]
    if manifest.kind in ("lora", "slider"):
        tags.insert(0, "lora")
    if manifest.kind == "slider":
        tags.append("slider")
    if manifest.kind == "embedding":
        tags[:0] = ["textual_inversion", "embedding"]
    if relation == "merge":
        tags.append("merge")
    family = FAMILIES.get(manifest.base.family) if manifest.base else None
    if family is not None:
        tags += [t for t in family.hub_tags if t not in tags]
    meta["tags"] = tags
    prompt = instance_prompt(manifest, registry)
    if prompt:
        meta["instance_prompt"] = prompt
    meta["pipeline_tag"] = "text-to-image"
    return meta


def _lineage_lines(node, depth: int = 0) -> list[str]:
    label = f"`{node.ref}` ({node.kind}" + (f", {node.role}" if node.role != "self" else "")
    if node.weight is not None:
        label += f", weight {node.weight:g}"
    label += ")"
    lines = ["  " * depth + "- " + label]
    for child in node.children:
        lines += _lineage_lines(child, depth + 1)
    return lines


def _facts_table(facts: dict[str, Any]) -> list[str]:
    rows = ["| fact | value |", "|---|---|"]
    for key in sorted(facts):
        value = facts[key]
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
        rows.append(f"| {key} | {str(text).replace('|', '/')} |")
    return rows


def render_card(manifest: Manifest, *, weight_name: Optional[str], repo: str, files: list[str],
                license: Optional[str] = None, registry=None) -> str:
    """README.md text for `manifest` pushed to `repo` holding `files`."""
    meta = card_metadata(manifest, license=license, registry=registry)
    out = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    out += [f"# {manifest.name} v{manifest.version}", ""]
    kind_text = {"lora": "A LoRA adapter", "slider": "A Concept Slider (LoRA)",
                 "embedding": "A textual-inversion embedding",
                 "checkpoint": "A checkpoint", "dataset": "A dataset"}.get(manifest.kind, manifest.kind)
    out.append(f"{kind_text} versioned and published with loraforge "
               f"(`{manifest.ref}`, digest `{manifest.digest[:16]}`).")
    out.append("")
    grids = [f for f in files if f.lower().endswith(".png")]
    if grids:
        out += ["## Validation images", ""] + [f"![{f}]({f})" for f in grids] + [""]
    if manifest.embedding is not None:
        out += embedding_lines(manifest, meta, repo, files)
    elif "instance_prompt" in meta:
        out += ["## Trigger words", "", f"Use `{meta['instance_prompt']}` in the prompt.", ""]
    if weight_name:
        base = meta.get("base_model")
        base_id = base if isinstance(base, str) and "/" in base else "BASE_MODEL_REPO"
        out += ["## Use it", "", "```python", "from diffusers import AutoPipelineForText2Image", "",
                f'pipe = AutoPipelineForText2Image.from_pretrained("{base_id}")',
                f'pipe.load_lora_weights("{repo}", weight_name="{weight_name}")', "```", "",
                f"Or pull it with its provenance: `loraforge hub pull {repo}@v{manifest.version}`.", ""]
    if manifest.slider:
        low, high = manifest.slider.scale_range
        out += ["## Slider", "", f"Recommended scale range: {low:g} to {high:g}."]
        for label, value in (("concept", manifest.slider.concept), ("positive", manifest.slider.positive),
                             ("negative", manifest.slider.negative), ("neutral", manifest.slider.neutral)):
            if value:
                out.append(f"- {label}: {value}")
        out.append("")
    if registry is not None:
        try:
            node = registry.lineage(manifest.ref)
        except Exception:  # the version may have been pushed from a manifest file only
            node = None
        if node is not None:
            out += ["## Lineage", ""] + _lineage_lines(node) + [""]
    recipe = manifest.provenance.recipe
    if recipe:
        out += ["## Recipe", "", f"Made by step `{recipe.step}` of recipe `{recipe.name or recipe.path}` "
                f"(recipe digest `{recipe.digest[:16]}`, input digest `{recipe.input_digest[:16]}`).", ""]
    if manifest.provenance.method:
        out += ["## How it was made", "", f"Method: `{manifest.provenance.method}`", ""]
        if manifest.provenance.params:
            out += _facts_table(manifest.provenance.params) + [""]
    if manifest.provenance.training:
        out += ["## Training", ""] + _facts_table(manifest.provenance.training) + [""]
    if manifest.adapter:
        a = manifest.adapter
        out += ["## Adapter", "", f"rank {a.rank}, alpha {a.alpha}, {a.num_modules} modules "
                f"({', '.join(a.components)}), {a.num_parameters} parameters, {a.dtype}.", ""]
    if manifest.metrics:
        out += ["## Metrics", ""] + _facts_table(manifest.metrics) + [""]
    out += ["## Files", ""] + [f"- `{f}`" for f in files] + [
        "- `loraforge.json`: the loraforge manifest and the sha256 of every file", ""]
    return "\n".join(out)


def embedding_lines(manifest: Manifest, meta: dict[str, Any], repo: str, files: list[str]) -> list[str]:
    """The card's token and how-to-load sections of an embedding: diffusers' load_textual_inversion, once per
    text encoder for SDXL (clip_l into text_encoder, clip_g into text_encoder_2), as diffusers documents."""
    e = manifest.embedding
    weights = next((f for f in files if f.endswith((".safetensors", ".bin"))), "learned_embeds.safetensors")
    vectors = f"{e.num_vectors} vector{'s' if e.num_vectors != 1 else ''}"
    out = ["## Token", "", f"Put `{e.token}` in the prompt, e.g. `a photo of {e.token}` ({vectors} per text encoder"
           + (f", started from `{e.initializer}`" if e.initializer else "") + ").", ""]
    base = meta.get("base_model")
    base_id = base if isinstance(base, str) and "/" in base else "BASE_MODEL_REPO"
    out += ["## Use it", "", "```python", "from diffusers import AutoPipelineForText2Image", "",
            f'pipe = AutoPipelineForText2Image.from_pretrained("{base_id}")']
    if "text_encoder_2" in e.components:
        out += ["from huggingface_hub import hf_hub_download", "from safetensors.torch import load_file", "",
                f'state = load_file(hf_hub_download("{repo}", "{weights}"))',
                f'pipe.load_textual_inversion(state["clip_l"], token="{e.token}", text_encoder=pipe.text_encoder, '
                'tokenizer=pipe.tokenizer)',
                f'pipe.load_textual_inversion(state["clip_g"], token="{e.token}", text_encoder=pipe.text_encoder_2, '
                'tokenizer=pipe.tokenizer_2)']
    else:
        out.append(f'pipe.load_textual_inversion("{repo}", weight_name="{weights}", token="{e.token}")')
    out += [f'image = pipe("a photo of {e.token}").images[0]', "```", "",
            f"Or pull it with its provenance: `loraforge hub pull {repo}@v{manifest.version}`.", ""]
    return out


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a README (empty when there is none or it does not parse)."""
    if not text.startswith("---"):
        return {}
    parts = text.split("\n---", 1)
    try:
        value = safe_load(parts[0][3:], "model card") if len(parts) == 2 else None
    except (yaml.YAMLError, AliasExpansionError):
        return {}
    return value if isinstance(value, dict) else {}
