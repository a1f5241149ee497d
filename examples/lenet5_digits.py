"""LeNet-5 (LeCun et al. 1998) built from convrnn_kernels' Conv2d and AvgPool2d, trained on
the 8x8 handwritten digits that scikit-learn ships (1797 images, no download).

The inputs: LeNet-5 takes 32x32 images, and LeCun fed it 28x28 MNIST digits padded with a
2-pixel border, so that stroke ends reach the centre of the top feature detectors' receptive
fields.  We do the same: each 8x8 digit is upsampled bilinearly to 28x28 and zero-padded to
32x32.  The layers are the paper's: C1 conv 5x5 (6 maps, 28x28), S2 2x2 subsampling (14x14),
C3 conv 5x5 (16 maps, 10x10), S4 subsampling (5x5), C5 conv 5x5 (120 maps, 1x1), F6 (84)
and the 10 outputs, with tanh after each hidden layer.  Modern simplifications: S2/S4 are
plain average pooling (the paper's had a trainable scale and bias), C3 connects to all six
S2 maps, the output is a linear layer with cross-entropy instead of RBF units, and Adam.

    python examples/lenet5_digits.py            # 30 epochs, about 97-99% test accuracy
    python examples/lenet5_digits.py --short    # 12 epochs (what tests/test_examples.py runs)
"""
import sys

import torch
import torch.nn.functional as F

import convrnn_kernels as ck
from _common import Timer, parser, setup


class LeNet5(torch.nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.c1 = ck.nn.Conv2d(1, 6, 5)
        self.s2 = ck.nn.AvgPool2d(2)
        self.c3 = ck.nn.Conv2d(6, 16, 5)
        self.s4 = ck.nn.AvgPool2d(2)
        self.c5 = ck.nn.Conv2d(16, 120, 5)
        self.f6 = torch.nn.Linear(120, 84)
        self.out = torch.nn.Linear(84, classes)

    def forward(self, x):                       # x: (N, 1, 32, 32)
        x = self.s2(torch.tanh(self.c1(x)))     # (N, 6, 14, 14)
        x = self.s4(torch.tanh(self.c3(x)))     # (N, 16, 5, 5)
        x = torch.tanh(self.c5(x)).flatten(1)   # (N, 120)
        return self.out(torch.tanh(self.f6(x)))


def load_digits_32(test_fraction, seed):
    """scikit-learn's digits as (N, 1, 32, 32) float tensors scaled to mean 0, std 1 over the
    training images, split into train and test sets stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0      # (1797, 1, 8, 8)
    x = F.pad(F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False), (2, 2, 2, 2))
    y = torch.tensor(digits.target)
    tr, te = train_test_split(range(len(y)), test_size=test_fraction, stratify=digits.target, random_state=seed)
    tr, te = torch.tensor(tr), torch.tensor(te)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]


@torch.no_grad()
def accuracy(model, x, y, batch=500):
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(y), batch))
    model.train()
    return correct / len(y)


def main(argv=None):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="default 30, or 12 with --short")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args(argv)
    epochs = args.epochs or (12 if args.short else 30)
    device = setup(args)
    clock = Timer()

    xtr, ytr, xte, yte = (t.to(device) for t in load_digits_32(test_fraction=0.25, seed=args.seed))
    print(f"digits: {len(ytr)} training and {len(yte)} test images, 8x8 -> 28x28 -> padded to 32x32")
    model = LeNet5().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(args.seed)

    for epoch in range(1, epochs + 1):
        total = 0.0
        for idx in torch.randperm(len(ytr), generator=gen).split(args.batch):
            idx = idx.to(device)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if epoch == 1 or epoch % 5 == 0 or epoch == epochs:
            print(f"epoch {epoch:3d}  train loss {total / len(ytr):.4f}  test accuracy "
                  f"{accuracy(model, xte, yte):.2%}  ({clock():.1f} s)")

    result = {"test_accuracy": accuracy(model, xte, yte), "train_accuracy": accuracy(model, xtr, ytr),
              "epochs": epochs, "seconds": clock()}
    print(f"LeNet-5 on scikit-learn digits: test accuracy {result['test_accuracy']:.2%} "
          f"({len(yte)} held-out images), train accuracy {result['train_accuracy']:.2%}, "
          f"{epochs} epochs in {result['seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
