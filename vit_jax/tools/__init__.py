"""Developer tools: step and input benchmarks, the shard writer, sample photos."""
