"""MODEL_CARD.md for shipped checkpoints (Hugging Face model card sections)."""

from __future__ import annotations

import json
from typing import Any

from vlm.models.config import ModelConfig, config_hash

RECONSTRUCTION = (
    "LRCLR (Rizvi et al., 'Local Contrastive Learning for Medical Image Recognition', "
    "arXiv 2303.14153) is known to RadLens only from its abstract. This model is RadLens's "
    "reconstruction: candidate windows of the patch grid at several scales, a scorer that keeps "
    "the top-k (hard top-k forward, straight-through soft weights backward), sentences attending "
    "over the kept regions, and a GLoRIA-style local matching loss added 1:1 to the global CLIP "
    "loss. It is not the authors' code and its numbers are not theirs."
)


def model_card(config: ModelConfig, training: dict[str, Any] | None = None,
               metrics: dict[str, Any] | None = None, data: str = "PhantomCXR",
               commands: list[str] | None = None) -> str:
    local = config.region.enabled or config.cross_attention.enabled
    kind = "LRCLR (reconstruction)" if local else "plain CLIP baseline (LRCLR layers off)"
    text = config.text
    lines = [
        f"# {config.name}", "",
        f"**{kind}** image–text model for chest radiographs, trained by RadLens.", "",
        "**Not for clinical use.** Trained on synthetic radiographs; no clinical claim is made "
        "or implied.", "",
        "## Model details", "",
        f"- Image tower: {config.vision.backend} "
        + (f"ViT {config.vision.layers}x{config.vision.width}, patch {config.vision.patch_size}"
           if config.vision.backend == "open_clip" else f"{config.vision.timm_model}")
        + f", {config.preprocess.image_size} px, random initialisation.",
        f"- Text tower: `{text.source}` ("
        + ("pretrained, " if text.pretrained and not text.overrides else "random init, ")
        + ("frozen" if text.freeze else f"frozen up to layer {text.freeze_layers}"
           if text.freeze_layers >= 0 else "fine-tuned")
        + (f"; weights referenced by sha256 `{text.sha256}`, not copied" if text.sha256 else "")
        + ").",
        f"- Joint embedding: {config.embed_dim}-d, cosine similarity.",
        f"- Region selection: {'on' if config.region.enabled else 'off'}"
        + (f" (scales {list(config.region.scales)}, top-{config.region.top_k})"
           if config.region.enabled else "") + "; region–sentence attention: "
        + ("on" if config.cross_attention.enabled else "off") + ".",
        f"- Config hash: `{config_hash(config)}`.", "",
    ]
    if local:
        lines += ["## Reconstruction", "", RECONSTRUCTION, ""]
    lines += [
        "## Intended use", "",
        "Research and engineering: zero-shot finding classification with text prompts, "
        "report-to-image search, similar cases and phrase grounding inside RadLens, and "
        "testing a deployment without patient data. Out of scope: diagnosis, triage, any "
        "clinical decision, and real radiographs without re-training and validation.", "",
        "## Training data", "",
        f"{data}: real Indiana University chest X-ray report text and NLM MeSH labels "
        "(CC BY-NC-ND 4.0, read from the installed torchxrayvision package) paired with "
        "**synthetic** radiographs rendered by RadLens. See `data_cards/phantom_cxr.md`.", "",
    ]
    if commands:
        lines += ["## How it was made", "", "```bash", *commands, "```", ""]
    if training:
        shown = {k: v for k, v in training.items() if k != "history"}
        lines += ["## Training", "", "```json", json.dumps(shown, indent=1, default=str)[:3000],
                  "```", ""]
    if metrics:
        lines += ["## Evaluation (PhantomCXR test split)", "", "```json",
                  json.dumps(metrics, indent=1, default=str)[:6000], "```", ""]
    lines += [
        "## Limitations", "",
        "- Synthetic pixels: the images are simple renderings; performance on real radiographs "
        "is unknown and expected to be poor without re-training.",
        "- The text tower is a general-domain sentence encoder, not a clinical one.",
        "- Labels come from MeSH indexing of the reports; they are incomplete and noisy.", "",
    ]
    return "\n".join(lines)


def _use_and_data(intended_use: str, training_data: str) -> list[str]:
    """The "Intended use" and "Training data" sections of a card."""
    return ["", "## Intended use", "", intended_use, "", "## Training data", "", training_data,
            ""]


