"""The engine directory: its format (config, rank files, checksums), the runtime weight
layout it holds, tensor parallelism's rank slices, where it is written and the kernels
compiled with it."""
