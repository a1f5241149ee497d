"""MaxPool2d and AvgPool2d drop-ins."""
import torch

from ..ops.avg_pool2d import avg_pool2d
from ..ops.max_pool2d import max_pool2d


class MaxPool2d(torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d running convrnn.max_pool2d."""

    def forward(self, input):
        return max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                          ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class AvgPool2d(torch.nn.AvgPool2d):
    """torch.nn.AvgPool2d running convrnn.avg_pool2d."""

    def forward(self, input):
        return avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                          self.count_include_pad, self.divisor_override)
