"""facelens benchmarks: ratios measured in the same run (against a floor or a peer), never timed asserts."""
