"""io: read checkpoints (HF folders, shards, single files, PEFT adapters) and write them (streamed shards, the
one atomic publish). May import only ``mergekit_safe.errors`` and ``mergekit_safe.kernels``."""
