"""Turn validated OpenAI request bodies into the engine's prompts and ``SamplingParams``, or ``ApiError``s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from pydantic import ValidationError

from minidisagg.engine.sampling import SamplingParams
from minidisagg.models.tokenizer import Tokenizer, TokenizerError, check_messages
from minidisagg.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, SamplingFields

COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI API's default for /v1/completions
EnginePrompt = dict[str, Any]  # {"prompt_token_ids": [...], "prompt": text or None}


@dataclass(frozen=True)
class ModelInfo:
    """What the request checks need to know of the served model."""

    name: str
    max_model_len: int
    tokenizer: Callable[[], Tokenizer]
    check_prompt: Callable[[EnginePrompt], Any]  # the engine's own prompt check; ValueError says what is wrong


def parse_body(model: type[SamplingFields], body: Any) -> Any:
    """Validate a JSON body against ``model``; a bad or unknown field is a 400 naming it."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"unsupported field {param!r}: this server does not implement it", param=param,
                           code="unsupported_field") from None
        raise ApiError(400, f"{param}: {first['msg']}", param=param) from None


def check_model(requested: str, info: ModelInfo) -> None:
    """404 unless the request names the served model."""
    if requested != info.name:
        raise ApiError(404, f"the model {requested!r} does not exist; this server serves {info.name!r}",
                       param="model", code="model_not_found")


def sampling_params(req: SamplingFields, max_tokens: Optional[int], default_max_tokens: int) -> SamplingParams:
    """The request's ``SamplingParams``; a value the engine refuses is a 400 naming the field."""
    unsupported = req.unsupported_field()
    if unsupported is not None:
        value = getattr(req, unsupported)
        raise ApiError(400, f"{unsupported}={value!r} is not supported by this server", param=unsupported,
                       code="unsupported_field")
    fields: dict[str, Any] = {"max_tokens": default_max_tokens if max_tokens is None else max_tokens,
                              "temperature": 1.0 if req.temperature is None else req.temperature,
                              "top_p": 1.0 if req.top_p is None else req.top_p,
                              "top_k": -1 if req.top_k is None else req.top_k,
                              "seed": req.seed, "stop": req.stop, "ignore_eos": req.ignore_eos}
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        param = next((name for name in fields if str(exc).startswith(name)), None)
        raise ApiError(400, str(exc), param=param) from None


def checked_prompt(prompt: EnginePrompt, info: ModelInfo, param: str) -> EnginePrompt:
    """The prompt after the engine's check; over the context is a 400 ``context_length_exceeded``."""
    num_tokens = len(prompt["prompt_token_ids"])
    if num_tokens >= info.max_model_len:
        raise ApiError(400, f"the prompt has {num_tokens} tokens; this model's context is {info.max_model_len} "
                            f"tokens (prompt plus at least one generated token)", param=param,
                       code="context_length_exceeded")
    try:
        info.check_prompt(prompt)
    except ValueError as exc:
        raise ApiError(400, str(exc), param=param) from None
    return prompt


def completion_prompts(req: CompletionRequest, info: ModelInfo) -> list[EnginePrompt]:
    """One engine prompt per prompt of the request (text, texts, token ids, lists of token ids)."""
    raw = req.prompt
    items: list[str | list[int]] = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    if not items:
        raise ApiError(400, "prompt: the prompt is empty", param="prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompt: EnginePrompt = {"prompt_token_ids": info.tokenizer().encode(item), "prompt": item}
        else:
            prompt = {"prompt_token_ids": list(item), "prompt": None}
        if not prompt["prompt_token_ids"]:
            raise ApiError(400, "prompt: the prompt is empty: it needs at least one token", param="prompt")
        prompts.append(checked_prompt(prompt, info, "prompt"))
    return prompts


def chat_prompt(req: ChatCompletionRequest, info: ModelInfo) -> EnginePrompt:
    """The conversation through the model's chat template, ready for the assistant's reply."""
    conversation = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        check_messages(conversation)
        tok = info.tokenizer()
        ids = tok.apply_chat_template(conversation, add_generation_prompt=True)
        text = tok.apply_chat_template(conversation, tokenize=False)
    except (TokenizerError, ValueError) as exc:
        raise ApiError(400, f"messages: {exc}", param="messages") from None
    return checked_prompt({"prompt_token_ids": list(ids), "prompt": text}, info, "messages")


def completion_params(req: CompletionRequest) -> SamplingParams:
    """``SamplingParams`` of a completion request (``max_tokens`` defaults to 16, as in the API)."""
    return sampling_params(req, req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)


def chat_params(req: ChatCompletionRequest, prompt: EnginePrompt, info: ModelInfo) -> SamplingParams:
    """``SamplingParams`` of a chat request (no limit given: the rest of the context)."""
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens disagree; give one", param="max_tokens")
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return sampling_params(req, limit, info.max_model_len - len(prompt["prompt_token_ids"]))
