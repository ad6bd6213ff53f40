"""Tiny randomly initialised models and tokenizers, built offline for fast tests."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer (any text encodes) with a ChatML chat template; EOS is <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def build_tiny_llama(tokenizer, seed: int = 0):
    """A 2-layer Llama with hidden size 32, randomly initialised from `seed`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def save_tiny_llama(path: Path, texts: list[str]) -> Path:
    """Build and save a tiny Llama + tokenizer as a local model folder."""
    tokenizer = build_tiny_tokenizer(texts)
    model = build_tiny_llama(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_config(arch: str, tokenizer, hidden: int = 64):
    """Config of a 2-layer model of `arch` (the families the seeds fine-tune). Widths are multiples of 64,
    the smallest bitsandbytes' CPU 4-bit kernels take."""
    from transformers import DistilBertConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

    common = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if arch == "llama":
        return LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=None,
            tie_word_embeddings=False,
            **common,
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            rotary_pct=0.25,
            bos_token_id=None,
            **common,
        )
    if arch == "opt":
        return OPTConfig(
            hidden_size=hidden,
            ffn_dim=4 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=hidden,
            max_position_embeddings=512,
            bos_token_id=tokenizer.eos_token_id,
            **common,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden, n_layer=2, n_head=4, n_positions=512, bos_token_id=tokenizer.eos_token_id, **common
        )
    if arch == "distilbert":
        return DistilBertConfig(
            dim=hidden,
            hidden_dim=4 * hidden,
            n_layers=2,
            n_heads=4,
            max_position_embeddings=512,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    raise ValueError(arch)


def save_tiny_model(path: Path, texts: list[str], arch: str = "llama", seed: int = 0) -> Path:
    """A tiny randomly initialised model of `arch` + tokenizer as a local model folder (DistilBERT: the
    encoder alone, as a classification backbone)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer(texts)
    torch.manual_seed(seed)
    config = tiny_config(arch, tokenizer)
    model = AutoModel.from_config(config) if arch == "distilbert" else AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
