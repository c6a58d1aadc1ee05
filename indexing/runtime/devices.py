"""Which engine runs the dense matrix work of training and search: faiss on its GPUs, torch on a CUDA
device, or faiss on the CPU.

The index files are CPU faiss indexes whatever ran (a GPU-trained index is a normal index on object
storage); only the heavy inner loops move: the coarse k-means of training
(``copyscan.indexing.build.clustering``) and the coarse assignment of every query block in the scan
(``copyscan.search.ann.coarse``). ``faiss-gpu`` needs a faiss built with GPUs (the ``.[gpu]`` extra);
``torch`` needs nothing more than torch, and runs on the CPU where torch sees no CUDA device (how its code is
tested without a GPU).
"""

from __future__ import annotations

import faiss

DEVICES = ("auto", "cpu", "faiss-gpu", "torch")


def compute_device(requested: str = "auto", key: str = "device") -> str:
    """``faiss-gpu``, ``torch`` or ``cpu``: what runs the work in this process. ``auto``: faiss's GPUs when
    the installed faiss has some, else torch when it sees a CUDA device, else the CPU; any other value is
    taken as asked (``key`` names the setting in the error for a value not in ``DEVICES``)."""
    if requested not in DEVICES:
        raise ValueError(f"{key} must be one of {', '.join(DEVICES)}, not {requested!r}")
    if requested != "auto":
        return requested
    if faiss.get_num_gpus() > 0:
        return "faiss-gpu"
    return "torch" if torch_device() == "cuda" else "cpu"


def torch_device() -> str:
    """``cuda`` when torch sees a CUDA device in this process (a Ray task or actor sees the GPUs it holds),
    else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
