"""The Ray Serve side of ``[inference] backend = "ray"``: run by ``dmg-node inference-serve``, never by the node."""
