"""The training run's sentencepiece model as a transformers tokenizer.

Encoding and decoding are sentencepiece's own (``encode`` / ``decode`` of the same .model file
the shards were made with), so ids and text round-trip exactly as in training, byte-fallback
pieces and whitespace included. transformers' built-in sentencepiece classes decode piece by
piece (byte pieces come out as ``<0x0A>``) or convert to a ``tokenizers`` pipeline that
tokenises whitespace differently, hence this class.

Special tokens as in training: documents end with eos (never added to a prompt); bos starts a
sequence only if the shards were made with ``add_bos``; pad is the model's pad piece.
"""

from __future__ import annotations

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class SessaLMTokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model"}  # noqa: RUF012 (transformers API)
    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012
    padding_side = "left"

    def __init__(self, vocab_file: str, add_bos_token: bool = False, bos_token="<s>",
                 eos_token="</s>", unk_token="<unk>", pad_token="<pad>", **kwargs) -> None:
        self.add_bos_token = add_bos_token
        super().__init__(vocab_file=vocab_file, bos_token=bos_token, eos_token=eos_token,
                         unk_token=unk_token, pad_token=pad_token, add_bos_token=add_bos_token,
                         special_tokens_pattern="none", **kwargs)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        prefix = [self.bos_token_id] if self.add_bos_token else []
        ids = prefix + token_ids_0
        return ids if token_ids_1 is None else ids + prefix + token_ids_1

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None,
                                already_has_special_tokens=False):
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(i in special) for i in token_ids_0]
        prefix = [1] if self.add_bos_token else []
        mask = prefix + [0] * len(token_ids_0)
        return mask if token_ids_1 is None else mask + prefix + [0] * len(token_ids_1)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        special = set(self.all_special_ids)
        # sentencepiece decodes control pieces (bos/eos/pad) to nothing: write them as their
        # piece text unless they are skipped, and decode the text between them as one run.
        out, run = [], []
        for i in ids:
            if i in special:
                out.append(self.sp_model.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self.sp_model.id_to_piece(i))
            else:
                run.append(i)
        out.append(self.sp_model.decode(run))
        return "".join(out)
