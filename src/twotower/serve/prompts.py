"""Prompts as the tokenizer sees them: text to checked token ids and back, chat formatting."""

from __future__ import annotations

import asyncio
import threading

from . import protocol as p


class Prompts:
    """The tokenizer's side of the server: prompts to checked ids (off the event loop, length
    checked on characters first), ids to text; the tokenizer is used by one thread at a time."""

    def __init__(self, tokenizer, model_config, config: p.ServeConfig):
        self.tokenizer, self.model_config, self.config, self.lock = tokenizer, model_config, config, threading.Lock()
        self.mask_text = tokenizer.convert_ids_to_tokens(model_config.mask_token_id)
        self.max_chars = config.max_prompt_tokens * max(map(len, tokenizer.get_vocab()))
        self.template = self._apply_template if getattr(tokenizer, "chat_template", None) else None

    def _apply_template(self, messages: list[dict]) -> str:
        with self.lock:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def pieces(self, ids: list[int]) -> list[str | None]:
        """Each token's own text, None for the mask token (a denoising step as a page draws it)."""
        mask_id = self.model_config.mask_token_id
        with self.lock:
            return [None if i == mask_id else self.tokenizer.decode([i]) for i in ids]

    def _encode(self, text: str) -> list[int]:
        with self.lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def ids(self, prompt: str | list[int], param: str) -> list[int]:
        if isinstance(prompt, str):
            p.check_prompt_chars(prompt, self.max_chars, param)
            if self.mask_text in prompt:
                raise p.APIError(400, f"the prompt contains the mask token {self.mask_text}, which only the "
                                 "sampler may place", param=param)
            prompt = await asyncio.to_thread(self._encode, prompt)
        c = self.model_config
        return p.check_prompt_ids(prompt, self.config.max_prompt_tokens, c.vocab_size, c.mask_token_id, param)

    async def chat(self, messages) -> str:
        if self.template is None:
            return p.chat_prompt(messages)
        p.check_prompt_chars("".join(m.text() for m in messages), self.max_chars, "messages")
        return await asyncio.to_thread(p.chat_prompt, messages, self.template)
