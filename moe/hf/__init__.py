"""Conversion between our model and Hugging Face transformers checkpoints (no transformers needed).

    config.py    ModelConfig <-> config.json of Mixtral, Qwen2-MoE, Qwen3-MoE, ERNIE-4.5-MoE,
                 Llama, Mistral, Qwen2, Qwen3 (which architecture expresses a model, or why none does)
    weights.py   canonical state dict (moe/state.py) <-> that architecture's tensor names
    files.py     safetensors reading and writing: shards + index, header and shape checks, no pickle

moe/export.py owns the export directory itself and is what everything else calls.
"""
