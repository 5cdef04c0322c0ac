"""Training the router on pooled features: noise-added cross-entropy, class-balanced, held-out report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from flexi_workflows.errors import DataError
from flexi_workflows.router.model import RankRouter, RouterSpec
from flexi_workflows.scoring.difficulty import balanced_indices, class_weights


@dataclass
class RouterTraining:
    """How the router is fitted (the recipe's `router:` section maps onto this; the router knows no recipe)."""

    epochs: int = 50
    lr: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 64
    holdout: float = 0.2
    balance: str = "downsample"


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) indices with each class split in the same proportion."""
    rng = np.random.default_rng(seed)
    train, hold = [], []
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_hold = int(round(len(idx) * fraction))
        if len(idx) > 1:
            n_hold = min(max(n_hold, 1), len(idx) - 1)
        else:
            n_hold = 0
        hold.append(idx[:n_hold])
        train.append(idx[n_hold:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(hold))


def evaluate_router(router: RankRouter, features: torch.Tensor, labels: np.ndarray) -> dict:
    k = router.spec.num_classes
    preds = router.classify(features).cpu().numpy()
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    support = confusion.sum(1)
    recall = [float(confusion[i, i] / support[i]) if support[i] else None for i in range(k)]
    return {
        "accuracy": float((preds == labels).mean()) if len(labels) else None,
        "per_class_recall": dict(zip(router.spec.class_names, recall)),
        "confusion_matrix": confusion.tolist(),  # rows: true class, columns: predicted class
        "predicted_share": dict(zip(router.spec.class_names, (np.bincount(preds, minlength=k) / max(len(preds), 1)).tolist())),
        "size": int(len(labels)),
    }


def train_router(
    features: torch.Tensor, labels: np.ndarray, spec: RouterSpec, cfg: RouterTraining, seed: int
) -> tuple[RankRouter, dict]:
    labels = np.asarray(labels, dtype=np.int64)
    k = spec.num_classes
    if len(features) != len(labels):
        raise DataError(f"router: {len(features)} feature rows but {len(labels)} labels")
    if len(labels) < 2 * k:
        raise DataError(f"router: {len(labels)} labelled samples is too few for {k} classes")
    train_idx, hold_idx = stratified_split(labels, cfg.holdout, seed)
    if cfg.balance == "downsample":
        train_idx = train_idx[balanced_indices(labels[train_idx], k, seed)]
    weight = torch.tensor(class_weights(labels[train_idx], k), dtype=torch.float32) if cfg.balance == "reweight" else None

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        router = RankRouter(spec)
    router.set_feature_stats(features[train_idx])
    router.noise_generator = torch.Generator().manual_seed(seed + 1)
    order = torch.Generator().manual_seed(seed + 2)
    optimizer = torch.optim.AdamW(router.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_train = features[train_idx].float()
    y_train = torch.as_tensor(labels[train_idx])
    losses = []
    router.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x_train), generator=order)
        epoch_loss = 0.0
        for start in range(0, len(perm), cfg.batch_size):
            batch = perm[start : start + cfg.batch_size]
            loss = F.cross_entropy(router(x_train[batch]), y_train[batch], weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item() * len(batch)
        losses.append(epoch_loss / len(perm))
    router.eval()
    report = {
        "holdout": evaluate_router(router, features[hold_idx], labels[hold_idx]),
        "train": evaluate_router(router, features[train_idx], labels[train_idx]),
        "train_class_counts": np.bincount(labels[train_idx], minlength=k).tolist(),
        "all_class_counts": np.bincount(labels, minlength=k).tolist(),
        "loss_curve": losses,
        "noise": {"std": spec.noise_std, "type": spec.noise_type, "on": spec.noise_on},
    }
    router.spec.metrics = {"holdout_accuracy": report["holdout"]["accuracy"], **{
        f"holdout_recall_{name}": r for name, r in report["holdout"]["per_class_recall"].items()}}
    return router, report
