"""Data and training for the quality benchmark: scikit-learn tasks, a small MLP, fine-tunes.

Real data shipped with scikit-learn (digits, wine, breast cancer, iris). A small
MLP backbone is pre-trained on a disjoint slice of all four tasks; copies are
then fine-tuned with deliberately different data volumes (``finetune``). Every
function is seeded explicitly, so the same seed gives the same models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from sklearn import datasets
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

State = Dict[str, torch.Tensor]

LOADERS: Dict[str, Callable] = {
    "digits": datasets.load_digits,
    "wine": datasets.load_wine,
    "breast_cancer": datasets.load_breast_cancer,
    "iris": datasets.load_iris,
}
INPUT_DIM = 64
"""Every task's standardised features are zero-padded to this width (digits has 64)."""


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run."""

    seeds: int
    hidden: int
    pretrain_steps: int
    finetune_steps: int
    finetune_epochs: int
    batch_size: int
    learning_rate: float
    pretrain_fraction: float
    multi_fractions: Tuple[float, ...]
    same_fractions: Tuple[float, ...]
    ties_density: float


SIZES: Dict[str, Settings] = {
    "full": Settings(
        seeds=10,
        hidden=128,
        pretrain_steps=100,
        finetune_steps=300,
        finetune_epochs=20,
        batch_size=32,
        learning_rate=1e-3,
        pretrain_fraction=0.1,
        multi_fractions=(0.05, 0.2, 0.5, 1.0),
        same_fractions=(0.05, 0.2, 1.0),
        ties_density=0.5,
    ),
    "tiny": Settings(
        seeds=2,
        hidden=32,
        pretrain_steps=40,
        finetune_steps=20,
        finetune_epochs=2,
        batch_size=32,
        learning_rate=1e-3,
        pretrain_fraction=0.2,
        multi_fractions=(0.05, 0.2, 0.5, 1.0),
        same_fractions=(0.05, 0.2, 1.0),
        ties_density=0.5,
    ),
}


@dataclass
class Task:
    """One dataset, split into pre-training, fine-tuning and test parts."""

    name: str
    classes: int
    pretrain: Tuple[torch.Tensor, torch.Tensor]
    finetune: Tuple[torch.Tensor, torch.Tensor]
    test: Tuple[torch.Tensor, torch.Tensor]


def load_tasks(seed: int, pretrain_fraction: float) -> List[Task]:
    """Stratified test / pre-train / fine-tune splits of every dataset for ``seed``."""
    tasks = []
    for name, loader in LOADERS.items():
        data = loader()
        x, y = data.data.astype(np.float32), data.target.astype(np.int64)
        x_rest, x_test, y_rest, y_test = train_test_split(
            x, y, test_size=0.3, stratify=y, random_state=seed
        )
        x_ft, x_pre, y_ft, y_pre = train_test_split(
            x_rest, y_rest, test_size=pretrain_fraction, stratify=y_rest, random_state=seed
        )
        scaler = StandardScaler().fit(x_rest)
        tasks.append(
            Task(
                name=name,
                classes=int(y.max()) + 1,
                pretrain=_tensors(scaler.transform(x_pre), y_pre),
                finetune=_tensors(scaler.transform(x_ft), y_ft),
                test=_tensors(scaler.transform(x_test), y_test),
            )
        )
    return tasks


def _tensors(x: np.ndarray, y: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    padded = np.zeros((x.shape[0], INPUT_DIM), dtype=np.float32)
    padded[:, : x.shape[1]] = x
    return torch.from_numpy(padded), torch.from_numpy(y)


def subsample(
    data: Tuple[torch.Tensor, torch.Tensor], fraction: float, classes: int, seed: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A stratified ``fraction`` of ``data`` with at least two examples per class."""
    x, y = data
    if fraction >= 1.0:
        return x, y
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for label in range(classes):
        rows = torch.nonzero(y == label).flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        count = min(rows.numel(), max(2, round(fraction * rows.numel())))
        keep.append(rows[:count])
    index = torch.cat(keep)
    return x[index], y[index]


