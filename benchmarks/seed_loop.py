"""The seed's hand-written MNIST loop in plain PyTorch (no engine), with its two bugs fixed.

Its CNN (conv32 -> conv64 -> maxpool -> dropout -> fc128 -> dropout -> fc10), Adam at 1e-3,
cross-entropy, batch 64 through a DataLoader with ToTensor + Normalize, validation under
``torch.no_grad()``, a line per epoch; per-sample means. Timed as a whole process, start to exit.

    python benchmarks/seed_loop.py [--data-dir DIR] [--epochs 3] [--limit-train-batches N]

Last line: val_accuracy=<fraction>
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--data-dir", default="../shared/data")
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--limit-train-batches", type=int, default=None, help="training batches per epoch (default: all)")
args = p.parse_args()
torch.manual_seed(args.seed)

tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
train_loader = DataLoader(datasets.MNIST(args.data_dir, train=True, transform=tf), batch_size=64, shuffle=True)
val_loader = DataLoader(datasets.MNIST(args.data_dir, train=False, transform=tf), batch_size=1000)
model = nn.Sequential(
    nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
    nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10),
)  # fmt: skip
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

for epoch in range(1, args.epochs + 1):
    started = time.perf_counter()
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for batch, (x, y) in enumerate(train_loader, 1):
        optimizer.zero_grad()  # the seed's order: clear, forward, loss, backward, step
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * y.shape[0]
        correct += int((out.argmax(1) == y).sum())
        seen += y.shape[0]
        if batch == args.limit_train_batches:
            break
    model.eval()
    val_correct = 0
    with torch.no_grad():
        for x, y in val_loader:
            val_correct += int((model(x).argmax(1) == y).sum())
    accuracy = val_correct / len(val_loader.dataset)
    print(f"Epoch {epoch}, Train Loss: {loss_sum / seen:.4f}, Train Accuracy: {correct / seen * 100:.2f}%, "
          f"Val Accuracy: {accuracy * 100:.2f}%, epoch_seconds={time.perf_counter() - started:.2f}", flush=True)
print(f"val_accuracy={accuracy:.4f}")
