"""The recurrent-decoding cache shared by the Mamba mixers (mamba-ssm's `_get_states_from_cache` contract)."""
from __future__ import annotations

from torch import Tensor


class RecurrentCache:
    """Mixin for a mixer with `layer_idx` and `allocate_inference_cache(batch_size, max_seqlen)`: its (conv_state,
    ssm_state) live in `inference_params.key_value_memory_dict[layer_idx]` (mamba-ssm's InferenceParams, or anything
    with that dict), allocated on first use."""

    def _get_states_from_cache(self, inference_params, batch_size: int,
                               initialize_states: bool = False) -> tuple[Tensor, Tensor]:
        if self.layer_idx is None:
            raise ValueError("recurrent inference (inference_params) needs the mixer built with layer_idx")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = self.allocate_inference_cache(batch_size, 0)
        elif initialize_states:
            for state in cache[self.layer_idx]:
                state.zero_()
        return cache[self.layer_idx]
