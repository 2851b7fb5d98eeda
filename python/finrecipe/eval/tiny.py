"""Tiny local models for tests, benchmarks and demos: a byte-level BPE tokenizer trained on the
given text (so Japanese tokenizes) and a randomly initialised small Llama saved in HF format.
Nothing here touches the network."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SAMPLE_TEXT = [
    "以下の問題の適切な答えを選択肢から選んでアルファベットで答えなさい。",
    "センテンス: 当期の業績は増収増益となりました。\nターゲット: 業績\n回答: positive",
    "【問題】\n次の記述のうち、最も不適切なものはどれか。\n\n【答え】\nA",
    "The quick brown fox jumps over the lazy dog. 0123456789 ABCDE abcde",
    "ユーザー: 与えられた選択肢の中から、最適な答えを選んでください。\nシステム: 分かりました。",
    "金融商品取引業者等は、有価証券の売買の勧誘を行う者について、外務員の登録をしなければならない。",
    "[問題]:[選択肢]:[答え]: 質問: 回答: ### 入力: ### 応答: [INST] [/INST] <<SYS>> positive negative",
]


def build_tokenizer(out_dir: Path, texts: Iterable[str] = (), vocab_size: int = 512, *,
                    bos_with_special_tokens: bool = False) -> None:
    """Train a byte-level BPE on `texts` (plus a built-in sample) and save it in HF format.
    `bos_with_special_tokens`: encoding with special tokens prepends BOS (as Gemma's tokenizer does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(SAMPLE_TEXT) + list(texts), trainer=trainer)
    if bos_with_special_tokens:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(str(out_dir))
    # Name a class both transformers 4 and 5 know (5 writes "TokenizersBackend").
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")


def build_tiny_llama(out_dir: str | Path, texts: Iterable[str] = (), *, vocab_size: int = 512,
                     hidden: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 2048,
                     seed: int = 0, model_vocab: int | None = None) -> Path:
    """A small random Llama with a locally trained tokenizer, saved to `out_dir`.

    `model_vocab` pads the embedding / output matrices beyond the tokenizer's size (as real models
    often do), e.g. to give a tiny model a realistic 32k-row output layer."""
    import torch
    import transformers as tf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, texts, vocab_size)
    tok = tf.AutoTokenizer.from_pretrained(str(out))
    cfg = tf.LlamaConfig(vocab_size=max(len(tok), model_vocab or 0), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger random weights so that choices get clearly different scores
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(out))
    return out
