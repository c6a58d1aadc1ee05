"""Memorised-prompt discovery from generations alone (Carlini et al. 2023): cliques of near-identical images
per prompt; its Ray job."""
