"""python -m torch_cnnbp demo: a LeNet-5 of torch_cnnbp's modules learns real handwritten digits,
side by side with an identically initialised LeNet-5 of PyTorch's modules on the same batches.

The data are scikit-learn's 8×8 digits (1,797 images that ship inside scikit-learn; install it with
``pip install scikit-learn``, or ``pip install -e ".[demo]"``). Both networks start from the same
weights and take the same SGD steps, so they differ only by how the two implementations round:
the demo prints, per epoch, both losses, both test accuracies and the largest parameter difference,
and checks at the end that the difference stayed within float32 tolerance and that the test
accuracy reached 95%. ``--plot FILE.png`` saves the two loss curves (needs matplotlib).

Why tanh and a modest learning rate: with ReLU and large steps this small network's training is
chaotic. Two *native* runs whose initial weights differ by one rounding (1e-7) then end up 0.1-1 apart,
so a side-by-side comparison would measure the chaos, not the kernels. In the smooth regime chosen here
the two implementations stay within ~1e-6 of each other for the whole run.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_cnnbp

TARGET_ACCURACY = 0.95
# Largest |ours − native| over all parameters after training, relative to the largest parameter.
# Both run the same float32 steps; rounding differences (~1e-7 per op) grow a little over ~700 steps.
PARAMETER_TOLERANCE = 1e-4


class LeNet5(nn.Module):
    """LeNet-5's layout scaled to 8×8 inputs, with its tanh activations: conv 5×5 (6) → max-pool →
    conv 3×3 (16) → max-pool → 120 → 84 → 10. `conv` and `pool` are the module classes to build it from."""

    def __init__(self, conv=torch_cnnbp.Conv2d, pool=torch_cnnbp.MaxPool2d):
        super().__init__()
        self.features = nn.Sequential(
            conv(1, 6, 5, padding=2), nn.Tanh(), pool(2),      # 6 × 8 × 8  -> 6 × 4 × 4
            conv(6, 16, 3, padding=1), nn.Tanh(), pool(2),     # 16 × 4 × 4 -> 16 × 2 × 2
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, 120), nn.Tanh(),
                                        nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def load_data(seed: int):
    """(train_x, train_y, test_x, test_y): the 8×8 digits scaled to [0, 1], a stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed,
                                           stratify=y.numpy())
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return correct


def max_parameter_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


class Progress:
    """One line per epoch; on a terminal, a bar that fills while the epoch runs."""

    def __init__(self, stream=sys.stdout):
        self.stream, self.live = stream, stream.isatty()

    def update(self, epoch, epochs, done, total):
        if self.live:
            bar = "#" * (20 * done // total)
            self.stream.write(f"\repoch {epoch:2d}/{epochs} [{bar:<20s}] {done}/{total} batches")
            self.stream.flush()

    def line(self, text):
        if self.live:
            self.stream.write("\r" + " " * 60 + "\r")
        print(text, file=self.stream, flush=True)


def train(epochs: int = 15, batch_size: int = 32, lr: float = 0.02, seed: int = 0, stream=sys.stdout):
    """Trains both networks; returns a dict with the history and the final verdicts."""
    train_x, train_y, test_x, test_y = load_data(seed)
    torch.manual_seed(seed)
    ours = LeNet5(torch_cnnbp.Conv2d, torch_cnnbp.MaxPool2d)
    native = LeNet5(nn.Conv2d, nn.MaxPool2d)
    native.load_state_dict(ours.state_dict())  # identical initial weights
    models = {"ours": ours, "native": native}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for k, m in models.items()}
    order = torch.Generator().manual_seed(seed)
    history = {"step_loss": {"ours": [], "native": []}, "epochs": []}
    progress = Progress(stream)
    n_batches = (len(train_y) + batch_size - 1) // batch_size
    print(f"LeNet-5 on scikit-learn's 8x8 digits: {len(train_y)} training and {len(test_y)} test images, "
          f"{epochs} epochs of {n_batches} batches, SGD lr={lr} momentum=0.9, float32", file=stream)
    print(f"{'epoch':>5}  {'loss ours':>10} {'loss native':>11}  {'test acc ours':>13} {'native':>7}  "
          f"{'max |param diff|':>16}  {'time':>5}", file=stream)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        permutation = torch.randperm(len(train_y), generator=order)
        sums = {"ours": 0.0, "native": 0.0}
        for i in range(n_batches):
            idx = permutation[i * batch_size:(i + 1) * batch_size]
            for name, model in models.items():  # the same batch for both
                optimizers[name].zero_grad()
                loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
                loss.backward()
                optimizers[name].step()
                history["step_loss"][name].append(loss.item())
                sums[name] += loss.item() * len(idx)
            progress.update(epoch, epochs, i + 1, n_batches)
        row = dict(epoch=epoch, loss_ours=sums["ours"] / len(train_y), loss_native=sums["native"] / len(train_y),
                   acc_ours=accuracy(ours, test_x, test_y), acc_native=accuracy(native, test_x, test_y),
                   diff=max_parameter_difference(ours, native), time=time.perf_counter() - start)
        history["epochs"].append(row)
        progress.line(f"{epoch:5d}  {row['loss_ours']:10.4f} {row['loss_native']:11.4f}  {row['acc_ours']:13.2%} "
                      f"{row['acc_native']:7.2%}  {row['diff']:16.2e}  {row['time']:4.1f}s")
    scale = max(p.abs().max().item() for p in native.parameters())
    last = history["epochs"][-1]
    history.update(
        relative_diff=last["diff"] / scale,
        close=last["diff"] <= PARAMETER_TOLERANCE * scale,
        accurate=last["acc_ours"] >= TARGET_ACCURACY,
    )
    return history


def plot(history, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return False
    ours, native = history["step_loss"]["ours"], history["step_loss"]["native"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    top.plot(native, label="native (torch.nn)", color="tab:blue", linewidth=2.5, alpha=0.5)
    top.plot(ours, label="ours (torch_cnnbp)", color="tab:red", linewidth=1, linestyle="--")
    top.set_ylabel("training loss (per batch)")
    top.set_yscale("log")
    top.legend()
    top.set_title("LeNet-5 on scikit-learn's 8x8 digits")
    bottom.plot([abs(a - b) + 1e-12 for a, b in zip(ours, native)], color="tab:gray", linewidth=0.8)
    bottom.set_yscale("log")
    bottom.set_ylabel("|ours - native|")
    bottom.set_xlabel("training step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_cnnbp demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the networks are tiny, more threads only add overhead)")
    parser.add_argument("--plot", metavar="FILE.png", help="save both loss curves to this PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("The demo trains on scikit-learn's digits dataset, and scikit-learn is not installed.\n"
              "Install it with:\n    pip install scikit-learn\n"
              "(or, from the repository root: pip install -e \".[demo]\")", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    history = train(args.epochs, args.batch_size, args.lr, args.seed)
    last = history["epochs"][-1]
    print(f"\ntest accuracy: ours {last['acc_ours']:.2%}, native {last['acc_native']:.2%} "
          f"(target >= {TARGET_ACCURACY:.0%}: {'reached' if history['accurate'] else 'NOT reached'})")
    print(f"largest parameter difference ours vs native: {last['diff']:.2e}, {history['relative_diff']:.1e} of the "
          f"largest parameter ({'within' if history['close'] else 'OUTSIDE'} float32 tolerance "
          f"{PARAMETER_TOLERANCE:g})")
    if args.plot and plot(history, args.plot):
        print(f"loss curves saved to {args.plot}")
    return 0 if history["accurate"] and history["close"] else 1


if __name__ == "__main__":
    sys.exit(main())
