"""Contrastive losses. Distributed-ready: ``rank`` and ``world_size`` are arguments, features
are gathered across processes with gradients kept for the local shard, no global state.

- :class:`ClipLoss`: symmetric InfoNCE on global vectors (learnable temperature).
- :class:`LRCLRLoss`: ClipLoss + a local term: symmetric InfoNCE over the region–sentence
  matching scores (GLoRIA-style aggregation), weights 1:1 by default, optional entropy term on
  the region scores.
- CT: :func:`lecl_loss` / :func:`lecl_symmetric` (LeCL, MoCo v3 with lesion negatives; ``w = 0``
  is :func:`moco_v3_loss`), :func:`cox_partial_likelihood`, :class:`DrasCLRLoss`
  (per-location InfoNCE + neighbour InfoNCE, :func:`location_infonce`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlm.models.config import LossConfig
from vlm.models.lrclr import LRCLR
from vlm.models.outputs import ImageEmbedding, TextEmbedding

GatherFn = Callable[[torch.Tensor], list[torch.Tensor]]


def _dist_gather(x: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist
    import torch.distributed.nn as dist_nn

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("world_size > 1 but torch.distributed is not initialised")
    return list(dist_nn.all_gather(x))


def gather_features(x: torch.Tensor, rank: int = 0, world_size: int = 1,
                    gather_fn: GatherFn | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; the local shard keeps its gradient."""
    if world_size <= 1:
        return x
    parts = list((gather_fn or _dist_gather)(x))
    if len(parts) != world_size:
        raise RuntimeError(f"gather returned {len(parts)} shards for world_size {world_size}")
    parts[rank] = x
    return torch.cat(parts, dim=0)


