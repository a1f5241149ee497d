"""LocalResponseNorm drop-in."""
import torch

from ..ops.local_response_norm import local_response_norm


class LocalResponseNorm(torch.nn.LocalResponseNorm):
    """torch.nn.LocalResponseNorm running convrnn.local_response_norm."""

    def forward(self, input):
        return local_response_norm(input, self.size, self.alpha, self.beta, self.k)
