"""CPU stand-in for SGLang's ``sgl_kernel`` (see holderpo_megatron/rollout/sglang_cpu_shims).

Registers no ``torch.ops.sgl_kernel`` ops, so SGLang's AMX probe answers "no" and it uses its
plain-torch CPU paths. Only ``assign_req_to_token_pool_cpu`` is called on those paths; any other
name imports (SGLang imports several at module level) and raises NotImplementedError if called.
"""

import torch

__version__ = "0.0.0+holderpo.cpu.shim"
HOLDERPO_CPU_SHIM = True


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                  start_offset: torch.Tensor, end_offset: torch.Tensor,
                                  out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """For each request i: ``req_to_token[req_pool_indices[i], start[i]:end[i]]`` = the next
    ``end[i]-start[i]`` entries of ``out_cache_loc`` (requests' slots are concatenated in order)."""
    del pool_len  # the row length of req_to_token; implied by the tensor here
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    offset = 0
    for row, s, e in zip(rows, starts, ends):
        n = e - s
        if n > 0:
            req_to_token[row, s:e] = out_cache_loc[offset: offset + n].to(req_to_token.dtype)
        offset += n


def __getattr__(name):
    # SGLang imports many CPU kernel names at module level but, without AMX ops registered, calls
    # only the one above. Importing a name works; calling it says what is missing.
    if name.startswith("_"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available: this is holderpo's CPU stand-in for sgl_kernel "
            "(holderpo_megatron/rollout/sglang_cpu_shims), which implements only assign_req_to_token_pool_cpu"
        )

    unavailable.__name__ = unavailable.__qualname__ = name
    return unavailable
