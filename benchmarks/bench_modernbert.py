"""ModernBERT-base (random weights, real sizes) inference on ragged batches: transformers' SDPA path vs the
drop-in, 2 threads, min of 2 calls after a warm-up. Run: python benchmarks/bench_modernbert.py"""

import time

import torch
from transformers import ModernBertConfig, ModernBertModel

import bertfast

BATCHES = ([512, 320, 160, 64], [2048, 1024, 512, 256])  # real tokens per row


def timed(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, torch.Tensor]:
    model(ids, attention_mask=mask)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = model(ids, attention_mask=mask).last_hidden_state
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    torch.set_num_threads(2)
    config = ModernBertConfig(vocab_size=50368, hidden_size=768, intermediate_size=1152, num_hidden_layers=22,
                              num_attention_heads=12, local_attention=128, global_attn_every_n_layers=3,
                              max_position_embeddings=8192, pad_token_id=50283, attn_implementation="sdpa")
    torch.manual_seed(0)
    reference = ModernBertModel(config).eval()
    fast = bertfast.accelerate(ModernBertModel(config).eval())
    fast.load_state_dict(reference.state_dict())
    for lengths in BATCHES:
        ids = torch.randint(5, 50000, (len(lengths), max(lengths)))
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        with torch.no_grad():
            t_ref, out_ref = timed(reference, ids, mask)
            t_fast, out_fast = timed(fast, ids, mask)
        err = (out_fast - out_ref)[mask.bool()].abs().max().item()
        print(f"rows {lengths}: transformers {t_ref * 1e3:.0f} ms, bertfast {t_fast * 1e3:.0f} ms, "
              f"{t_ref / t_fast:.2f}x, max error {err:.1e}")


if __name__ == "__main__":
    main()
