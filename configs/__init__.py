"""Training configs (ml_collections), selected with --config=configs/vit.py:<args>."""
