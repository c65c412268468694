"""The measurement machinery behind `python -m gammacl.bench` and `python -m gammacl.profile`,
one module per job:

  cli       constants, the shared options, device and thread setup, the entry-point wrapper
  inputs    seeded features, a step in fwd / bwd / fwd+bwd, the 4-GEMM floor
  registry  gammacl's losses x backends (`LOSSES`: the one place to add a loss) and selection
  peers     naive, torch.compile, open_clip, memeff, inf_cl, siglip-kernel, the GEMM floor
  flops     FLOP formulas, each loss's scaling, the analytic memory models
  timing    triton.testing.do_bench on GPU, interleaved perf_counter quantiles on CPU
  memory    torch allocator / process RSS peaks of one call
  nvml      NVML device memory, matched to the torch device by UUID, sampled on a thread
  meta      run metadata, CSV / JSON files, text tables
  plots     the PNGs (matplotlib only when drawing)
"""