def _pad_sentences(x: torch.Tensor, mask: torch.Tensor, length: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the sentence axis so shards from different ranks can be gathered."""
    extra = length - x.shape[1]
    if extra <= 0:
        return x, mask
    return F.pad(x, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


class ClipLoss(nn.Module):
    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                rank: int = 0, world_size: int = 1, gather_fn: GatherFn | None = None
                ) -> torch.Tensor:
        """image, text (B, E) unit vectors of matching pairs on this rank."""
        all_image = gather_features(image, rank, world_size, gather_fn)
        all_text = gather_features(text, rank, world_size, gather_fn)
        scale = logit_scale.exp().clamp(max=100.0)
        labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
        logits_i = scale * image @ all_text.T  # (B, B * world)
        logits_t = scale * text @ all_image.T
        return (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2


class LRCLRLoss(nn.Module):
    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.clip = ClipLoss()

    def forward(self, model: LRCLR, image: ImageEmbedding, text: TextEmbedding, rank: int = 0,
                world_size: int = 1, gather_fn: GatherFn | None = None,
                max_sentences: int | None = None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        out: dict[str, torch.Tensor] = {}
        out["global"] = self.clip(image.global_embedding, text.global_embedding,
                                  model.logit_scale, rank, world_size, gather_fn)
        total = cfg.global_weight * out["global"]
        local = model.local_features(image)
        if model.cross is not None and local is not None and cfg.local_weight > 0:
            sents, mask = text.sentence_embeddings, text.sentence_mask
            if world_size > 1:  # every rank pads to the same sentence count
                sents, mask = _pad_sentences(sents, mask, max_sentences or sents.shape[1])
            all_local = gather_features(local, rank, world_size, gather_fn)
            all_sents = gather_features(sents, rank, world_size, gather_fn)
            all_mask = gather_features(mask.to(sents.dtype), rank, world_size, gather_fn) > 0.5
            b = local.shape[0]
            labels = torch.arange(b, device=local.device) + rank * b
            scale = 1.0 / cfg.local_temperature
            t2i = scale * model.cross.match(sents, mask, all_local)  # (B, B * world)
            i2t = scale * model.cross.match(all_sents, all_mask, local).T  # (B, B * world)
            out["local"] = (F.cross_entropy(t2i, labels) + F.cross_entropy(i2t, labels)) / 2
            total = total + cfg.local_weight * out["local"]
        if cfg.region_entropy_weight > 0 and image.candidate_logits is not None:
            p = torch.softmax(image.candidate_logits, dim=-1)
            out["entropy"] = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
            total = total + cfg.region_entropy_weight * out["entropy"]
        out["loss"] = total
        return out


# --------------------------------------------------------------------------- CT: LeCL / MoCo v3

def moco_v3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 1.0, rank: int = 0,
                 world_size: int = 1, gather_fn: GatherFn | None = None) -> torch.Tensor:
    """MoCo v3 InfoNCE: q (B, D) queries vs k (B, D) keys of all ranks, scaled by 2T."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    all_k = gather_features(k, rank, world_size, gather_fn)  # (B * world, D)
    logits = q @ all_k.T / temperature  # (B, B * world)
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


def lecl_loss(q: torch.Tensor, k: torch.Tensor, lesion_mask: torch.Tensor, w: float = 10.0,
              temperature: float = 1.0, rank: int = 0, world_size: int = 1,
              gather_fn: GatherFn | None = None) -> torch.Tensor:
    """LeCL: MoCo v3 plus every other lesion slice's key again as a sharpened negative.

    l_i = -[s_ii - log(sum_j exp(s_ij) + sum_{l lesion, l != i} exp(w s_il))] * 2T with
    s_ij = q_i . k_j / T over the keys of all ranks; mean over i. ``w = 0`` switches the extra
    term off (plain MoCo v3, the ablation), rather than adding exp(0) once per lesion slice.

    Args:
        q: (B, D) queries; k: (B, D) keys (both normalised here).
        lesion_mask: (B,) bool, which local pairs are lesion pairs.
    """
    if w == 0:
        return moco_v3_loss(q, k, temperature, rank, world_size, gather_fn)
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    b = q.shape[0]
    all_k = gather_features(k, rank, world_size, gather_fn)  # (N, D), N = B * world
    all_lesion = gather_features(lesion_mask.to(q.dtype), rank, world_size, gather_fn) > 0.5
    s = q @ all_k.T / temperature  # (B, N)
    labels = torch.arange(b, device=q.device) + rank * b
    extra_ok = all_lesion[None, :].expand(b, -1).clone()  # (B, N)
    extra_ok[torch.arange(b, device=q.device), labels] = False  # l != i
    extra = (w * s).masked_fill(~extra_ok, float("-inf"))  # (B, N)
    logits = torch.cat([s, extra], dim=1)  # (B, 2N); the positive stays at column i
    return F.cross_entropy(logits, labels) * (2 * temperature)


def lecl_symmetric(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                   lesion_mask: torch.Tensor, w: float = 10.0, temperature: float = 1.0,
                   rank: int = 0, world_size: int = 1,
                   gather_fn: GatherFn | None = None) -> torch.Tensor:
    """loss(q1, k2) + loss(q2, k1) (MoCo v3 symmetrisation)."""
    return (lecl_loss(q1, k2, lesion_mask, w, temperature, rank, world_size, gather_fn)
            + lecl_loss(q2, k1, lesion_mask, w, temperature, rank, world_size, gather_fn))


def cox_partial_likelihood(risk: torch.Tensor, time: torch.Tensor,
                           event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood, Breslow ties, mean over events.

    -1/n_e sum_{i: event} [r_i - log sum_{j: t_j >= t_i} exp(r_j)]; 0 (with a graph) if no event.
    """
    risk = risk.reshape(-1)
    time = time.reshape(-1).to(risk.dtype)
    event = event.reshape(-1).bool()
    at_risk = time[None, :] >= time[:, None]  # (N, N): j in the risk set of i
    log_denom = torch.logsumexp(risk[None, :].masked_fill(~at_risk, float("-inf")), dim=1)
    n_events = event.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    return -((risk - log_denom) * event.to(risk.dtype)).sum() / n_events


# --------------------------------------------------------------------------- CT: DrasCLR

def location_infonce(q: torch.Tensor, k: torch.Tensor, location: torch.Tensor,
                     queue: torch.Tensor, temperature: float = 0.2,
                     normalize_query: bool = True) -> torch.Tensor:
    """InfoNCE of q against its key k, negatives from the queue of its own location.

    Args:
        q: (N, D) queries (normalised here unless ``normalize_query`` is False).
        k: (N, D) momentum keys (normalised here, detached).
        location: (N,) long location ids; a batch may mix locations (the official code feeds
            one location per batch, which is the special case of a constant ``location``).
        queue: (L, K, D) per-location queues of past keys (unit vectors).
    """
    if normalize_query:
        q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    queue = queue.detach()
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    l_neg = q.new_empty(q.shape[0], queue.shape[1])  # (N, K)
    for loc in torch.unique(location):
        rows = location == loc
        l_neg[rows] = q[rows] @ queue[loc].T
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (N, 1 + K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


class DrasCLRLoss(nn.Module):
    """L = L_patch + beta * L_neighbour (both :func:`location_infonce`, T = 0.2, beta = 1).

    The neighbour query is the sum of the (unit) query embeddings of the patch's nearest atlas
    neighbours in the same subject, not re-normalised (as the official code: its logits are
    sum_r r . k), against the same key and queue.
    """

    def __init__(self, temperature: float = 0.2, beta: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.beta = beta

    def forward(self, q: torch.Tensor, k: torch.Tensor, q_neighbours: torch.Tensor,
                location: torch.Tensor, queue: torch.Tensor) -> dict[str, torch.Tensor]:
        """q, k (N, D); q_neighbours (N, n, D) neighbour queries; location (N,); queue (L, K, D)."""
        out = {"patch": location_infonce(q, k, location, queue, self.temperature)}
        if self.beta != 0:
            q_nb = F.normalize(q_neighbours, dim=-1).sum(dim=1)  # (N, D), norm <= n
            out["neighbour"] = location_infonce(q_nb, k, location, queue, self.temperature,
                                                normalize_query=False)
            out["loss"] = out["patch"] + self.beta * out["neighbour"]
        else:
            out["loss"] = out["patch"]
        return out
