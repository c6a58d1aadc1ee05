"""The embedders: networks in plain torch (EfficientNet-Lite0, ViT), SSCD and CLIP TorchScript wrappers, CLIP from
open_clip checkpoints (optional), the copy-detection descriptor, the embedder registry, and the region boxes of
partial copies."""
