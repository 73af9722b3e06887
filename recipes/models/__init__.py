"""Networks the recipes build: :mod:`recipes.models.vision` (ViT and ResNet, small from-scratch
configs or a checkpoint's). The BERT recipe loads its encoder with ``from_pretrained`` itself."""