def _commands_and_notes(commands: list[str] | None, notes: list[str] | None) -> list[str]:
    """The "How it was made" and "Notes" sections of a card (empty parts left out)."""
    lines: list[str] = []
    if commands:
        lines += ["## How it was made", "", "```bash", *commands, "```", ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return lines


def _json_section(title: str, data: dict[str, Any] | None, limit: int) -> list[str]:
    """A card section holding ``data`` as indented JSON (``history`` left out), or nothing."""
    if not data:
        return []
    body = json.dumps({k: v for k, v in data.items() if k != "history"}, indent=1,
                      default=str)[:limit]
    return [f"## {title}", "", "```json", body, "```", ""]


def volume_model_card(kind: str, config: dict[str, Any], training: dict[str, Any] | None,
                      head: dict[str, Any] | None = None,
                      benchmark: dict[str, Any] | None = None,
                      commands: list[str] | None = None, fingerprint: str = "",
                      notes: list[str] | None = None) -> str:
    """MODEL_CARD.md of a shipped CT volume model (``kind``: ``lecl`` or ``drasclr``)."""
    if kind == "lecl":
        v = config.get("vision", {})
        title = "CLEAR slice encoder (LeCL)"
        details = [
            f"- Slice encoder: open_clip ViT {v.get('layers')}x{v.get('width')}, patch "
            f"{v.get('patch_size')}, {v.get('image_size')} px axial slices (HU windowed to "
            "three channels), random initialisation, pre-trained with MoCo v3 and the "
            f"lesion-enhanced loss, w = {config.get('lesion_weight')}.",
            f"- Slice embedding: {config.get('embed_dim')}-d (the encoder's pooled output; "
            "projector, predictor and momentum copy are not shipped).",
        ]
        if head:
            details.append(
                "- CLEAR ABMIL head (`clear_mil.pt`): lesion-location multi-label attention MIL "
                f"trained on the train split ({head.get('train')} volumes), early-stopped on val "
                f"({head.get('val')}), test macro AUC {head.get('test_macro_auc')} over "
                f"{head.get('test')} volumes. Its attention-pooled embedding is the volume "
                "vector of the index and its attention the app's slice strip.")
    else:
        title = "DrasCLR 3-D encoder"
        details = [f"- Anatomy-conditioned 3-D CNN, config: `{json.dumps(config)[:400]}`."]
    lines = [f"# {title}", "", "**Not for clinical use.** Trained on synthetic CT (PhantomCT); "
             "no clinical claim is made or implied.", "", "## Model details", "", *details]
    if fingerprint:
        lines.append(f"- Fingerprint (config + weights, what an index records): `{fingerprint}`.")
    lines += _use_and_data(
        "Research and engineering inside RadLens: volume vectors for similar-case search, "
        "slice saliency for the app, slice embeddings for CLEAR endpoint models. Out of scope: "
        "diagnosis, triage, any clinical decision, real CT without re-training and validation.",
        "PhantomCT (`data_cards/phantom_ct.md`): **fully synthetic** chest-abdomen CT, pixels "
        "and labels alike. Self-supervised pre-training sees every volume of the generated set "
        "(no labels); only the ABMIL head sees labels, of the train split.")
    lines += _commands_and_notes(commands, notes)
    lines += _json_section("Pre-training summary", training, 2000)
    lines += _json_section("Evaluation (5-fold CV on PhantomCT, `radlens eval-volumes`)",
                           benchmark, 4000)
    lines += [
        "## Limitations", "",
        "- Synthetic CT: simple organ shapes and lesions; behaviour on real CT is untested "
        "beyond timing (see the README).",
        "- Small model and short CPU training; results are for comparing methods at equal "
        "budget, not for absolute performance.", "",
    ]
    return "\n".join(lines)


def lesionseg_model_card(config: dict[str, Any], training: dict[str, Any] | None,
                         evaluation: dict[str, Any] | None = None,
                         commands: list[str] | None = None, fingerprint: str = "",
                         notes: list[str] | None = None) -> str:
    """MODEL_CARD.md of a shipped supervised lesion segmenter (``radlens train lesion-seg``)."""
    classes = ", ".join(config.get("classes", []))
    lines = [
        "# PhantomCT lesion segmenter (supervised) for finding-level volume search", "",
        "**Not for clinical use.** Trained on synthetic CT (PhantomCT); no clinical claim is "
        "made or implied.", "",
        "## Model details", "",
        f"- Two-level 3-D U-Net, width {config.get('width')}, batch norm; input: HU windows "
        f"{config.get('windows')} plus three body-bounding-box coordinate channels; output: one "
        f"sigmoid lesion map per location ({classes}) at half resolution.",
        f"- Model grid: {config.get('spacing_mm')} mm (z, y, x); other volumes are resampled "
        "to it before segmentation.",
        "- Volume vector (what an index stores): per location "
        + ("the largest lesion probability" if config.get("top_k") == 1 else
           f"the mean of the {config.get('top_k')} highest lesion probabilities")
        + ", plus a \"no lesion\" component 1 - max, L2-normalised. Slice saliency: the "
        "largest lesion probability on the slice.",
        "- **Supervised**, unlike the CLEAR / DrasCLR encoders: it learned from lesion masks, so "
        "its similarity is \"same kind of lesion in the same organ\", not a task-agnostic one.",
    ]
    if fingerprint:
        lines.append(f"- Fingerprint (config + weights, what an index records): `{fingerprint}`.")
    lines += _use_and_data(
        "Research and engineering inside RadLens: similar-case search by lesion location and "
        "the app's salient-slice strip on PhantomCT. Out of scope: diagnosis, triage, lesion "
        "measurement, any clinical decision, real CT without re-training and validation.",
        "PhantomCT (`data_cards/phantom_ct.md`): **fully synthetic** chest-abdomen CT, pixels "
        "and lesion masks alike. Trained on the masks of the train split only; the val split "
        "picked the checkpoint; the test split was never seen.")
    lines += _commands_and_notes(commands, notes)
    lines += _json_section("Evaluation", evaluation, 4000)
    lines += _json_section("Training summary", training, 2000)
    lines += [
        "## Limitations", "",
        "- Synthetic CT with simple organ shapes and ellipsoidal lesions; on real CT it is "
        "untested beyond running (see the README).",
        "- Small model, 204 training volumes, CPU training of about half an hour.", "",
    ]
    return "\n".join(lines)
