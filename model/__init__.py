"""Plain nn.Modules: the TNL decoder, the softmax baseline, lightning-attention ops. No torch.distributed here."""
from .config import ModelConfig


def build_model(cfg: ModelConfig):
    """Build the model named by cfg.arch on the current default device, weights initialised."""
    cfg.validate()
    if cfg.arch == "tnl":
        from .tnl import TransnormerLM

        return TransnormerLM(cfg)
    if cfg.arch == "sharedllm":  # forward(input_ids, context_chunks=...): see model.sharedllm
        from .sharedllm import SharedLLM

        return SharedLLM(cfg)
    from .llama import LlamaLM

    return LlamaLM(cfg)


__all__ = ["ModelConfig", "build_model"]
