"""Small helpers shared by the trainer tests."""

import ml_collections


def with_changes(config: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
    """Sets dotted fields (`"optim.name": "sgd"` via `**{...}`) on an unlocked view."""
    with config.unlocked():
        for key, value in changes.items():
            target = config
            *parents, leaf = key.split(".")
            for parent in parents:
                target = target[parent]
            target[leaf] = value
    return config
