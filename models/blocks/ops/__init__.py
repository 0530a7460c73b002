"""How a Mamba layer is computed: the ops, each a portable PyTorch twin next to mamba-ssm's fused kernel.

`dispatch.kernel_op` is the one mechanism that picks between the two (CUDA + kernels available, or the portable
twin; `MAMBA_ZOO_PORTABLE=1` forces the portable path; `route_kernels` lets tests stand references in for kernels).

- `selective_scan`: Mamba-1 selective scan (`selective_scan_fn`, `selective_state_update`, `selective_scan_tm`).
- `ssd`: Mamba-2 chunked SSD (`mamba_chunk_scan_combined`, `mamba_split_conv1d_scan_combined`, `ssd_state_update`,
  `split_zxbcdt`).
- `causal_conv`: causal depthwise conv (`causal_conv1d_fn`, `causal_conv1d_update`).
- `rms_norm`: RMSNorm with fused residual add (`rms_norm`) and gated grouped RMSNorm (`gated_rms_norm`).
"""
