"""hqlt.blocks — registries of KV memories, FW memories, blends and mixes; the hybrid layer; the model.

    from hqlt.blocks import build_model, model_config
    model = build_model({"vocab_size": 16, "d_model": 64, "layers": "H"})

Names are loaded on first use, so `hqlt.blocks.validation` (ConfigError, the validator) imports without torch.
"""
from importlib import import_module

_EXPORTS = {
    "ConfigError": "validation", "build": "validation",
    "Registry": "registry", "REGISTRIES": "registry", "KV": "registry", "FW": "registry", "BLEND": "registry",
    "MIX": "registry",
    "LAYER_KINDS": "model_schema", "MixerConfig": "model_schema", "ModelConfig": "model_schema",
    "model_config": "model_schema",
    "Estimate": "estimators", "estimate": "estimators", "param_count": "estimators",
    "SIZE_PRESETS": "sizes", "resized": "sizes",
    "HybridMixer": "mixer", "HybridLM": "model", "build_model": "model",
}


def __getattr__(name):
    if name in _EXPORTS:
        module = import_module(f".{_EXPORTS[name]}", __name__)
        if _EXPORTS[name] == "registry":
            import_module(".model_schema", __name__)  # registers the built-in entries
        return getattr(module, name)
    raise AttributeError(f"module 'hqlt.blocks' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
