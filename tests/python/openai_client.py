"""Drives `edgelm serve --http` with the official `openai` client, as an application would.

Usage: openai_client.py BASE_URL PROMPT MAX_TOKENS
Prints one JSON object: the streamed and whole answers of /v1/completions and
/v1/chat/completions (greedy), their finish reasons and usage, and the model list.
"""
import json
import sys

import openai

base_url, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = openai.OpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=120)
out = {"models": [m.id for m in client.models.list().data]}
model = out["models"][0]

whole = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
out["completion"] = whole.choices[0].text
out["completion_finish"] = whole.choices[0].finish_reason
out["completion_usage"] = whole.usage.model_dump()

pieces, finish = [], None
for chunk in client.completions.create(
    model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
):
    for c in chunk.choices:
        pieces.append(c.text)
        finish = c.finish_reason or finish
out["completion_stream"] = "".join(pieces)
out["completion_stream_finish"] = finish

messages = [{"role": "user", "content": prompt}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
out["chat"] = chat.choices[0].message.content
out["chat_role"] = chat.choices[0].message.role
out["chat_finish"] = chat.choices[0].finish_reason
out["chat_usage"] = chat.usage.model_dump()

pieces, finish, usage = [], None, None
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=max_tokens,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for c in chunk.choices:
        pieces.append(c.delta.content or "")
        finish = c.finish_reason or finish
out["chat_stream"] = "".join(pieces)
out["chat_stream_finish"] = finish
out["chat_stream_usage"] = usage

# An error comes back as the client's typed exception with the server's message.
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, n=2)
    out["n2_error"] = None
except openai.BadRequestError as e:
    out["n2_error"] = str(e)

print(json.dumps(out))
