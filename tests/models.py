"""Small models built from torch.nn layers, shared by test_convert.py and test_ecosystem.py:
what convert() is for.  Each takes fixed-size inputs made by its `inputs` function."""
import torch
from torch import nn


class Captioner(nn.Module):
    """Image captioning in miniature (Show and Tell): a CNN encoder (conv, ReLU, LRN, max pool,
    conv, ReLU, avg pool, linear) whose image feature is the first input of an LSTM decoder
    over the embedded caption, and a linear head over the vocabulary.  16x16 images."""

    def __init__(self, vocab=11, embed=12, hidden=16):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.LocalResponseNorm(3, alpha=1e-2, k=2.0), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, embed))
        self.embed = nn.Embedding(vocab, embed)
        self.decoder = nn.LSTM(embed, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, images, captions):
        """Teacher forcing: the logits of every caption word (the image predicts the first)."""
        steps = torch.cat([self.encoder(images).unsqueeze(1), self.embed(captions[:, :-1])], 1)
        out, _ = self.decoder(steps)
        return self.head(out)

    @torch.no_grad()
    def greedy(self, images, length):
        """Decoding one word at a time, carrying the LSTM's (h, c) from step to step: (words,
        the logits of each step)."""
        step, state, words, logits = self.encoder(images).unsqueeze(1), None, [], []
        for _ in range(length):
            out, state = self.decoder(step, state)
            logits.append(self.head(out[:, -1]))
            words.append(logits[-1].argmax(-1))
            step = self.embed(words[-1]).unsqueeze(1)
        return torch.stack(words, 1), torch.stack(logits, 1)

    @staticmethod
    def inputs(batch=3, length=5, dtype=torch.float32, device="cpu", seed=0):
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(batch, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype).to(device)
        return images, torch.randint(0, 11, (batch, length), generator=g).to(device)


class Zoo(nn.Module):
    """Every layer convert() swaps, in one model: conv (reflect padding) -> LRN -> max pool (ceil
    mode) -> avg pool -> a sequence over the 2x2 positions -> RNN (relu, batch_first) -> GRU
    (bidirectional) -> LSTM (projections) -> RNNCell -> GRUCell -> LSTMCell over the steps, and a
    linear head over the final states.  8x8 images of 2 channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.lrn = nn.LocalResponseNorm(3, alpha=1e-2, k=2.0)
        self.max_pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.avg_pool = nn.AvgPool2d(2)
        self.rnn = nn.RNN(4, 6, nonlinearity="relu", batch_first=True)
        self.gru = nn.GRU(6, 5, bidirectional=True)
        self.lstm = nn.LSTM(10, 4, proj_size=3)
        self.rnn_cell = nn.RNNCell(3, 4)
        self.gru_cell = nn.GRUCell(4, 4)
        self.lstm_cell = nn.LSTMCell(4, 3)
        self.head = nn.Linear(18, 5)

    def forward(self, x):
        y = self.avg_pool(self.max_pool(self.lrn(self.conv(x))))     # (B, 4, 2, 2)
        seq = y.flatten(2).transpose(1, 2)                           # (B, T=4, 4)
        seq, _ = self.rnn(seq)
        seq, h = self.gru(seq.transpose(0, 1))                       # time-major from here
        seq, (hp, c) = self.lstm(seq)
        a = g = None
        state = None
        for step in seq:
            a = self.rnn_cell(step, a)
            g = self.gru_cell(a, g)
            state = self.lstm_cell(g, state)
        return self.head(torch.cat([state[0], state[1], h.sum(0), hp[0], c[0]], 1))

    @staticmethod
    def inputs(batch=3, dtype=torch.float32, device="cpu", seed=0):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, 2, 8, 8, generator=g, dtype=torch.float64).to(dtype).to(device),)


class CRNN(nn.Module):
    """A text-line recogniser in miniature (CRNN): conv, ReLU, LRN, max pool, conv, ReLU, avg pool,
    then the feature map read column by column by an LSTM, and a linear head per column.  The
    LSTM's input is the second conv's output as it comes (lower precision under autocast).
    8x16 images."""

    def __init__(self, classes=5):
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.LocalResponseNorm(3, alpha=1e-2, k=2.0),
                                 nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
        self.lstm = nn.LSTM(8 * 2, 12, batch_first=True)
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        f = self.cnn(x)                                              # (B, 8, 2, 4)
        out, _ = self.lstm(f.flatten(1, 2).transpose(1, 2))          # (B, 4 columns, 12)
        return self.head(out)

    @staticmethod
    def inputs(batch=4, dtype=torch.float32, device="cpu", seed=0):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, 1, 8, 16, generator=g, dtype=torch.float64).to(dtype).to(device),)
