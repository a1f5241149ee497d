"""One module per op: its functional wrapper, fake (meta) kernel and autograd formula."""
