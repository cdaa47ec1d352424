"""A hand-written MNIST speed-run in plain PyTorch (no engine), the reference to beat.

In-memory tensors, a small conv net (24 5x5 / 32 3x3 / fc 256), Adam at 1e-2 with betas (0.7, 0.9),
a one-cycle schedule, batch 256, one epoch; then the whole test set. As public speed-run write-ups
give it; here to be timed as a whole process, start to exit.

    python benchmarks/speedrun.py [--data-dir DIR] [--seed 0]

Last line: val_accuracy=<fraction>
"""

import argparse
import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--data-dir", default="../shared/data")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--epochs", type=int, default=1)
args = p.parse_args()
torch.manual_seed(args.seed)

sets = [torchvision.datasets.MNIST(args.data_dir, train=t) for t in (True, False)]
(x, y), (vx, vy) = [(ds.data.float().div(255).sub(0.1307).div(0.3081).unsqueeze(1), ds.targets) for ds in sets]

model = nn.Sequential(
    nn.Conv2d(1, 24, 5), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(24, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(32 * 5 * 5, 256), nn.ReLU(), nn.Linear(256, 10),
)  # fmt: skip
batch = 256
steps_per_epoch = math.ceil(len(x) / batch)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.7, 0.9))
schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=args.epochs * steps_per_epoch)

for _epoch in range(args.epochs):
    model.train()
    order = torch.randperm(len(x))
    for i in range(steps_per_epoch):
        idx = order[i * batch : (i + 1) * batch]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

model.eval()
with torch.no_grad():
    correct = sum(int((model(vx[i : i + 2000]).argmax(1) == vy[i : i + 2000]).sum()) for i in range(0, len(vx), 2000))
print(f"val_accuracy={correct / len(vx):.4f}")
