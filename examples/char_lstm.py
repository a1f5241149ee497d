"""A character-level LSTM (convrnn_kernels.nn.LSTM) that first learns the lecture's "hello"
example and then the opening of Alice's Adventures in Wonderland, and samples from it.

Part 1, the lecture's example: vocabulary [h, e, l, o], training sequence "hello".  Given the
inputs "hell" (one-hot vectors) the network must predict "ello", one next character per
step; the two "l" inputs need different answers ("l", then "o"), so the state must remember
what came before.  Then, fed "h" and its own greedy predictions, it spells "hello".

Part 2: the same kind of model on examples/data/alice_ch1.txt, the first ten paragraphs of
Chapter I of Lewis Carroll's "Alice's Adventures in Wonderland" (1865, public domain; the
text of Project Gutenberg eBook #11, Millennium Fulcrum Edition 3.0, with ASCII quotes),
about 5 KB and 61 distinct characters.  It trains on random 64-character windows (one-hot
inputs, cross-entropy on every next character), reports the mean loss over the whole text
before and after, and samples 300 characters from the prompt "Alice ".

    python examples/char_lstm.py            # 800 steps on the text
    python examples/char_lstm.py --short    # 200 steps (what tests/test_examples.py runs)
"""
import os
import sys

import torch
import torch.nn.functional as F

import convrnn_kernels as ck
from _common import Timer, parser, setup

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "alice_ch1.txt")


class CharLSTM(torch.nn.Module):
    """One-hot characters -> LSTM -> a linear layer giving next-character logits."""

    def __init__(self, vocab, hidden):
        super().__init__()
        self.vocab = vocab
        self.lstm = ck.nn.LSTM(vocab, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids, state=None):         # ids: (B, T) character indices
        out, state = self.lstm(F.one_hot(ids, self.vocab).float(), state)
        return self.head(out), state            # logits (B, T, vocab)


def encode(text, chars):
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text])


@torch.no_grad()
def generate(model, chars, prompt, length, temperature=0.0, generator=None):
    """Feed the prompt, then `length` characters, each the model's prediction for the next
    one: greedy (temperature 0) or drawn from softmax(logits / temperature)."""
    device = next(model.parameters()).device
    logits, state = model(encode(prompt, chars).unsqueeze(0).to(device))
    out = []
    for _ in range(length):
        last = logits[0, -1]
        if temperature > 0:
            probs = torch.softmax(last.float().cpu() / temperature, dim=0)
            nxt = torch.multinomial(probs, 1, generator=generator).item()
        else:
            nxt = last.argmax().item()
        out.append(chars[nxt])
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    return "".join(out)


def learn_hello(device, steps):
    """The lecture's example: train on "hell" -> "ello" until every greedy prediction is right."""
    chars = "helo"
    x = encode("hell", chars).unsqueeze(0).to(device)
    y = encode("ello", chars).unsqueeze(0).to(device)
    model = CharLSTM(len(chars), hidden=16).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(1, steps + 1):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            predicted = "".join(chars[i] for i in model(x)[0].argmax(-1)[0].tolist())
        if predicted == "ello" and loss.item() < 0.05:
            break
    spelled = "h" + generate(model, chars, "h", 4)
    print(f'hello: after {step} steps (loss {loss.item():.4f}) the input "hell" gives "{predicted}"; '
          f'from "h", greedy: "{spelled}"')
    return predicted, spelled


@torch.no_grad()
def text_loss(model, data, seq_len, device):
    """Mean next-character cross-entropy (nats) over the whole text, in windows of seq_len
    (each window starts from a zero state, as in training)."""
    n = (len(data) - 1) // seq_len * seq_len
    x = data[:n].view(-1, seq_len).to(device)
    y = data[1:n + 1].view(-1, seq_len).to(device)
    return F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item()


def learn_text(device, steps, seq_len, batch, hidden, lr, seed):
    text = open(TEXT, encoding="utf-8").read()
    chars = "".join(sorted(set(text)))
    data = encode(text, chars)
    print(f"text: {os.path.relpath(TEXT)}, {len(text)} characters, vocabulary of {len(chars)}")
    model = CharLSTM(len(chars), hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    start_loss = text_loss(model, data, seq_len, device)
    print(f"step {0:5d}  loss over the text {start_loss:.3f}")
    clock = Timer()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
        window = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).to(device)
        logits, _ = model(window[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            print(f"step {step:5d}  batch loss {loss.item():.3f}  ({clock():.1f} s)")
    end_loss = text_loss(model, data, seq_len, device)
    sample = "Alice " + generate(model, chars, "Alice ", 300, temperature=0.5, generator=gen)
    return start_loss, end_loss, sample


def main(argv=None):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="training steps on the text: default 800, 200 with --short")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-3)
    args = p.parse_args(argv)
    steps = args.steps or (200 if args.short else 800)
    device = setup(args)
    clock = Timer()

    predicted, spelled = learn_hello(device, steps=300)
    start_loss, end_loss, sample = learn_text(device, steps, args.seq_len, args.batch, args.hidden, args.lr, args.seed)
    print(f"\nsample (temperature 0.5):\n{sample}\n")
    print(f'char-LSTM: "hell" -> "{predicted}", spelled "{spelled}"; loss over the text {start_loss:.3f} -> '
          f"{end_loss:.3f} nats/char after {steps} steps; {clock():.1f} s")
    return {"hello_predicted": predicted, "hello_spelled": spelled, "start_loss": start_loss, "end_loss": end_loss,
            "sample": sample, "seconds": clock()}


if __name__ == "__main__":
    main(sys.argv[1:])
