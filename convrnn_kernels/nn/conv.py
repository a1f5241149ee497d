"""Conv2d drop-in."""
import torch
import torch.nn.functional as F

from ..ops.conv2d import conv2d


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d running convrnn.conv2d: same constructor, parameters (and their
    initialisation), state_dict, repr and padding modes.  Non-'zeros' padding modes pad
    explicitly first, as torch.nn.Conv2d does."""

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            return conv2d(F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode),
                          weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
