"""Medical grounding on Qwen2-VL (ClinKD, METHODS.md section 3): MCG-RoPE position ids."""

from medistill.models.grounding.rope import decode_position_ids, mcg_rope_index

__all__ = ["decode_position_ids", "mcg_rope_index"]
