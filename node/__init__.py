"""dvai-mesh node."""
