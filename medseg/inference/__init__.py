"""Inference: load a model folder, run exact overlap-tile prediction, write labels on the
scan's own grid.

- :mod:`medseg.inference.tiled`: tile layout, the tiled forward pass, logits of an image;
- :mod:`medseg.inference.model_folder`: a training run's folder loaded as a network and plan;
- :mod:`medseg.inference.case`: one case, from its scans to labels on their grid;
- :mod:`medseg.inference.cohort`: folders and manifests of cases, shards, files written.

Nothing is imported here, so that ``import medseg.inference.tiled`` does not read the rest.
"""
