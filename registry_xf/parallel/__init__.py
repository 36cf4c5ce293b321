"""Tensor parallel models: one model sharded over the ranks of a torch.distributed mesh."""