def backbone(hidden: int) -> nn.Sequential:
    """The shared part of every model: two ReLU layers over the padded features."""
    return nn.Sequential(
        nn.Linear(INPUT_DIM, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
    )


def _train(
    body: nn.Module,
    heads: Dict[str, nn.Linear],
    batches: Sequence[Tuple[str, torch.Tensor, torch.Tensor]],
    learning_rate: float,
) -> None:
    parameters = list(body.parameters()) + [p for h in heads.values() for p in h.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    for name, x, y in batches:
        optimiser.zero_grad(set_to_none=True)
        loss_fn(heads[name](body(x)), y).backward()
        optimiser.step()


def _batches(
    name: str,
    data: Tuple[torch.Tensor, torch.Tensor],
    steps: Optional[int],
    epochs: Optional[int],
    batch_size: int,
    generator: torch.Generator,
) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
    """Mini-batches: ``steps`` random batches, or ``epochs`` shuffled passes."""
    x, y = data
    n = x.shape[0]
    out = []
    if steps is not None:
        for _ in range(steps):
            index = torch.randint(n, (min(batch_size, n),), generator=generator)
            out.append((name, x[index], y[index]))
        return out
    for _ in range(epochs or 0):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            out.append((name, x[index], y[index]))
    return out


@dataclass
class Pretrained:
    """The shared starting point: a backbone plus one head per task."""

    body: State
    heads: Dict[str, State]


def pretrain(tasks: Sequence[Task], settings: Settings, seed: int) -> Pretrained:
    """Multi-task pre-training on the disjoint pre-training slices (tasks interleaved)."""
    torch.manual_seed(seed)
    body = backbone(settings.hidden)
    heads = {t.name: nn.Linear(settings.hidden, t.classes) for t in tasks}
    generator = torch.Generator().manual_seed(seed)
    per_task = [
        _batches(t.name, t.pretrain, settings.pretrain_steps, None, settings.batch_size, generator)
        for t in tasks
    ]
    interleaved = [batch for step in zip(*per_task) for batch in step]
    _train(body, heads, interleaved, settings.learning_rate)
    return Pretrained(
        body=_clone(body.state_dict()),
        heads={name: _clone(head.state_dict()) for name, head in heads.items()},
    )


def _clone(state: State) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


@dataclass
class FineTune:
    """One fine-tuned copy: its backbone, head, task and number of training examples."""

    task: str
    volume: int
    body: State
    head: State


def finetune(
    start: Pretrained,
    task: Task,
    fraction: float,
    protocol: str,
    settings: Settings,
    seed: int,
) -> FineTune:
    """Fine-tune backbone and head of ``task`` on ``fraction`` of its fine-tuning split."""
    data = subsample(task.finetune, fraction, task.classes, seed)
    torch.manual_seed(seed)
    body = backbone(settings.hidden)
    body.load_state_dict(start.body)
    head = nn.Linear(settings.hidden, task.classes)
    head.load_state_dict(start.heads[task.name])
    generator = torch.Generator().manual_seed(seed)
    steps = settings.finetune_steps if protocol == "steps" else None
    epochs = settings.finetune_epochs if protocol == "epochs" else None
    batches = _batches(task.name, data, steps, epochs, settings.batch_size, generator)
    _train(body, {task.name: head}, batches, settings.learning_rate)
    return FineTune(
        task.name, int(data[0].shape[0]), _clone(body.state_dict()), _clone(head.state_dict())
    )


@torch.no_grad()
def accuracy(
    body: State, head: State, data: Tuple[torch.Tensor, torch.Tensor], hidden: int
) -> float:
    """Test accuracy of a backbone and head given as state dicts."""
    model = backbone(hidden)
    model.load_state_dict(body)
    linear = nn.Linear(hidden, head["weight"].shape[0])
    linear.load_state_dict(head)
    x, y = data
    return float((linear(model(x)).argmax(dim=1) == y).float().mean())
