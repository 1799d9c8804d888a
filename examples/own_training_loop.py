"""A LoRA variant in a training loop of your own: DoRA on a small MLP that learns a new target function.

python examples/own_training_loop.py [variant]      # any name of `python -m lorafactory.variants`
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import lorafactory

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
x = torch.randn(256, 16)
y = torch.sin(x[:, :1] * 2) + x[:, 1:2] ** 2  # a function the random MLP does not compute
batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]

variant = sys.argv[1] if len(sys.argv) > 1 else "dora"
# Adapt the two hidden layers; the output layer trains in full as the "head".
adapted = lorafactory.adapt(model, variant, r=4, targets=["0", "2"], head=["4"])
print(f"{variant}: {adapted.trainable_parameters} trainable parameters")


def loss_of(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(m(batch[0]), batch[1])


adapted.init_from_data(batches, loss_of)  # data-dependent initialisations (LoRA-GA, ...); a no-op for most
optimizer = adapted.optimizer(lr=1e-2)
epochs = 40
adapted.start(total_steps=epochs * len(batches))
step, first = 0, None
for _ in range(epochs):
    for batch in batches:
        loss = loss_of(model, batch)
        first = loss.item() if first is None else first
        adapted.loss(loss).backward()
        adapted.after_backward()
        adapted.before_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        optimizer = adapted.after_step(step, optimizer)
adapted.end()

model.eval()
with torch.no_grad():
    predictions = model(x)
    final = nn.functional.mse_loss(predictions, y).item()
    if adapted.variant.mergeable:  # a plain nn.Sequential again, computing the same function
        merged = adapted.merge_and_unload()
        assert torch.allclose(merged(x), predictions, atol=1e-5)
print(f"training loss {first:.3f} -> {final:.3f}")
