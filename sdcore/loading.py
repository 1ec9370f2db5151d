"""Loading what users have on disk, offline. For now: the CLIP tokenizer that SD 1.x and 2.x share, built
from the BPE merges bundled in the package (sdcore/data, MIT; see LICENSE-clip-bpe.txt), so no hub
download is ever needed."""
from __future__ import annotations

import functools
import gzip
from importlib import resources

# CLIP's vocabulary: 256 byte symbols, the same 256 ending a word ("</w>"), the first 48894 merges and the
# two special tokens: 49408 entries, with <|startoftext|> = 49406 and <|endoftext|> = 49407.
N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's map from each byte to a printable character (as in GPT-2 and CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's token -> id map and merge list, from the bundled merges file."""
    data = resources.files("sdcore").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + N_MERGES]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(vocab)}, merges


def default_tokenizer(model_max_length: int = 77):
    """A transformers ``CLIPTokenizer`` for SD 1.x / 2.x prompts, built offline from the bundled BPE."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), unk_token=EOS, bos_token=BOS,
                         eos_token=EOS, pad_token=EOS, model_max_length=model_max_length)
