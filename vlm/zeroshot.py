"""Zero-shot finding classification with text prompts (CheXzero protocol).

For each finding a positive and a negative prompt set; the probability is the softmax over the
two (ensemble-averaged) image–prompt logits, i.e. ``sigmoid(pos - neg)``, optionally calibrated
per finding on a validation split (Platt scaling: ``sigmoid(a * (pos - neg) + b)``). Prompt sets
are JSON (``vlm/prompts/cxr_findings.json``) and user-editable.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import expit

from vlm.errors import ConfigError
from vlm.models.lrclr import LRCLR
from vlm.models.outputs import ImageEmbedding, TextEmbedding
from vlm.models.tokenizer import ReportTokenizer


@dataclass
class FindingPrompts:
    positive: list[str]
    negative: list[str]
    template: str = "{finding}"

    def phrase(self, finding: str, side: str | None = None, severity: str | None = None,
               zone: str | None = None) -> str:
        """A side/severity-specific phrase, e.g. "small left pleural effusion"."""
        text = self.template.format(side=side or "", severity=severity or "", zone=zone or "",
                                    finding=finding.replace("_", " "))
        return " ".join(text.replace(" in the  lung", " in the lung").split())


@dataclass
class PromptSet:
    findings: dict[str, FindingPrompts] = field(default_factory=dict)
    #: One description of a normal study: the default negative of every finding that names none,
    #: and what text search contrasts a query with (:data:`index.engine.NORMAL_REFERENCE`).
    normal: str | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> PromptSet:
        """The default CXR prompts, or a user JSON file with the same layout."""
        if path is None:
            text = (resources.files("vlm.prompts") / "cxr_findings.json").read_text()
        try:
            if path is not None:  # a missing file stays an OSError: the CLI names the file
                text = Path(path).read_bytes().decode("utf-8")
            doc = json.loads(text)
            normal = doc.get("normal")
            if normal is not None and not isinstance(normal, str):
                raise TypeError("'normal' must be one string")
            findings = {}
            if not isinstance(doc["findings"], dict) or not doc["findings"]:
                raise TypeError("'findings' must name at least one finding")
            for name, v in doc["findings"].items():
                negative = v.get("negative", [normal] if normal else None)
                if negative is None:
                    raise KeyError(f"'{name}' has no 'negative' and the file no 'normal'")
                for kind, texts in (("positive", v["positive"]), ("negative", negative)):
                    # a bare string would become one prompt per character
                    if (not isinstance(texts, list) or not texts
                            or not all(isinstance(t, str) and t.strip() for t in texts)):
                        raise TypeError(f"'{name}': '{kind}' must be a non-empty list of "
                                        "non-empty strings")
                findings[name] = FindingPrompts(list(v["positive"]), list(negative),
                                                v.get("template", "{finding}"))
            return cls(findings, normal)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # JSON errors too
            raise ConfigError(f"prompt file {path}: expected {{'normal': TEXT, 'findings': "
                              f"{{name: {{'positive': [...], 'negative': [...]}}}}}} with "
                              f"'negative' optional when 'normal' is given ({exc})") from None

    def with_finding(self, name: str, positive: list[str], negative: list[str]) -> PromptSet:
        """A copy with one finding added or replaced (the app's prompt editor)."""
        if not positive or not negative:
            raise ConfigError(f"finding '{name}' needs at least one positive and one negative "
                              "prompt")
        out = dict(self.findings)
        out[name] = FindingPrompts(list(positive), list(negative))
        return PromptSet(out, self.normal)

    def to_json(self) -> str:
        doc: dict[str, Any] = {"normal": self.normal} if self.normal else {}
        doc["findings"] = {k: {"positive": v.positive, "negative": v.negative,
                               "template": v.template} for k, v in self.findings.items()}
        return json.dumps(doc, indent=1)


class ZeroShotClassifier:
    def __init__(self, model: LRCLR, tokenizer: ReportTokenizer, prompts: PromptSet | None = None,
                 calibration: dict[str, tuple[float, float]] | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.prompts = prompts or PromptSet.load()
        self.calibration = dict(calibration or {})
        self._bank: dict[str, tuple[TextEmbedding, int]] | None = None
        self._reference: torch.Tensor | None = None

    @property
    def findings(self) -> list[str]:
        return list(self.prompts.findings)

    def reference_embedding(self) -> torch.Tensor | None:
        """Unit text vector of the prompt set's normal-study sentence (None without one),
        encoded once: what gradient grounding contrasts a phrase with."""
        if not self.prompts.normal:
            return None
        if self._reference is None:
            self._reference = self._encode([self.prompts.normal]).global_embedding[0].clone()
        return self._reference

    def _encode(self, texts: list[str]) -> TextEmbedding:
        """Prompts -> TextEmbedding in eval mode, without gradients, on the model's device
        (the text tower moves the tokens there): the one path by which the classifier encodes
        its prompt bank, reference and phrases."""
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self.model.encode_text(self.tokenizer(texts, split=False))
        finally:
            self.model.train(was)

    def _text_bank(self) -> dict[str, tuple[TextEmbedding, int]]:
        if self._bank is None:
            self._bank = {name: (self._encode(p.positive + p.negative), len(p.positive))
                          for name, p in self.prompts.findings.items()}
        return self._bank

    def logit_differences(self, image: ImageEmbedding) -> np.ndarray:
        """(N, F): mean positive minus mean negative prompt logit per finding."""
        out = []
        with torch.no_grad():
            for _name, (text, n_pos) in self._text_bank().items():
                logits = self.model.similarity(image, text)  # (N, P)
                out.append((logits[:, :n_pos].mean(1) - logits[:, n_pos:].mean(1)).cpu())
        return torch.stack(out, dim=1).double().numpy()

    def probabilities(self, image: ImageEmbedding) -> np.ndarray:
        """(N, F) finding probabilities (calibrated where a calibration exists)."""
        diff = self.logit_differences(image)
        a = np.array([self.calibration.get(f, (1.0, 0.0))[0] for f in self.findings])
        b = np.array([self.calibration.get(f, (1.0, 0.0))[1] for f in self.findings])
        return expit(a * diff + b)  # no overflow warning for large logits

    def score_phrases(self, image: ImageEmbedding, phrases: list[str]) -> np.ndarray:
        """(N, len(phrases)) logits for arbitrary phrases (e.g. "small left effusion")."""
        text = self._encode(phrases)
        with torch.no_grad():
            return self.model.similarity(image, text).double().cpu().numpy()

    def calibrate(self, image: ImageEmbedding, labels: np.ndarray) -> dict[str, tuple[float,
                                                                                       float]]:
        """Fit Platt scaling per finding on validation embeddings and 0/1 labels (N, F)."""
        diff = self.logit_differences(image)
        for j, name in enumerate(self.findings):
            y = labels[:, j].astype(np.float64)
            if 0 < y.sum() < len(y):
                self.calibration[name] = platt(diff[:, j], y)
        return self.calibration


def platt(x: np.ndarray, y: np.ndarray, iters: int = 200) -> tuple[float, float]:
    """Logistic regression of y on x (Newton steps with a tiny ridge): returns (a, b)."""
    a, b = 1.0, 0.0
    xs = (x - x.mean()) / (x.std() + 1e-9)
    w = np.array([1.0, 0.0])
    feats = np.stack([xs, np.ones_like(xs)], 1)
    for _ in range(iters):
        p = expit(feats @ w)
        grad = feats.T @ (p - y) + 1e-3 * w
        hess = feats.T @ (feats * (p * (1 - p))[:, None]) + 1e-3 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    scale = 1.0 / (x.std() + 1e-9)
    a = float(w[0] * scale)
    b = float(w[1] - w[0] * x.mean() * scale)
    return a, b


def load_calibration(path: str | os.PathLike[str]) -> dict[str, tuple[float, float]]:
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return {k: (float(v[0]), float(v[1])) for k, v in data.items()}
