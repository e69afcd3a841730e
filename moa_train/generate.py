"""`moa-generate RUN_DIR_OR_EXPORT --prompt TEXT`: sample text from a trained model.

Greedy decoding at temperature 0; otherwise sampling with temperature, top-k and top-p (nucleus)
filtering from a seeded generator, so the same seed gives the same text. A key/value cache keeps
the keys and values of every earlier position, so each new token costs one position's forward pass
instead of the whole prefix's (`--no-cache` turns it off, for comparison). A model is trained at
`train.seq_len` positions; generating beyond them (RoPE extrapolation) must be asked for.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError


class KVCache:
    """Keys and values per layer, (B, H, T, D), grown by `update` (the protocol of transformers' DynamicCache)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def get_seq_length(self, layer: int = 0) -> int:
        return self.keys[layer].shape[2] if self.keys else 0


@dataclass
class Sampling:
    max_new_tokens: int = 100
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int = 0
    stop_token: int | None = None  # the end-of-text id: generation ends there

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens}).")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (got {self.temperature}; 0 is greedy).")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (got {self.top_k}; 0 turns it off).")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must lie in (0, 1] (got {self.top_p}; 1 turns it off).")


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) chosen ids."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = logits.sort(-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= sampling.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(model, prompt: list[int], sampling: Sampling, use_cache: bool = True) -> list[int]:
    """The new token ids after `prompt` (ids), at most sampling.max_new_tokens, ending at the stop token."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(sampling.seed)
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    cache = KVCache() if use_cache else None
    new: list[int] = []
    step_input = tokens
    for _ in range(sampling.max_new_tokens):
        logits = model(step_input if use_cache else tokens, cache=cache)[:, -1]
        token = next_token(logits, sampling, generator)
        new.append(int(token))
        if sampling.stop_token is not None and new[-1] == sampling.stop_token:
            break
        step_input = token.view(1, 1)
        tokens = torch.cat([tokens, step_input], dim=1)
    return new


def check_length(prompt_tokens: int, max_new_tokens: int, trained_positions: int, extrapolate: bool) -> None:
    if prompt_tokens + max_new_tokens > trained_positions and not extrapolate:
        raise UserError(
            f"the prompt ({prompt_tokens} tokens) and --max-new-tokens {max_new_tokens} need "
            f"{prompt_tokens + max_new_tokens} positions, but the model was trained at {trained_positions} "
            f"(train.seq_len). Shorten them, or pass --extrapolate to generate beyond (RoPE extrapolation: the "
            f"quality beyond the trained length is not known).")


def read_prompts(prompts: list[str], prompt_file: Path | None) -> list[str]:
    found = list(prompts)
    if prompt_file is not None:
        try:
            found += [line.rstrip("\n") for line in prompt_file.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise UserError(f"--prompt-file '{prompt_file}' cannot be read ({exc.strerror}).") from None
    if not found:
        raise UserError("no prompt: give --prompt TEXT (several times for several) or --prompt-file FILE "
                        "(one prompt per line).")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moa-generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", type=Path, help="a run directory, one of its checkpoints, or a moa-export directory")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    parser.add_argument("--prompt-file", type=Path, help="a file of prompts, one per line")
    defaults = Sampling()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0: greedy decoding")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="keep the k likeliest tokens; 0: all")
    parser.add_argument("--top-p", type=float, default=defaults.top_p,
                        help="keep the likeliest tokens that hold this much probability; 1: all")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="the same seed gives the same text")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix at every token")
    parser.add_argument("--extrapolate", action="store_true",
                        help="allow generating beyond the trained sequence length (RoPE extrapolation)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    args = parser.parse_args(argv)
    try:
        from .trained import load_trained

        loaded = load_trained(args.model)
        tokenizer = loaded.tokenizer()
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                            loaded.eot_id)
        sampling.check()
        prompts = read_prompts(args.prompt, args.prompt_file)
        encoded = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
        for ids in encoded:
            check_length(len(ids), args.max_new_tokens, loaded.seq_len, args.extrapolate)
        for prompt, ids in zip(prompts, encoded):
            new = generate(loaded.model, ids or [loaded.eot_id], sampling, use_cache=not args.no_cache)
            text = tokenizer.decode([t for t in new if t != loaded.eot_id])
            if args.json:
                print(json.dumps({"prompt": prompt, "completion": text, "tokens": new}))
            else:
                print(f"{prompt}{text}\n")
    except UserError as exc:
        print(f"moa-generate: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
