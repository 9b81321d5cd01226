"""Zero-copy torch views of a reservation, mostly unmapped, on CUDA and on the host.

The whole reservation is exported once as a 1-D uint8 tensor and every K/V tensor is a
``view`` of a slice of it. On CUDA the export goes through ``__cuda_array_interface__``,
which torch accepts only when the first byte is mapped (it asks the driver which device
the pointer lives on) and which has no bf16 type string: the reservation therefore
starts with an anchor page that stays mapped, and exports bytes that are ``.view()``-ed
as the dtype. Nothing here touches the memory.
"""

from __future__ import annotations

import ctypes

import torch

from vattn.layout import Layout


class _DeviceBytes:
    """The minimal ``__cuda_array_interface__`` (v3) of a byte range."""

    def __init__(self, address: int, size_bytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (size_bytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
            "stream": None,
        }


def byte_view(address: int, size_bytes: int, device: torch.device) -> torch.Tensor:
    """A 1-D uint8 tensor over ``[address, address + size_bytes)`` without a copy.

    On CUDA the first page of the range must be mapped.
    """
    if device.type == "cuda":
        with torch.cuda.device(device):
            view = torch.as_tensor(_DeviceBytes(address, size_bytes), device=device)
    else:
        buffer = (ctypes.c_ubyte * size_bytes).from_address(address)
        view = torch.frombuffer(buffer, dtype=torch.uint8)
    assert view.data_ptr() == address and view.numel() == size_bytes
    return view


def kv_views(base: torch.Tensor, layout: Layout,
             dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V) views, each ``[max_batch_size, max_context_len, Hkv, D]``.

    ``per_layer``: each is a contiguous tensor of its own. ``token_major``: views
    ``[:, :, layer]`` of two ``[B, Lmax, num_layers, Hkv, D]`` tensors (sequence
    stride ``num_layers * Hkv * D``).
    """
    tensors = []
    for index in range(layout.num_tensors):
        start = layout.tensor_offset(index)
        flat = base[start:start + layout.tensor_bytes].view(dtype)
        shape: tuple[int, ...] = (layout.max_batch_size, layout.max_context_len,
                                  layout.num_kv_heads, layout.head_dim)
        if layout.kind == "token_major":
            shape = shape[:2] + (layout.num_layers,) + shape[2:]
        tensors.append(flat.view(shape))
    if layout.kind == "per_layer":
        return [(tensors[2 * i], tensors[2 * i + 1]) for i in range(layout.num_layers)]
    k, v = tensors
    return [(k[:, :, i], v[:, :, i]) for i in range(layout.num_layers)]
